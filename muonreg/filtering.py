"""A trained hit filter turns a high-occupancy dataset into a tracking dataset:
`python -m muonreg.prepare filter --checkpoint CKPT --working-point 0.99 --input DIR --output DIR`.

The cut is the working point's, set on the filter's validation split when it was trained and stored
with it (real data carry no truth to set a cut on); `--threshold P` applies an explicit one, and
`--cut-from-input-truth` sets it on the input's own truth (the highest cut that keeps the asked
share of its muon hits, as the reference sets it from its ROC curve), only on request: then the
filtered set has seen its own truth. Two passes in constant memory (apart from one float per muon
hit): the filter scores every hit in batches, the scores going to a scratch file; then every event
keeps its hits at or above the cut. A muon left with fewer than
`min_hits_per_muon` kept hits loses them and its track (the tracking dataset's cut, as the
simulator applies it); the kept muons' truth links are renumbered 0..n-1 in their old order.
An event is dropped when no muon is left, else when more than `max_tracks` muons are, else when
more than `max_hits` hits are kept. The output has the input's layout (DatasetWriter: written
aside and renamed into place when complete), and its metadata.yaml records the working point, the
cut and where it came from, the checkpoint and what was lost.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from muonreg.data.dataset import MuonEventDataset, make_loader
from muonreg.data.format import DatasetReader, DatasetWriter
from muonreg.data.pileup import pileup_blocks, pileup_parameters
from muonreg.data.schema import HIT_FEATURES, NOISE_LINK, TRUTH_LINK
from muonreg.errors import UserError
from muonreg.evaluation.filter_metrics import threshold_at_efficiency
from muonreg.evaluation.inference import filter_probability
from muonreg.models import HitFilter
from muonreg.trained import load_model
from muonreg.training.device import evaluation_dtype, resolve_device
from muonreg.training.setup import hit_features


class FilterError(UserError, ValueError):
    """The filter cannot run on what it was given (output exists, no muon hit to set a cut on...)."""


def score_hits(
    model: HitFilter,
    dataset: MuonEventDataset,
    offsets: np.ndarray,
    scores: np.ndarray,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Write every hit's muon probability into `scores` (event i's at offsets[i]:offsets[i + 1]),
    computed in `amp_dtype` as the filter's evaluation computed the scores its cuts were set on;
    return the scores of the muon hits (to set a cut on the input's truth when asked)."""
    loader = make_loader(dataset, batch_size, shuffle=False)
    muon_scores = []
    model.to(device).eval()
    with (
        torch.no_grad(),
        tqdm(total=len(dataset), desc="scoring hits", unit="ev", disable=not progress) as bar,
    ):
        for batch in loader:
            probability = filter_probability(model, batch, device, amp_dtype).cpu().numpy()
            muon = batch["particle_hit_valid"].any(1).numpy()
            for i, event in enumerate(batch["event_index"].tolist()):
                n = offsets[event + 1] - offsets[event]
                scores[offsets[event] : offsets[event + 1]] = probability[i, :n]
                muon_scores.append(probability[i, :n][muon[i, :n]])
            bar.update(len(batch["event_index"]))
    return np.concatenate(muon_scores) if muon_scores else np.zeros(0, np.float32)


class Losses:
    """What the filter and the cuts take away, counted over all events."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(
            (
                "events_in",
                "events_written",
                "events_dropped_no_muon",
                "events_dropped_too_many_tracks",
                "events_dropped_too_many_hits",
                "muons_in",
                "muons_lost_too_few_hits",
                "muons_written",
                "muon_hits_in",
                "muon_hits_kept_by_cut",
                "background_hits_in",
                "background_hits_kept_by_cut",
                "hits_written",
            ),
            0,
        )

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            self.counts[key] += int(value)

    def summary(self) -> dict[str, float | int]:
        c = self.counts
        return {
            **c,
            "muon_hits_lost_by_cut": c["muon_hits_in"] - c["muon_hits_kept_by_cut"],
            "muon_hit_efficiency": c["muon_hits_kept_by_cut"] / max(c["muon_hits_in"], 1),
            "background_kept_fraction": c["background_hits_kept_by_cut"] / max(c["background_hits_in"], 1),
        }


def filter_event(
    hits: np.ndarray,
    tracks: np.ndarray,
    kept: np.ndarray,
    link_col: int,
    min_hits_per_muon: int,
    max_hits: int,
    max_tracks: int,
    losses: Losses,
) -> tuple[np.ndarray, np.ndarray] | None:
    """One event's kept hits and tracks, truth links renumbered; None when the event is dropped."""
    link = hits[:, link_col].astype(np.int64)
    muon = link >= 0
    kept_per_muon = np.bincount(link[kept & muon], minlength=len(tracks))
    surviving = kept_per_muon >= min_hits_per_muon
    losses.add(
        events_in=1,
        muons_in=len(tracks),
        muons_lost_too_few_hits=(~surviving).sum(),
        muon_hits_in=muon.sum(),
        muon_hits_kept_by_cut=(kept & muon).sum(),
        background_hits_in=(~muon).sum(),
        background_hits_kept_by_cut=(kept & ~muon).sum(),
    )
    of_surviving_muon = np.zeros(len(link), dtype=bool)
    of_surviving_muon[muon] = surviving[link[muon]]
    keep = kept & (~muon | of_surviving_muon)
    n_muons = int(surviving.sum())
    if n_muons == 0:
        losses.add(events_dropped_no_muon=1)
        return None
    if n_muons > max_tracks:
        losses.add(events_dropped_too_many_tracks=1)
        return None
    if keep.sum() > max_hits:
        losses.add(events_dropped_too_many_hits=1)
        return None
    new_index = np.cumsum(surviving) - 1  # old muon index -> new one, order kept
    out = hits[keep].copy()
    out_link = link[keep]
    out[:, link_col] = np.where(out_link >= 0, new_index[np.maximum(out_link, 0)], NOISE_LINK)
    losses.add(events_written=1, muons_written=n_muons, hits_written=len(out))
    return out, tracks[surviving]


def check_arguments(working_point: float, threshold: float | None, cut_from_input_truth: bool) -> None:
    """Refuse impossible settings at once, before any hit is scored (one line naming the option)."""
    if not 0 < working_point < 1:
        raise FilterError(
            f"--working-point {working_point:g}: a muon-hit efficiency strictly between 0 and 1"
        )
    if threshold is not None and not 0 <= threshold <= 1:
        raise FilterError(f"--threshold {threshold:g}: a muon probability between 0 and 1")
    if threshold is not None and cut_from_input_truth:
        raise FilterError("--threshold and --cut-from-input-truth: give one way of setting the cut, not both")


def stored_cut(model: HitFilter, checkpoint: str | Path, working_point: float) -> float:
    """The cut the filter stores for `working_point` (set on its validation split)."""
    cuts = model.stored_cuts()
    for wp, cut in cuts.items():
        if abs(wp - working_point) < 1e-9:
            return cut
    if not cuts:
        raise FilterError(
            f"{checkpoint} stores no working-point cut (trained before cuts were stored, or without a "
            "validation split); give --threshold P, or --cut-from-input-truth"
        )
    raise FilterError(
        f"--working-point {working_point:g}: {checkpoint} stores cuts for {sorted(cuts)} only; choose one, "
        "or give --threshold P"
    )


EVENTS_PER_FILE = 10_000  # events of the tracking set per data file (bounded memory while writing)


class FilterRun:
    """A trained filter with its cut and the tracking set's limits, applied to input datasets one
    after another into one output (`apply`); the losses add up over them."""

    def __init__(
        self,
        checkpoint: str | Path,
        columns: list[str],
        *,
        working_point: float = 0.99,
        threshold: float | None = None,
        cut_from_input_truth: bool = False,
        max_hits: int = 600,
        max_tracks: int = 2,
        min_hits_per_muon: int = 3,
        batch_size: int = 8,
        device: str = "auto",
        progress: bool = True,
    ):
        check_arguments(working_point, threshold, cut_from_input_truth)
        self.checkpoint = Path(checkpoint)
        self.model, self.cfg = load_model(checkpoint, columns, kind=HitFilter)
        if threshold is not None:
            self.source = "threshold"
        elif not cut_from_input_truth:
            threshold, self.source = stored_cut(self.model, checkpoint, working_point), "stored"
        else:
            self.source = "input truth"
        self.working_point, self.threshold = working_point, threshold
        self.limits = (min_hits_per_muon, max_hits, max_tracks)
        self.batch_size, self.progress = batch_size, progress
        self.device = resolve_device(device)
        self.losses = Losses()

    def parameters(self) -> dict:
        """What the output's metadata.yaml records of the filter, its cut and what was lost."""
        min_hits, max_hits, max_tracks = self.limits
        return {
            "checkpoint": str(self.checkpoint.resolve()),
            "working_point": float(self.working_point) if self.source != "threshold" else None,
            "threshold": float(self.threshold),
            "cut_from": self.source,
            "max_hits": max_hits,
            "max_tracks": max_tracks,
            "min_hits_per_muon": min_hits,
            "losses": self.losses.summary(),
        }

    def apply(self, reader: DatasetReader, writer: DatasetWriter, scratch: Path) -> None:
        """Score every hit of `reader`'s events (into a file in `scratch`), set the cut on their truth if
        asked, and write the events that survive into `writer`."""
        features = hit_features(self.cfg, reader.hit_features, f"dataset {reader.path}")
        most_muons = max(
            [int(reader.track_arrays(f, "num_tracks")[0].max(initial=0)) for f in range(len(reader.files))]
        )
        dataset = MuonEventDataset(reader, features, [], max(most_muons, 1))
        offsets = np.concatenate([[0], np.cumsum(reader.num_hits(), dtype=np.int64)])
        scores = np.lib.format.open_memmap(
            scratch / "scores.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]),)
        )
        amp = evaluation_dtype(self.device, self.cfg)
        muon_scores = score_hits(
            self.model, dataset, offsets, scores, self.batch_size, self.device, amp, self.progress
        )
        if self.source == "input truth":
            if len(muon_scores) == 0:
                raise FilterError(
                    f"{reader.path}: no muon hit (truthLink >= 0) to set the working point's cut on"
                )
            self.threshold = threshold_at_efficiency(muon_scores, self.working_point)
        link_col = reader.hit_index[TRUTH_LINK]
        hits, tracks, numbers = [], [], []
        for index in tqdm(range(len(reader)), desc="filtering", unit="ev", disable=not self.progress):
            event = reader.read(index)
            kept = scores[offsets[index] : offsets[index + 1]] >= self.threshold
            result = filter_event(event.hits, event.tracks, kept, link_col, *self.limits, self.losses)
            if result is not None:
                hits.append(result[0])
                tracks.append(result[1])
                numbers.append(event.event_number)
            if len(hits) == EVENTS_PER_FILE or (index == len(reader) - 1 and hits):
                writer.write_file(hits, tracks, numbers)
                hits, tracks, numbers = [], [], []
        del scores

    def check_written(self, what: str) -> None:
        """A FilterError when no event survived: the user must hear why, not get an empty dataset."""
        summary = self.losses.summary()
        if not summary["events_written"]:
            _, max_hits, max_tracks = self.limits
            raise FilterError(
                f"no event of {what} passes the cut {self.threshold:.4g}: "
                f"{summary['events_dropped_too_many_hits']} keep more than {max_hits} hits, "
                f"{summary['events_dropped_too_many_tracks']} more than {max_tracks} muons, "
                f"{summary['events_dropped_no_muon']} no muon; a better-trained filter keeps fewer hits"
            )


def filter_dataset(
    checkpoint: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    compression: str | None = "gzip",
    **settings: object,
) -> dict:
    """Filter `input_dir` into the tracking dataset `output_dir` at the stored cut of the working point,
    at a `threshold`, or at a cut set on the input's truth (`settings`: FilterRun's); return what
    metadata.yaml records."""
    output_dir, input_dir = Path(output_dir), Path(input_dir)
    _check_output(output_dir)
    reader = DatasetReader(input_dir)
    run = FilterRun(checkpoint, reader.hit_features, **settings)
    with (
        tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.scores-") as scratch,
        DatasetWriter(
            output_dir,
            hit_features=reader.hit_features,
            track_features=reader.track_features,
            compression=compression,
            source=str(input_dir.resolve()),
        ) as writer,
    ):
        run.apply(reader, writer, Path(scratch))
        run.check_written(str(input_dir))
        writer.processing_parameters = {
            "hit_filter": {**run.parameters(), "source_dataset": str(input_dir.resolve())},
            "source_processing_parameters": reader.metadata.get("processing_parameters"),
        }
    return writer.processing_parameters


def filter_simulated(
    checkpoint: str | Path,
    output_dir: str | Path,
    events: int,
    *,
    seed: int = 0,
    pileup: float = 200.0,
    compression: str | None = "gzip",
    progress: bool = True,
    **settings: object,
) -> dict:
    """Simulate `events` events at pile-up `pileup` (muonreg.data.pileup, the filter dataset's
    events) block by block and write only what the filter keeps: a tracking dataset of as many
    events as wanted, without storing thousands of hits per event. The cut is the stored one of the
    working point or a `threshold` (`settings`: FilterRun's; simulated blocks have no common truth to
    set one on)."""
    output_dir = Path(output_dir)
    if settings.get("cut_from_input_truth"):
        raise FilterError(
            "--simulate with --cut-from-input-truth: simulated blocks take the stored cut or --threshold"
        )
    _check_output(output_dir)
    run = FilterRun(checkpoint, list(HIT_FEATURES), **{**settings, "progress": False})
    with (
        tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.blocks-") as scratch,
        DatasetWriter(output_dir, compression=compression, source="muonreg-simulate --pileup") as writer,
        tqdm(
            total=events,
            desc=f"simulating and filtering (pile-up {pileup:g})",
            unit="ev",
            disable=not progress,
        ) as bar,
    ):
        for k, (block, numbers, counts) in enumerate(pileup_blocks(events, seed, 1, pileup)):
            block_dir = Path(scratch) / f"block-{k}"
            with DatasetWriter(block_dir, compression=None) as block_writer:
                block_writer.write_file(block.hits, block.tracks, numbers.tolist())
            run.apply(DatasetReader(block_dir), writer, Path(scratch))
            shutil.rmtree(block_dir)
            bar.update(counts.events_seen)
        run.check_written(f"{events} simulated events")
        writer.processing_parameters = {
            "hit_filter": run.parameters(),
            "source_processing_parameters": pileup_parameters(events, seed, pileup),
        }
    return writer.processing_parameters


def _check_output(output_dir: Path) -> None:
    if output_dir.exists():
        raise FilterError(f"--output {output_dir} already exists; remove it or choose another")
    output_dir.parent.mkdir(parents=True, exist_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt of a model=hit_filter run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="high-occupancy dataset (hepattn layout)")
    source.add_argument(
        "--simulate",
        type=int,
        metavar="EVENTS",
        help="filter this many simulated pile-up events as they are made (stored cut or --threshold)",
    )
    parser.add_argument(
        "--pileup", type=float, default=200.0, help="with --simulate: mean pile-up (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="with --simulate: simulation seed (default 0)")
    parser.add_argument(
        "--output", type=Path, required=True, help="tracking dataset to write (must not exist)"
    )
    parser.add_argument(
        "--working-point",
        type=float,
        default=0.99,
        help="the stored working point (muon-hit efficiency on the filter's validation split) whose cut to "
        "apply (default 0.99)",
    )
    parser.add_argument("--threshold", type=float, help="apply this cut (muon probability) instead")
    parser.add_argument(
        "--cut-from-input-truth",
        action="store_true",
        help="set the working point's cut on the input's own truth (simulation studies only: real data "
        "have none, and the filtered set then has seen its own truth)",
    )
    parser.add_argument(
        "--max-hits", type=int, default=600, help="drop events keeping more hits (default 600)"
    )
    parser.add_argument(
        "--max-tracks", type=int, default=2, help="drop events keeping more muons (default 2)"
    )
    parser.add_argument(
        "--min-hits-per-muon", type=int, default=3, help="a muon with fewer kept hits is removed (default 3)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="events per filter batch (default 8)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--uncompressed", action="store_true", help="write chunked, uncompressed files")


def run(args: argparse.Namespace) -> Path:
    """`muonreg-prepare filter ...`: filter, print the cut and the losses, return the output path."""
    common = dict(
        working_point=args.working_point,
        threshold=args.threshold,
        max_hits=args.max_hits,
        max_tracks=args.max_tracks,
        min_hits_per_muon=args.min_hits_per_muon,
        batch_size=args.batch_size,
        device=args.device,
        compression=None if args.uncompressed else "gzip",
    )
    if args.simulate is not None:
        if args.cut_from_input_truth:
            raise FilterError(
                "--simulate with --cut-from-input-truth: simulated blocks take the stored cut or --threshold"
            )
        if args.simulate < 1 or args.pileup < 0:
            raise FilterError(
                f"--simulate {args.simulate} --pileup {args.pileup:g}: need >= 1 events and pile-up >= 0"
            )
        parameters = filter_simulated(
            args.checkpoint,
            args.output,
            args.simulate,
            seed=args.seed,
            pileup=args.pileup,
            cut_from_input_truth=args.cut_from_input_truth,
            **common,
        )
    else:
        parameters = filter_dataset(
            args.checkpoint, args.input, args.output, cut_from_input_truth=args.cut_from_input_truth, **common
        )
    f = parameters["hit_filter"]
    losses = f["losses"]
    where = {
        "stored": f"working point {f['working_point']:g}, cut stored with the filter",
        "threshold": "--threshold",
        "input truth": f"working point {f['working_point']:g}, cut set on this input's truth",
    }[f["cut_from"]]
    print(
        f"{where}: cut {f['threshold']:.4g}; muon-hit efficiency "
        f"{losses['muon_hit_efficiency']:.4f}, background kept {losses['background_kept_fraction']:.4f}; "
        f"{losses['events_written']} of {losses['events_in']} events written (dropped: "
        f"{losses['events_dropped_no_muon']} without a muon, {losses['events_dropped_too_many_tracks']} with more "
        f"than {f['max_tracks']} muons, {losses['events_dropped_too_many_hits']} with more than {f['max_hits']} hits)"
    )
    return args.output

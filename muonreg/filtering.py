"""A trained hit filter turns a high-occupancy dataset into a tracking dataset:
`python -m muonreg.prepare filter --checkpoint CKPT --working-point 0.99 --input DIR --output DIR`.

Two passes in constant memory (apart from one float per muon hit): the filter scores every hit in
batches, the scores going to a scratch file; the working point's threshold is set on the input's
truth, the highest cut that keeps the asked share of muon hits (as the reference sets it from its
ROC curve); then every event keeps its hits at or above the cut. A muon left with fewer than
`min_hits_per_muon` kept hits loses them and its track (the tracking dataset's cut, as the
simulator applies it); the kept muons' truth links are renumbered 0..n-1 in their old order.
An event is dropped when no muon is left, else when more than `max_tracks` muons are, else when
more than `max_hits` hits are kept. The output has the input's layout (DatasetWriter: written
aside and renamed into place when complete), and its metadata.yaml records the working point, the
cut, the checkpoint and what was lost.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from muonreg.data.dataset import MuonEventDataset, make_loader
from muonreg.data.format import DatasetReader, DatasetWriter
from muonreg.data.schema import NOISE_LINK, TRUTH_LINK
from muonreg.errors import UserError
from muonreg.evaluation.filter_metrics import threshold_at_efficiency
from muonreg.models import HitFilter
from muonreg.trained import load_model
from muonreg.training.device import autocast, autocast_dtype, resolve_device, to_device
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
    progress: bool = True,
) -> np.ndarray:
    """Write every hit's muon probability into `scores` (event i's at offsets[i]:offsets[i + 1]);
    return the scores of the muon hits, which set the working point's cut."""
    loader = make_loader(dataset, batch_size, shuffle=False)
    amp_dtype = autocast_dtype(device, "auto")
    muon_scores = []
    model.to(device).eval()
    with (
        torch.no_grad(),
        tqdm(total=len(dataset), desc="scoring hits", unit="ev", disable=not progress) as bar,
    ):
        for batch in loader:
            batch = to_device(batch, device)
            with autocast(device, amp_dtype):
                probability = model.predict(model(batch)).float().cpu().numpy()
            muon = batch["particle_hit_valid"].any(1).cpu().numpy()
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


def filter_dataset(
    checkpoint: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    working_point: float = 0.99,
    max_hits: int = 600,
    max_tracks: int = 2,
    min_hits_per_muon: int = 3,
    batch_size: int = 8,
    events_per_file: int = 10_000,
    device: str = "auto",
    compression: str | None = "gzip",
    progress: bool = True,
) -> dict:
    """Filter `input_dir` into the tracking dataset `output_dir`; return what metadata.yaml records."""
    output_dir, input_dir = Path(output_dir), Path(input_dir)
    if output_dir.exists():
        raise FilterError(f"--output {output_dir} already exists; remove it or choose another")
    reader = DatasetReader(input_dir)
    model, cfg = load_model(checkpoint, reader.hit_features, kind=HitFilter)
    features = hit_features(cfg, reader.hit_features, f"dataset {input_dir}")
    most_muons = max(
        [int(reader.track_arrays(f, "num_tracks")[0].max(initial=0)) for f in range(len(reader.files))]
    )
    dataset = MuonEventDataset(reader, features, [], max(most_muons, 1))
    offsets = np.concatenate([[0], np.cumsum(reader.num_hits(), dtype=np.int64)])
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.scores-") as scratch:
        scores = np.lib.format.open_memmap(
            Path(scratch) / "scores.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]),)
        )
        muon_scores = score_hits(
            model, dataset, offsets, scores, batch_size, resolve_device(device), progress
        )
        if len(muon_scores) == 0:
            raise FilterError(f"{input_dir}: no muon hit (truthLink >= 0) to set the working point's cut on")
        threshold = threshold_at_efficiency(muon_scores, working_point)
        losses = Losses()
        link_col = reader.hit_index[TRUTH_LINK]
        parameters = {
            "hit_filter": {
                "checkpoint": str(Path(checkpoint).resolve()),
                "source_dataset": str(input_dir.resolve()),
                "working_point": float(working_point),
                "threshold": float(threshold),
                "max_hits": max_hits,
                "max_tracks": max_tracks,
                "min_hits_per_muon": min_hits_per_muon,
            },
            "source_processing_parameters": reader.metadata.get("processing_parameters"),
        }
        with DatasetWriter(
            output_dir,
            hit_features=reader.hit_features,
            track_features=reader.track_features,
            compression=compression,
            source=str(input_dir.resolve()),
        ) as writer:
            hits, tracks, numbers = [], [], []
            for index in tqdm(range(len(reader)), desc="filtering", unit="ev", disable=not progress):
                event = reader.read(index)
                kept = scores[offsets[index] : offsets[index + 1]] >= threshold
                result = filter_event(
                    event.hits, event.tracks, kept, link_col, min_hits_per_muon, max_hits, max_tracks, losses
                )
                if result is not None:
                    hits.append(result[0])
                    tracks.append(result[1])
                    numbers.append(event.event_number)
                if len(hits) == events_per_file or (index == len(reader) - 1 and hits):
                    writer.write_file(hits, tracks, numbers)
                    hits, tracks, numbers = [], [], []
            summary = losses.summary()
            if not summary["events_written"]:
                raise FilterError(
                    f"no event of {input_dir} passes the working point {working_point:g} (cut {threshold:.4g}): "
                    f"{summary['events_dropped_too_many_hits']} keep more than {max_hits} hits, "
                    f"{summary['events_dropped_too_many_tracks']} more than {max_tracks} muons, "
                    f"{summary['events_dropped_no_muon']} no muon; a better-trained filter keeps fewer hits"
                )
            parameters["hit_filter"]["losses"] = summary
            writer.processing_parameters = parameters
    return parameters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt of a model=hit_filter run")
    parser.add_argument("--input", type=Path, required=True, help="high-occupancy dataset (hepattn layout)")
    parser.add_argument(
        "--output", type=Path, required=True, help="tracking dataset to write (must not exist)"
    )
    parser.add_argument(
        "--working-point",
        type=float,
        default=0.99,
        help="share of the muon hits the cut keeps (default 0.99)",
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
    parameters = filter_dataset(
        args.checkpoint,
        args.input,
        args.output,
        working_point=args.working_point,
        max_hits=args.max_hits,
        max_tracks=args.max_tracks,
        min_hits_per_muon=args.min_hits_per_muon,
        batch_size=args.batch_size,
        device=args.device,
        compression=None if args.uncompressed else "gzip",
    )
    f = parameters["hit_filter"]
    losses = f["losses"]
    print(
        f"working point {f['working_point']:g}: cut {f['threshold']:.4g}; muon-hit efficiency "
        f"{losses['muon_hit_efficiency']:.4f}, background kept {losses['background_kept_fraction']:.4f}; "
        f"{losses['events_written']} of {losses['events_in']} events written (dropped: "
        f"{losses['events_dropped_no_muon']} without a muon, {losses['events_dropped_too_many_tracks']} with more "
        f"than {f['max_tracks']} muons, {losses['events_dropped_too_many_hits']} with more than {f['max_hits']} hits)"
    )
    return args.output

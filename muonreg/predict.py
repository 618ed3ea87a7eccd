"""Run a trained tracker (or hit filter) over a dataset and keep its predictions in HDF5:
`python -m muonreg.predict (--run-id ID | --checkpoint PATH) --data DIR --out FILE.h5`.

The file is readable with plain h5py (layout below, version 2: version 1 had no sigma_*). E events, Q queries (the model's
`num_queries`), H = the sum of the events' hit counts. Queries are in the network's own order (no
truth matching); a track is a query with `valid_probability` >= 0.5.

    event_index        int64   [E]     the event's index in the dataset (row of event_file_indices.npy)
    file_index, row    int32, int64 [E]  where it is stored: data file attrs["files"][file_index], row
    event_number       int64   [E]     the file's event number
    num_hits           int32   [E]     the event's hits (the stored hits[row, :num_hits])
    hit_start          int64   [E]     event e's hits are rows hit_start[e] : hit_start[e] + num_hits[e]
    hit_probability    float32 [H, Q]  probability that hit h belongs to query q, in the stored hit order
    valid_probability  float32 [E, Q]  probability that the query holds a muon
    eta, phi, pt, q    float32 [E, Q]  the network's track parameters (pT in GeV, q = +-1)
    sigma_qpt, sigma_eta, sigma_phi  float32 [E, Q]
                                       their per-track uncertainties (q/pT in 1/GeV, phi in rad;
                                       muonreg.tasks.uncertainty), calibrated on the run's validation
                                       split; NaN from a network without the track fit
    num_assigned       int32   [E, Q]  hits with probability >= attrs["hit_threshold"] (the model's
                                       model.hit_mask.threshold, 0.5, unless --hit-threshold): the track's hits
    fit/eta, fit/phi, fit/pt, fit/q, fit/chi2_ndf  float32 [E, Q]
                                       least-squares fit (muonreg.reco.fit, outlier-rejecting unless
                                       --plain-fit) of the assigned hits of each track with at least
                                       4 of them; NaN where not fitted
    fit/ok             bool    [E, Q]  the fit ran and converged

File attributes: format, version, source (checkpoint or run), dataset, split, files, fields, config.

A hit filter's file (model=hit_filter; attrs["model"] = "hit_filter") has the same per-event
datasets up to hit_start, and per hit:
    hit_probability    float32 [H]     the filter's muon probability of hit h, in the stored hit order
    kept/wp<e>         bool    [H]     h is at or above the cut the filter stores for working point e
                                       (set on its validation split; attrs["filter_cuts"])

Constant memory on any dataset: batches are read from the HDF5 files, predicted, fitted and appended
to resizable datasets. The file is written under FILE.partial and renamed only when complete, so an
interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from muonreg.data.dataset import MuonEventDataset, make_loader
from muonreg.data.format import DatasetReader
from muonreg.errors import UserError, exit_on_user_errors
from muonreg.evaluation.assigned_fit import fit_assigned
from muonreg.evaluation.filter_metrics import working_point_name
from muonreg.evaluation.inference import SIGMAS, filter_probability, infer
from muonreg.evaluation.metrics import FIELDS
from muonreg.models import HitFilter, MaskFormer
from muonreg.reco.fit import MIN_HITS
from muonreg.trained import add_source_arguments, atomic_output, checkpoint_file, load_model
from muonreg.training.device import evaluation_dtype, resolve_device
from muonreg.training.setup import dataset_path, hit_features, run_splits

FORMAT, VERSION = "muonreg-predictions", 2
SPLITS = ("test", "val", "train", "all")
ASSIGNED = 0.5  # a hit is a track's at probability >= this, unless the model's hit_mask.threshold says
FIT_FIELDS = (*FIELDS, "chi2_ndf")
CHUNK_EVENTS = 1024  # HDF5 chunk height of the per-event datasets
FIT_TRACKS = 2000  # tracks fitted together (reco.fit.fit_tracks's own batch)
MAX_PENDING_BATCHES = 32  # and batches held at most while tracks gather (bounded memory)


EVENT_SPECS = {
    "event_index": (np.int64, ()),
    "file_index": (np.int32, ()),
    "row": (np.int64, ()),
    "event_number": (np.int64, ()),
    "num_hits": (np.int32, ()),
    "hit_start": (np.int64, ()),
}


def tracker_specs(queries: int) -> dict[str, tuple]:
    """(dtype, shape after the first axis) of every dataset of a tracker's file."""
    q = queries
    return {
        **EVENT_SPECS,
        "hit_probability": (np.float32, (q,)),
        "valid_probability": (np.float32, (q,)),
        **{f: (np.float32, (q,)) for f in (*FIELDS, *SIGMAS)},
        "num_assigned": (np.int32, (q,)),
        **{f"fit/{f}": (np.float32, (q,)) for f in FIT_FIELDS},
        "fit/ok": (np.bool_, (q,)),
    }


def filter_specs(working_points: list[float]) -> dict[str, tuple]:
    """(dtype, shape after the first axis) of every dataset of a hit filter's file."""
    kept = {f"kept/{working_point_name(wp)}": (np.bool_, ()) for wp in working_points}
    return {**EVENT_SPECS, "hit_probability": (np.float32, ()), **kept}


def _per_hit(name: str) -> bool:
    return name == "hit_probability" or name.startswith("kept/")


class PredictionWriter:
    """Appends batches of predictions to resizable HDF5 datasets (the layout in the module doc):
    `specs` {name: (dtype, shape after the first axis)}; per-hit datasets grow by hits."""

    def __init__(self, path: Path, specs: dict[str, tuple], attrs: dict):
        self.file = h5py.File(path, "w")
        self.file.attrs.update(attrs)
        for name, (dtype, tail) in specs.items():
            chunk = 16 * CHUNK_EVENTS if _per_hit(name) else CHUNK_EVENTS
            self.file.create_dataset(
                name,
                shape=(0, *tail),
                maxshape=(None, *tail),
                dtype=dtype,
                chunks=(chunk, *tail),
                compression="gzip",
                compression_opts=1,
            )
        self.events = self.hits = 0

    def append(self, columns: dict[str, np.ndarray]) -> None:
        n, h = len(columns["event_index"]), len(columns["hit_probability"])
        columns = {**columns, "hit_start": self.hits + np.cumsum(columns["num_hits"]) - columns["num_hits"]}
        for name, values in columns.items():
            ds = self.file[name]
            start = self.hits if _per_hit(name) else self.events
            ds.resize(start + len(values), axis=0)
            ds[start:] = values
        self.events += n
        self.hits += h

    def close(self) -> None:
        self.file.close()


Track = tuple[int, int, np.ndarray, np.ndarray]  # (event in batch, query, event's stored hits, assigned)


def event_columns(reader: DatasetReader, indices: np.ndarray) -> tuple[dict[str, np.ndarray], list]:
    """The per-event columns of a batch (hit_start is the writer's) and its stored events."""
    events = [reader.read(int(i)) for i in indices]
    located = np.array([reader.locate(int(i)) for i in indices], dtype=np.int64).reshape(-1, 2)
    columns = {
        "event_index": indices.astype(np.int64),
        "file_index": located[:, 0].astype(np.int32),
        "row": located[:, 1],
        "event_number": np.array([e.event_number for e in events], dtype=np.int64),
        "num_hits": np.array([len(e.hits) for e in events], dtype=np.int32),
    }
    return columns, events


def filter_columns(
    probability: torch.Tensor, reader: DatasetReader, indices: np.ndarray, cuts: dict[float, float]
) -> dict[str, np.ndarray]:
    """One batch's rows of a hit filter's file."""
    columns, _ = event_columns(reader, indices)
    p = probability.float().cpu().numpy()
    hits = np.concatenate([p[b, :n] for b, n in enumerate(columns["num_hits"])])
    kept = {f"kept/{working_point_name(wp)}": hits >= cut for wp, cut in cuts.items()}
    return {**columns, "hit_probability": hits.astype(np.float32), **kept}


def batch_columns(
    preds: dict[str, torch.Tensor],
    reader: DatasetReader,
    indices: np.ndarray,
    hit_threshold: float = ASSIGNED,
) -> tuple[dict[str, np.ndarray], list[Track]]:
    """One batch's rows of the file (fit/* still empty) and the tracks whose assigned hits to fit:
    predicted valid, with at least MIN_HITS assigned hits."""
    p = {k: v.cpu().numpy() for k, v in preds.items()}
    columns, events = event_columns(reader, indices)
    num_hits = columns["num_hits"]
    hit_probability = np.concatenate([p["hit_probability"][b, :, :n].T for b, n in enumerate(num_hits)])
    assigned = p["hit_probability"] >= hit_threshold  # [b, q, m]; padding is 0
    shape = p["valid_probability"].shape
    columns = {
        **columns,
        "hit_probability": hit_probability.astype(np.float32),
        "valid_probability": p["valid_probability"],
        **{f: p[f] for f in (*FIELDS, *SIGMAS)},
        "num_assigned": assigned.sum(-1).astype(np.int32),
        **{f"fit/{f}": np.full(shape, np.nan, np.float32) for f in FIT_FIELDS},
        "fit/ok": np.zeros(shape, bool),
    }
    tracks = [
        (b, q, events[b].hits, assigned[b, q, : num_hits[b]])
        for b, q in zip(*np.nonzero(p["valid_probability"] >= 0.5), strict=True)
        if assigned[b, q].sum() >= MIN_HITS
    ]
    return columns, tracks


class FittingWriter:
    """Holds batches until FIT_TRACKS tracks wait (the fit is vectorised over tracks: one call on
    2000 tracks costs little more than on 5), fits their assigned hits, then writes the batches."""

    def __init__(self, writer: PredictionWriter, index: dict[str, int], fit: str | None):
        self.writer, self.index, self.fit = writer, index, fit
        self.pending: list[tuple[dict[str, np.ndarray], list[Track]]] = []
        self.waiting = 0

    def append(self, columns: dict[str, np.ndarray], tracks: list[Track]) -> None:
        self.pending.append((columns, tracks if self.fit else []))
        self.waiting += len(self.pending[-1][1])
        if self.waiting >= FIT_TRACKS or len(self.pending) >= MAX_PENDING_BATCHES:
            self.flush()

    def flush(self) -> None:
        tracks = [(k, t) for k, (_, batch) in enumerate(self.pending) for t in batch]
        if tracks:
            fitted = fit_assigned(
                [t[2] for _, t in tracks], [t[3] for _, t in tracks], self.index, robust=self.fit == "robust"
            )
            ok = fitted["ok"].astype(bool)
            for i, (k, (b, q, _, _)) in enumerate(tracks):
                columns = self.pending[k][0]
                columns["fit/ok"][b, q] = ok[i]
                for f in FIT_FIELDS:
                    columns[f"fit/{f}"][b, q] = fitted[f][i] if ok[i] else np.nan
        for columns, _ in self.pending:
            self.writer.append(columns)
        self.pending, self.waiting = [], 0


def predict(
    model: MaskFormer | HitFilter,
    cfg: DictConfig,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    batch_size: int = 128,
    device: str = "auto",
    fit: str | None = "robust",
    hit_threshold: float = ASSIGNED,
    source: str = "",
    progress: bool = True,
    limit: int | None = None,
) -> int:
    """Write the predictions of `model` (config `cfg`) on a split of the dataset `data` to `out`
    (layout in the module doc); return the number of events. `fit` (trackers): "robust", "plain"
    or None; `limit`: only the split's first events."""
    out = Path(out)
    reader = DatasetReader(data, required_track_features=())
    indices = np.arange(len(reader)) if split == "all" else run_splits(cfg, len(reader))[split]
    indices = indices[:limit]  # the first `limit` events (all with None)
    features = hit_features(cfg, reader.hit_features, f"dataset {reader.path}")
    dataset = MuonEventDataset(reader, features, [], int(cfg.data.max_particles), indices=indices)
    dev = resolve_device(device)
    model.to(dev)
    amp = evaluation_dtype(dev, cfg)
    loader = make_loader(dataset, batch_size, shuffle=False, bucket_by_hits=False)
    attrs = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "dataset": str(Path(data).resolve()),
        "split": split,
        "files": [str(f.relative_to(reader.path)) for f in reader.files],
        "fields": list(FIELDS),
        "hit_threshold": hit_threshold,
        "fit": fit or "none",
        "config": OmegaConf.to_yaml(cfg),
    }
    is_filter = isinstance(model, HitFilter)
    cuts = model.stored_cuts() if is_filter else {}
    if is_filter:
        attrs.update(model="hit_filter", filter_cuts=json.dumps({f"{wp:g}": c for wp, c in cuts.items()}))
    specs = filter_specs(list(cuts)) if is_filter else tracker_specs(model.num_queries)
    with atomic_output(out, "the predictions") as partial:
        writer = PredictionWriter(partial, specs, attrs)
        try:
            done = 0
            with tqdm(total=len(dataset), desc="predicting", unit="ev", disable=not progress) as bar:
                fitting = FittingWriter(writer, reader.hit_index, fit)
                for batch in loader:
                    indices = batch["event_index"].numpy()
                    if is_filter:
                        probability = filter_probability(model, batch, dev, amp)
                        writer.append(filter_columns(probability, reader, indices, cuts))
                    else:
                        preds = infer(model, batch, dev, amp)
                        fitting.append(*batch_columns(preds, reader, indices, hit_threshold))
                    done += len(indices)
                    bar.update(len(indices))
                fitting.flush()
        finally:
            writer.close()
    return done


def _source(args: argparse.Namespace) -> str:
    if args.run_id:
        return f"run {args.run_id}"
    return f"model {args.model_uri}" if args.model_uri else str(args.checkpoint.resolve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muonreg.predict", description=__doc__.splitlines()[0])
    add_source_arguments(
        parser,
        "a checkpoint written by training (best.pt)",
        "an MLflow run whose best checkpoint to use",
        model_uri=True,
    )
    parser.add_argument("--data", type=Path, help="dataset directory (default: the one the run trained on)")
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="the run's split of it, or all events"
    )
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--hit-threshold",
        type=float,
        help="probability from which a hit is a track's (default: the model's working point, as in its evaluation)",
    )
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument(
        "--plain-fit", action="store_true", help="fit the assigned hits without outlier rejection"
    )
    fit.add_argument("--no-fit", action="store_true", help="no least-squares fit (fit/* stay NaN)")
    args = parser.parse_args(argv)
    with exit_on_user_errors():
        if args.batch_size < 1:
            raise UserError(f"--batch-size={args.batch_size} must be at least 1")
        if args.hit_threshold is not None and not 0 < args.hit_threshold <= 1:
            raise UserError(f"--hit-threshold={args.hit_threshold} must be in (0, 1]")
        with checkpoint_file(args.checkpoint, args.run_id, args.tracking_uri, args.model_uri) as path:
            model, cfg = load_model(path, kind=None)
            data = args.data or dataset_path(cfg)
            start = time.perf_counter()
            n = predict(
                model,
                cfg,
                data,
                args.out,
                split=args.split,
                batch_size=args.batch_size,
                device=args.device,
                fit=None if args.no_fit else "plain" if args.plain_fit else "robust",
                hit_threshold=(
                    args.hit_threshold
                    if args.hit_threshold is not None
                    else OmegaConf.select(cfg, "model.hit_mask.threshold", default=ASSIGNED)
                ),
                source=_source(args),
            )
        elapsed = time.perf_counter() - start
        print(
            f"{n} events of {data} ({args.split}) -> {args.out} in {elapsed:.1f} s ({n / elapsed:.0f} events/s)"
        )


if __name__ == "__main__":
    main()

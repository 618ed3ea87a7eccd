"""Export a trained tracker or hit filter to ONNX and check it with ONNX Runtime against torch:
`python -m muonreg.export (--run-id ID | --checkpoint PATH) --out model.onnx`.

What the graph holds: the whole network of `MaskFormer.forward` in eval mode (input
standardisation, encoder, mask-attention decoder, validity and hit-assignment heads, the
fit-refined assignment and the weighted-pooling regression with the in-network float64 track fit)
and the decoding of the regression into physical units. What it does not hold: the preparation of
the inputs from stored hits (`data.features.HitFeatures` scaling and derived features,
`data.geometry.HitGeometry`, `data.dataset.collate`; their settings are in the model's metadata),
the truth matching (training only) and the classical least-squares fit (`muonreg.reco.fit`).

Inputs (B events, M hits; both dynamic), as `collate` makes them:
    hit_x float32 [B, M, F], hit_x_valid bool [B, M, F], hit_valid bool [B, M],
    hit_geometry float32 [B, M, G], hit_geometry_valid bool [B, M]
Outputs of the tracker (Q queries):
    track_valid_logit float32 [B, Q], track_hit_logit float32 [B, Q, M],
    track_eta, track_phi, track_pt, track_q float32 [B, Q]  (pT in GeV, q = +-1)
    track_sigma_qpt, track_sigma_eta, track_sigma_phi float32 [B, Q]  their per-track uncertainties
        (q/pT in 1/GeV, phi in rad; muonreg.tasks.uncertainty), where the network has the track fit
Output of the hit filter (model=hit_filter), for a trigger or a reconstruction to cut on:
    hit_probability float32 [B, M]; its working points' cuts, set on its validation split, are in
    the metadata (`muonreg.filter_cuts`: {efficiency: cut}); keep the hits at or above a cut.
The filter's graph sorts the hits with ONNX's (unstable) sort: two real hits never share a key.

The graph computes what torch computes, with two float64 substitutions ONNX forces (`tasks.portable`:
a closed-form 3x3 solve, and atan/asinh/tan/cosh from operations ONNX Runtime has in float64),
both within a few units in the last place of torch's. The check runs real events through both
(a batch of the test split, an event cut to its first hit, the event with the most hits) and
reports the largest differences. Logits must agree within LOGIT_ATOL; track parameters within
their tolerances for all but CHECK_OUTLIERS of the tracks: float32 kernels differ in the last bits,
and where a decision is discontinuous (a hit exactly at the assignment threshold, the sign of the
curvature of a track fitted to no real hits) such bits can flip it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from muonreg.data.dataset import MuonEventDataset, collate
from muonreg.data.format import DatasetReader
from muonreg.data.geometry import GEOMETRY
from muonreg.data.schema import HIT_FEATURES
from muonreg.errors import UserError, exit_on_user_errors, root_cause
from muonreg.models import HitFilter, MaskFormer
from muonreg.tasks.uncertainty import UNCERTAIN
from muonreg.tracking.store import connect, default_tracking_uri
from muonreg.trained import add_source_arguments, atomic_output, checkpoint_file, load_model
from muonreg.training.setup import dataset_path, hit_features, run_splits

INPUTS = ("hit_x", "hit_x_valid", "hit_valid", "hit_geometry", "hit_geometry_valid")
PARAMETERS = ("eta", "phi", "pt", "q")
OUTPUTS = ("track_valid_logit", "track_hit_logit", *(f"track_{f}" for f in PARAMETERS))
SIGMA_OUTPUTS = tuple(f"track_sigma_{f}" for f in UNCERTAIN)  # where the model has a track fit
LOGIT_ATOL = 1e-4
# (absolute, relative) tolerance of each parameter; pT compared as the curvature 1/pT [1/GeV] (the
# space it is regressed and fitted in: a track fitted to 1 hit has pT 2800 +- 1.5 GeV, 1/pT +- 2e-7);
# the uncertainties relative to themselves
PARAMETER_TOL = {
    "eta": (1e-4, 0.0),
    "phi": (1e-4, 0.0),
    "pt": (1e-6, 1e-4),
    "q": (0.0, 0.0),
    **{f"sigma_{f}": (0.0, 1e-4) for f in UNCERTAIN},
}
CHECK_OUTLIERS = 0.01  # the share of tracks whose parameters may differ more (discontinuities)
FILTER_OUTPUTS = ("hit_probability",)
PROBABILITY_ATOL = 1e-5  # the filter's hit probabilities, ONNX Runtime against torch
FILTER_CHECK_EVENTS = 8  # filter events are thousands of hits: a few are a real check
OPSET = 20


class ExportError(UserError, RuntimeError):
    """The exported graph disagrees with torch, or cannot be written."""


def output_names(model: MaskFormer) -> tuple[str, ...]:
    """OUTPUTS, and SIGMA_OUTPUTS where the model gives per-track uncertainties."""
    return OUTPUTS + (SIGMA_OUTPUTS if model.regression_task.uncertainty is not None else ())


class OnnxGraph(nn.Module):
    """A network with the tensor inputs of INPUTS (as `collate` makes them) and named outputs (`names`)."""

    names: tuple[str, ...]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(
        self,
        hit_x: torch.Tensor,
        hit_x_valid: torch.Tensor,
        hit_valid: torch.Tensor,
        hit_geometry: torch.Tensor,
        hit_geometry_valid: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        batch = dict(
            zip(INPUTS, (hit_x, hit_x_valid, hit_valid, hit_geometry, hit_geometry_valid), strict=True)
        )
        return self.outputs(batch)

    def outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class OnnxTracker(OnnxGraph):
    """The tracker with the outputs ONNX users want (logits, physical parameters and their
    uncertainties): `output_names(model)`."""

    def __init__(self, model: MaskFormer):
        super().__init__(model)
        self.names = output_names(model)

    def outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outputs = self.model(batch)
        physical = self.model.regression_task.predict(outputs)
        physical |= {f"track_{f}": physical[f"track_truthMuon_{f}"] for f in PARAMETERS}
        return tuple(outputs[name] if name in outputs else physical[name] for name in self.names)


class OnnxHitFilter(OnnxGraph):
    """The hit filter: every hit's muon probability."""

    names = FILTER_OUTPUTS

    def outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (self.model.predict(self.model(batch)),)


def graph(model: MaskFormer | HitFilter) -> OnnxTracker | OnnxHitFilter:
    """The exported graph of a network, in eval mode (dropout off, no "exporting in training mode")."""
    return (OnnxHitFilter(model) if isinstance(model, HitFilter) else OnnxTracker(model)).eval()


def export_onnx(
    model: MaskFormer | HitFilter, cfg: DictConfig, sample: dict[str, torch.Tensor], out: Path
) -> None:
    """Trace the network on `sample` (a collated batch of at least 2 events and 2 hits) and write
    one self-contained .onnx file, with the input preparation settings in its metadata."""
    import onnx

    wrapper = graph(model)
    batch, hits = torch.export.Dim("batch", min=1), torch.export.Dim("hits", min=1)
    dims = {name: {0: batch, 1: hits} for name in INPUTS}
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            tuple(sample[k] for k in INPUTS),
            dynamo=True,
            dynamic_shapes=dims,
            input_names=list(INPUTS),
            output_names=list(wrapper.names),
            opset_version=OPSET,
            verbose=False,
        )
    proto = program.model_proto
    features = hit_features(cfg, HIT_FEATURES, "the export's metadata")
    meta = {  # what preparing the inputs from stored hits needs (HitFeatures, HitGeometry)
        "muonreg.hit_features": json.dumps(features.names),
        "muonreg.hit_scales": json.dumps({k: v for k, v in features.scales.items() if k in features.names}),
        "muonreg.missing_sentinels": json.dumps(features.missing_sentinels.tolist()),
        "muonreg.geometry": json.dumps(list(GEOMETRY)),
        "muonreg.outputs": json.dumps(list(wrapper.names)),
        "muonreg.config": OmegaConf.to_yaml(cfg),
    }
    if isinstance(model, HitFilter):
        meta["muonreg.filter_cuts"] = json.dumps({f"{wp:g}": cut for wp, cut in model.stored_cuts().items()})
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.save_model(proto, str(out))
    except (OSError, ValueError) as err:
        raise ExportError(f"{out}: cannot write the ONNX model ({root_cause(err)})") from err


def check_batches(cfg: DictConfig, data: str | Path, size: int = 64) -> list[tuple[str, dict]]:
    """Real events to compare on: a batch of the run's test split (val if it has no test events),
    its first event cut to its first hit, and the dataset's event with the most hits."""
    reader = DatasetReader(data, required_track_features=())
    splits = run_splits(cfg, len(reader))
    indices = splits["test"] if len(splits["test"]) else splits["val"]
    features = hit_features(cfg, reader.hit_features, f"dataset {reader.path}")
    dataset = MuonEventDataset(reader, features, [], int(cfg.data.max_particles))
    one = dict(dataset[int(indices[0])])
    for key in ("hit_x", "hit_x_valid", "hit_geometry", "hit_geometry_valid"):
        one[key] = one[key][:1]
    one["particle_hit_valid"] = one["particle_hit_valid"][:, :1]
    largest = int(np.argmax(reader.num_hits()))
    return [
        (f"{min(size, len(indices))} test events", collate([dataset[int(i)] for i in indices[:size]])),
        ("an event cut to 1 hit", collate([one])),
        (f"the largest event ({reader.num_hits()[largest]} hits)", collate([dataset[largest]])),
    ]


def ort_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _differences(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], hit_valid: np.ndarray
) -> dict[str, np.ndarray]:
    """|onnx - torch| of each output (hit logits on real hits only; pT as 1/pT, see PARAMETER_TOL)."""
    diff = {name: np.abs(r.astype(np.float64) - got[name]) for name, r in ref.items()}
    diff["track_hit_logit"] = np.where(hit_valid[:, None, :], diff["track_hit_logit"], 0.0)
    diff["track_pt"] = np.abs(1 / ref["track_pt"].astype(np.float64) - 1 / got["track_pt"])
    return diff


def _track_agrees(diff: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
    """[B, Q]: every output of the track (event, query) is within tolerance."""
    ok = (diff["track_valid_logit"] <= LOGIT_ATOL) & (diff["track_hit_logit"] <= LOGIT_ATOL).all(-1)
    for name in ref.keys() - {"track_valid_logit", "track_hit_logit"}:
        f = name.removeprefix("track_")
        atol, rtol = PARAMETER_TOL[f]
        r = ref[name].astype(np.float64)
        ok &= diff[name] <= atol + rtol * np.abs(1 / r if f == "pt" else r)
    return ok


def compare_filter(model: HitFilter, path: Path, batches: Sequence[tuple[str, dict]]) -> dict:
    """Every batch through torch and ONNX Runtime: the largest difference of the hit probabilities,
    and how many hits a stored cut would keep differently. ExportError when more than
    CHECK_OUTLIERS of the hits differ by more than PROBABILITY_ATOL."""
    session, wrapper = ort_session(path), OnnxHitFilter(model)
    report: dict = {"batches": {}, "seconds": {"torch": 0.0, "onnxruntime": 0.0}, "events": 0}
    hits = beyond = 0
    for what, batch in batches:
        start = time.perf_counter()
        with torch.no_grad():
            (ref,) = (t.numpy() for t in wrapper(*(batch[k] for k in INPUTS)))
        report["seconds"]["torch"] += time.perf_counter() - start
        start = time.perf_counter()
        (got,) = session.run(list(FILTER_OUTPUTS), {k: batch[k].numpy() for k in INPUTS})
        report["seconds"]["onnxruntime"] += time.perf_counter() - start
        if not np.isfinite(got).all():
            raise ExportError(f"{path}: ONNX Runtime gives non-finite outputs on {what}")
        valid = batch["hit_valid"].numpy()
        diff = np.abs(ref.astype(np.float64) - got)[valid]
        flips = {
            f"{wp:g}": int(((ref >= cut) != (got >= cut))[valid].sum())
            for wp, cut in model.stored_cuts().items()
        }
        report["events"] += len(valid)
        report["batches"][what] = {
            "max_abs_diff": {"hit_probability": float(diff.max(initial=0.0))},
            "hits": int(valid.sum()),
            "hits_beyond_tolerance": int((diff > PROBABILITY_ATOL).sum()),
            "kept_differently_at_cut": flips,
            "judged": True,
        }
        hits, beyond = hits + int(valid.sum()), beyond + int((diff > PROBABILITY_ATOL).sum())
    report.update(
        judged="hit probabilities",
        checked=hits,
        beyond_tolerance=beyond,
        tolerance={"probability": PROBABILITY_ATOL, "outliers": CHECK_OUTLIERS},
    )
    if beyond > CHECK_OUTLIERS * hits:
        raise ExportError(
            f"{path}: {beyond} of {hits} hit probabilities differ from torch by more than {PROBABILITY_ATOL}: "
            f"{report['batches']}"
        )
    return report


def compare(model: MaskFormer, path: Path, batches: Sequence[tuple[str, dict]]) -> dict:
    """Run every batch through torch and ONNX Runtime: the largest differences per batch and the
    tracks (event, query) with any output beyond tolerance. The event cut to 1 hit is reported but
    not judged: a track of one drift circle has no side, so float32 rounding may pick either (it
    must run and be finite). ExportError when more than CHECK_OUTLIERS of the judged tracks differ."""
    session, wrapper = ort_session(path), OnnxTracker(model)
    report: dict = {"batches": {}, "seconds": {"torch": 0.0, "onnxruntime": 0.0}, "events": 0}
    tracks = beyond = 0
    for what, batch in batches:
        start = time.perf_counter()
        with torch.no_grad():
            ref = dict(
                zip(wrapper.names, (t.numpy() for t in wrapper(*(batch[k] for k in INPUTS))), strict=True)
            )
        report["seconds"]["torch"] += time.perf_counter() - start
        start = time.perf_counter()
        got = dict(
            zip(
                wrapper.names,
                session.run(list(wrapper.names), {k: batch[k].numpy() for k in INPUTS}),
                strict=True,
            )
        )
        report["seconds"]["onnxruntime"] += time.perf_counter() - start
        if not all(np.isfinite(g).all() for g in got.values()):
            raise ExportError(f"{path}: ONNX Runtime gives non-finite outputs on {what}")
        diff = _differences(ref, got, batch["hit_valid"].numpy())
        ok = _track_agrees(diff, ref)
        judged = batch["hit_valid"].shape[1] > 1
        report["events"] += len(ok)
        report["batches"][what] = {
            "max_abs_diff": {name: float(d.max(initial=0.0)) for name, d in diff.items()},
            "tracks": ok.size,
            "tracks_beyond_tolerance": int((~ok).sum()),
            "judged": judged,
        }
        if judged:
            tracks, beyond = tracks + ok.size, beyond + int((~ok).sum())
    report.update(
        judged="tracks",
        checked=tracks,
        beyond_tolerance=beyond,
        tolerance={"logits": LOGIT_ATOL, "parameters (abs, rel)": PARAMETER_TOL, "outliers": CHECK_OUTLIERS},
    )
    if beyond > CHECK_OUTLIERS * tracks:
        raise ExportError(
            f"the ONNX model: {beyond} of {tracks} tracks differ from torch beyond the tolerances "
            f"(logits {LOGIT_ATOL}, parameters {PARAMETER_TOL}): {report['batches']}"
        )
    return report


def export(
    checkpoint: str | Path, out: str | Path, data: str | Path | None = None, check_events: int = 64
) -> dict:
    """Export a checkpoint's network to `out` and check it on real events of `data` (by default the
    dataset it trained on); return the check's report."""
    out = Path(out)
    model, cfg = load_model(checkpoint, kind=None)
    if isinstance(model, HitFilter):
        batches = check_batches(cfg, data or dataset_path(cfg), min(check_events, FILTER_CHECK_EVENTS))
        export_onnx(model, cfg, batches[0][1], out)
        return compare_filter(model, out, batches)
    batches = check_batches(cfg, data or dataset_path(cfg), check_events)
    export_onnx(model, cfg, batches[0][1], out)
    return compare(model, out, batches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muonreg.export", description=__doc__.splitlines()[0])
    add_source_arguments(
        parser,
        "a checkpoint written by training (best.pt)",
        "an MLflow run whose best checkpoint to export; the .onnx is logged to it",
        model_uri=True,
    )
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument(
        "--data", type=Path, help="dataset for the check (default: the one the run trained on)"
    )
    parser.add_argument(
        "--check-events", type=int, default=64, help="test-split events to check on (one batch)"
    )
    args = parser.parse_args(argv)
    with exit_on_user_errors():
        uri = args.tracking_uri or default_tracking_uri()
        with (
            atomic_output(args.out, "the ONNX model") as partial,  # before anything is read or exported
            checkpoint_file(args.checkpoint, args.run_id, uri, args.model_uri) as path,
        ):
            report = export(path, partial, args.data, args.check_events)
        print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB, opset {OPSET}")
        print(
            f"checked with ONNX Runtime against torch on {report['events']} events: "
            f"{report['beyond_tolerance']} of {report['checked']} judged {report['judged']} beyond tolerance "
            f"(allowed {CHECK_OUTLIERS:.0%}); torch {report['seconds']['torch']:.2f} s, "
            f"onnxruntime {report['seconds']['onnxruntime']:.2f} s"
        )
        for what, part in report["batches"].items():
            diffs = ", ".join(f"{k.removeprefix('track_')} {v:.2g}" for k, v in part["max_abs_diff"].items())
            note = "" if part["judged"] else " (not judged)"
            unit = " (pt: of 1/pT in 1/GeV)" if report["judged"] == "tracks" else ""
            print(f"  {what}: max |onnx - torch| {diffs}{unit}{note}")
        if args.run_id:
            client = connect(uri)
            client.log_artifact(args.run_id, str(args.out), "onnx")
            client.log_text(args.run_id, json.dumps(report, indent=1), "onnx/check.json")
            print(f"logged to run {args.run_id} as onnx/{args.out.name}")


if __name__ == "__main__":
    main()

"""Every run's best network as an MLflow model, so that anyone with the run id can predict:

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")     # or "models:/<name>/<version>"
    out = model.predict({"hits": hits, "num_hits": num_hits})

Input, exactly as the dataset's HDF5 files store events: `hits` float32 [B, M, C], the stored hit
columns in the training dataset's order (the model's metadata `hit_columns`; the hepattn layout's
20 by default), NaN-padded past each event's hits, and `num_hits` int64 [B]. Everything after that
(feature scaling and derived features, missing-value masks, the fit's geometry, standardisation,
target decoding) is inside. Output of a tracker, per event and query: `valid_probability` [B, Q],
`hit_probability` [B, Q, M] (0 past the event's hits), `eta`, `phi`, `pt` (GeV), `q` [B, Q] and
their per-track uncertainties `sigma_qpt` (1/GeV), `sigma_eta`, `sigma_phi` (rad) [B, Q], as
`muonreg.predict` writes them. Output of a hit filter (model=hit_filter): `hit_probability`
[B, M] and, for each working point whose cut it stores (set on its validation split), `kept_wp<e>`
[B, M], the hits at or above that cut (the model's metadata `filter_cuts`). The model is the
run's weights and config only (a slim copy of best.pt, no optimiser state) and needs muonreg
installed where it is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from muonreg.data.dataset import collate
from muonreg.data.features import HitFeatures
from muonreg.data.geometry import HitGeometry
from muonreg.evaluation.filter_metrics import working_point_name
from muonreg.evaluation.inference import SIGMAS, filter_probability, infer
from muonreg.evaluation.metrics import FIELDS
from muonreg.models import HitFilter, MaskFormer
from muonreg.tracking.store import no_progress_bars
from muonreg.trained import load_model, read_checkpoint
from muonreg.training.setup import hit_features

ARTIFACT = "model"  # runs:/<id>/model
OUTPUTS = ("valid_probability", "hit_probability", *FIELDS, *SIGMAS)


class RunModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour's wrapper: raw stored hits in, per-query (or, for a hit filter, per-hit)
    predictions out."""

    # MLflow wraps a subclass's predict for type-hint validation and, finding no hints, warns at
    # every run's end; ours has none on purpose (predict says why). MLflow's own switch for that.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        path = context.artifacts["checkpoint"]
        state, _ = read_checkpoint(path)
        self.columns = list(state["metadata"]["hit_columns"])
        self.model, self.cfg = load_model(path, self.columns, kind=None)
        self.features = hit_features(self.cfg, self.columns, f"MLflow model {path}")
        self.geometry = HitGeometry(self.columns)

    def predict(self, context, model_input, params=None):
        """`model_input`: {"hits", "num_hits"} (module doc). Not type-hinted: MLflow reads a hint as
        its input schema and warns on a dict; the signature states the schema instead."""
        return predict_hits(
            self.model, self.features, self.geometry, model_input["hits"], model_input["num_hits"]
        )


def predict_hits(
    model: MaskFormer | HitFilter,
    features: HitFeatures,
    geometry: HitGeometry,
    hits: np.ndarray,
    num_hits: np.ndarray,
) -> dict[str, np.ndarray]:
    """Predictions of events given as stored (hits [B, M, C] NaN-padded, num_hits [B]): per query
    for a tracker, per hit for a hit filter."""
    slots = 1 if isinstance(model, HitFilter) else model.num_queries
    events = []
    for row, n in zip(hits, np.asarray(num_hits).astype(int), strict=True):
        event = row[:n]
        x, x_valid = features(event)
        g, g_valid = geometry(event)
        events.append(
            {
                "hit_x": x,
                "hit_x_valid": x_valid,
                "hit_geometry": g,
                "hit_geometry_valid": g_valid,
                "particle_valid": np.zeros(slots, bool),  # no truth: collate's slots stay empty
                "particle_hit_valid": np.zeros((slots, n), bool),
            }
        )
    width = hits.shape[1]  # pad the hit axis back to the input's
    if isinstance(model, HitFilter):
        probability = filter_probability(model, collate(events), torch.device("cpu")).numpy()
        probability = np.pad(probability, ((0, 0), (0, width - probability.shape[1])))
        kept = {
            f"kept_{working_point_name(wp)}": probability >= cut for wp, cut in model.stored_cuts().items()
        }
        return {"hit_probability": probability, **kept}
    preds = infer(model, collate(events), torch.device("cpu"))
    out = {k: v.numpy() for k, v in preds.items()}
    out["hit_probability"] = np.pad(
        out["hit_probability"], ((0, 0), (0, 0), (0, width - out["hit_probability"].shape[2]))
    )
    return out


def signature(columns: int, filter_cuts: dict[float, float] | None = None) -> ModelSignature:
    """The tracker's signature, or with `filter_cuts` a hit filter's (its stored working points)."""
    inputs = Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1, -1, columns), "hits"),
            TensorSpec(np.dtype(np.int64), (-1,), "num_hits"),
        ]
    )
    if filter_cuts is not None:
        specs = [TensorSpec(np.dtype(np.float32), (-1, -1), "hit_probability")]
        specs += [
            TensorSpec(np.dtype(bool), (-1, -1), f"kept_{working_point_name(wp)}") for wp in filter_cuts
        ]
        return ModelSignature(inputs=inputs, outputs=Schema(specs))
    outputs = Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1, -1, -1) if k == "hit_probability" else (-1, -1), k)
            for k in OUTPUTS
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def save_model(
    checkpoint: str | Path, columns: Sequence[str], out: str | Path, example: dict | None = None
) -> Path:
    """Write the MLflow model of a checkpoint (a tracker or a hit filter) to the directory `out`
    (which must not exist); `example`: an input example (a few events as stored) kept with it."""
    state, _ = read_checkpoint(checkpoint)
    model, _ = load_model(checkpoint, columns, kind=None)
    cuts = model.stored_cuts() if isinstance(model, HitFilter) else None
    extra = {} if cuts is None else {"filter_cuts": {f"{wp:g}": cut for wp, cut in cuts.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / "best.pt"
        metadata = {"config": state["metadata"]["config"], "hit_columns": list(columns)}
        torch.save({"model": state["model"], "metadata": metadata}, slim)
        with _quiet_mlflow():
            mlflow.pyfunc.save_model(
                path=str(out),
                python_model=RunModel(),
                artifacts={"checkpoint": str(slim)},
                signature=signature(len(columns), cuts),
                input_example=example,
                pip_requirements=_requirements(),  # stated, not inferred: inference loads the model again
                metadata={
                    "hit_columns": list(columns),
                    "muonreg": "README: Using a trained tracker",
                    **extra,
                },
            )
    return Path(out)


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Saving logs a warning about pickling (the wrapper holds no state: it loads the checkpoint),
    an info line and a progress bar per run; a training run's summary should be its last words."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with no_progress_bars():
            yield
    finally:
        logger.setLevel(level)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("muonreg", "torch", "mlflow", "numpy", "h5py", "omegaconf", "scipy"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def stored_events(reader, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Events of a DatasetReader as the model's input: hits NaN-padded to the longest, num_hits."""
    hits = [reader.read(int(i)).hits for i in indices]
    padded = np.full((len(hits), max(len(h) for h in hits), hits[0].shape[1]), np.nan, np.float32)
    for row, h in zip(padded, hits, strict=True):
        row[: len(h)] = h
    return {"hits": padded, "num_hits": np.array([len(h) for h in hits], np.int64)}

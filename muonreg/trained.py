"""A trained model from a checkpoint or an MLflow run: what evaluate, predict, export and the MLflow
model all load, so each tool finds runs, checks them and rebuilds the network the same way.

The checkpoint carries the resolved config; the network is rebuilt from it and its weights (input
standardisation, target normalisation and the per-track uncertainties' calibration are buffers, so
they come with the weights; a checkpoint from before that calibration gives the fit's own errors).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from torch import nn

from muonreg.config import is_hit_filter  # also registers the ${muonreg.root:} resolver of stored configs
from muonreg.data.schema import HIT_FEATURES
from muonreg.errors import UserError, root_cause
from muonreg.models import HitFilter, MaskFormer
from muonreg.tracking.liveness import process_died
from muonreg.tracking.store import TrackingError, connect, default_tracking_uri, no_progress_bars
from muonreg.training.checkpoint import load_checkpoint
from muonreg.training.setup import build_model, hit_features

BEST = "checkpoints/best.pt"


class CheckpointError(UserError, ValueError):
    """A file given as a checkpoint is missing or is not one that training wrote."""


def finished_run(client: MlflowClient, run_id: str, uri: str) -> None:
    """Check that `run_id` is a FINISHED run of the store: only those have a best checkpoint for sure."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise TrackingError(f"MLflow store {uri} holds no run {run_id!r} ({err.message})") from err
    if run.info.status == "FINISHED":
        return
    status = "DEAD (RUNNING, but its process died)" if process_died(run) else run.info.status
    run_dir = run.data.tags.get("muonreg.run_dir")
    instead = (
        f"evaluate its latest checkpoint with --checkpoint {run_dir}/checkpoints/last.pt"
        if run_dir
        else "finish it first (python train.py ... resume=auto)"
    )
    raise TrackingError(f"MLflow run {run_id} is {status}, not FINISHED; {instead}")


def download_best(run_id: str, uri: str, dst: str | Path) -> Path:
    """The best checkpoint of a FINISHED run of the store at `uri`, downloaded into `dst`."""
    finished_run(connect(uri), run_id, uri)
    mlflow.set_tracking_uri(uri)
    try:
        with no_progress_bars():
            return Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=BEST, dst_path=str(dst))
            )
    except (MlflowException, OSError) as err:  # e.g. a run made with tracking.log_checkpoint=false
        raise TrackingError(f"MLflow run {run_id} has no {BEST} artifact to use ({root_cause(err)})") from err


def add_source_arguments(
    parser: argparse.ArgumentParser, checkpoint: str, run_id: str, model_uri: bool = False
) -> None:
    """--checkpoint PATH | --run-id ID [| --model-uri URI] (one required) and --tracking-uri."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help=checkpoint)
    source.add_argument("--run-id", help=run_id)
    if model_uri:
        source.add_argument(
            "--model-uri", help="an MLflow model of a run: models:/NAME/VERSION or runs:/ID/model"
        )
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else the project database)"
    )


@contextlib.contextmanager
def checkpoint_file(
    checkpoint: str | Path | None,
    run_id: str | None,
    tracking_uri: str | None = None,
    model_uri: str | None = None,
) -> Iterator[Path]:
    """The checkpoint given, the best one of an MLflow run, or the one inside an MLflow model of a
    run (muonreg.tracking.model); downloaded for the duration."""
    if run_id is None and model_uri is None:
        yield Path(checkpoint)
        return
    uri = tracking_uri or default_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        if run_id is not None:
            yield download_best(run_id, uri, tmp)
            return
        connect(uri)
        mlflow.set_tracking_uri(uri)
        try:
            with no_progress_bars():
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        except (MlflowException, OSError) as err:
            raise TrackingError(f"MLflow model {model_uri} in {uri}: {root_cause(err)}") from err
        yield local / "artifacts" / "best.pt"


def read_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """(state, resolved config) of a checkpoint written by training; a one-line error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = load_checkpoint(path)
        return state, OmegaConf.create(state["metadata"]["config"])
    except Exception as err:  # a truncated file, another pickle, a checkpoint of something else
        raise CheckpointError(
            f"{path}: not a checkpoint written by muonreg training ({type(err).__name__}: {root_cause(err)})"
        ) from err


def load_model(
    path: str | Path, columns: Sequence[str] = HIT_FEATURES, kind: type[nn.Module] | None = MaskFormer
) -> tuple[MaskFormer | HitFilter, DictConfig]:
    """The network of a checkpoint (eval mode, on the CPU) and its config.

    `columns`: the stored hit columns of the data it will see (the feature list is checked against
    them); the schema's by default, which is all a network that is not fed from a dataset needs.
    `kind`: the network the caller needs (the tracker, or the HitFilter; None: either); another is a
    one-line error.
    """
    state, cfg = read_checkpoint(path)
    if kind is not None and (kind is HitFilter) != is_hit_filter(cfg):
        trained = "hit filter (model=hit_filter)" if is_hit_filter(cfg) else "tracker"
        raise CheckpointError(f"{path}: a checkpoint of the {trained}, but this needs a {kind.__name__}")
    model = build_model(cfg, hit_features(cfg, columns, f"checkpoint {path}"))
    model.load_state_dict(state["model"])
    return model.eval(), cfg


@contextlib.contextmanager
def atomic_output(out: Path, what: str) -> Iterator[Path]:
    """A temporary path beside `out`, made at once (so a destination that cannot be written fails
    before any work), renamed to `out` once the block completes, removed if it does not."""
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        partial.touch()
    except OSError as err:
        raise UserError(f"{out}: cannot write {what} there ({err.strerror or err})") from err
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)

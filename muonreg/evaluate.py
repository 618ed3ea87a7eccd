"""Evaluate a trained model on a split: `python -m muonreg.evaluate --checkpoint PATH | --run-id ID`.

Rebuilds data and model from the configuration stored in the checkpoint, evaluates (efficiency,
fake rate, hit efficiency and purity, residuals and resolutions, in bins of pT and |eta|) beside
the least-squares fit of the same muons and the diagnostics (truth assignment, fits of the
assigned hits), and writes tables and plots. A hit-filter checkpoint (model=hit_filter) gets the
filter's evaluation instead (ROC, AUC, working points, per technology and |eta| region). With
`--run-id` the best checkpoint is fetched from that MLflow run and the report is logged back to it.
`--set KEY=VALUE ...` changes the stored configuration for this evaluation only, e.g.
`--set evaluation.precision=bf16` to see what bf16 inference does to the physics.
`--hit-threshold P` evaluates the tracker at another working point of its hit assignment (a hit is
the track's at probability >= P) and names its metrics `<split>_hit<P>/...`, beside the run's own.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import mlflow
import yaml
from omegaconf import DictConfig, OmegaConf

from muonreg.config import is_hit_filter, project_root
from muonreg.errors import UserError, exit_on_user_errors
from muonreg.evaluation.filter_evaluation import filter_evaluation
from muonreg.evaluation.full import full_evaluation
from muonreg.tracking.store import default_tracking_uri
from muonreg.trained import add_source_arguments, checkpoint_file, read_checkpoint
from muonreg.training.device import allow_tf32, evaluation_dtype, resolve_device
from muonreg.training.setup import (
    EVALUATION_SETS,
    build_data,
    build_model,
    eval_loader,
    evaluation_sets,
    set_evaluation,
)

MISSING_KEY = object()


def evaluate_checkpoint(
    checkpoint: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    device: str = "auto",
    reference: bool = True,
    hit_threshold: float | None = None,
    overrides: Sequence[str] = (),
) -> tuple[dict[str, float], Path]:
    """Evaluate a checkpoint written by training; return (metrics, report directory)."""
    state, cfg = read_checkpoint(checkpoint)
    cfg = with_overrides(with_evaluation_sets(cfg), overrides)
    prefix = metric_prefix(split, hit_threshold, overrides)
    if hit_threshold is not None:
        if is_hit_filter(cfg) or not 0 < hit_threshold < 1:
            raise UserError(
                f"--hit-threshold {hit_threshold}: a tracker's hit probability strictly between 0 and 1"
            )
        OmegaConf.update(cfg, "model.hit_mask.threshold", hit_threshold, force_add=True)
    data = build_data(cfg)
    model = build_model(cfg, data.features)
    model.load_state_dict(state["model"])
    dev = resolve_device(device)
    allow_tf32(dev, cfg.trainer.tf32)  # as the run's own evaluation had it
    model.to(dev)
    if split in EVALUATION_SETS:
        sets = {} if is_hit_filter(cfg) else evaluation_sets(cfg, data)
        if split not in sets:
            raise UserError(
                f"--split {split}: this run has no {split} set (a hit filter, or not simulated data)"
            )
        dataset, evaluation = sets[split], set_evaluation(cfg, split)
    else:
        dataset, evaluation = data.datasets[split], cfg.evaluation
    loader = eval_loader(cfg, dataset, dev)
    report = Path(out) if out else Path(checkpoint).resolve().parent.parent / f"evaluation-{prefix}"
    evaluation = OmegaConf.merge(evaluation, {"fit_reference": reference and cfg.evaluation.fit_reference})
    if not reference:
        evaluation.assigned_fit_events = 0
    if is_hit_filter(cfg):
        metrics, text = filter_evaluation(
            model,
            loader,
            dataset,
            dev,
            evaluation_dtype(dev, cfg),
            list(cfg.model.working_points),
            list(cfg.evaluation.eta_bins),
            report,
            prefix=split,
        )
        print(text)
        return metrics, report
    metrics, text = full_evaluation(
        model,
        loader,
        dataset,
        dev,
        evaluation_dtype(dev, cfg),
        evaluation,
        cfg.paths.data,
        report,
        prefix=prefix,
    )
    print(text)
    return metrics, report


def with_evaluation_sets(cfg: DictConfig) -> DictConfig:
    """The stored configuration, with conf/train.yaml's evaluation sets where the run predates them."""
    defaults = OmegaConf.load(project_root() / "conf" / "train.yaml").evaluation
    for name in EVALUATION_SETS:
        if OmegaConf.select(cfg, f"evaluation.{name}") is None:
            OmegaConf.update(cfg, f"evaluation.{name}", defaults[name], force_add=True)
    return cfg


def with_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The stored configuration with `key=value` changes (values in YAML); an unknown key is a UserError."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or OmegaConf.select(cfg, key, default=MISSING_KEY) is MISSING_KEY:
            raise UserError(f"--set {override!r}: expected KEY=VALUE with KEY in the run's configuration")
        try:
            OmegaConf.update(cfg, key, yaml.safe_load(value))
        except yaml.YAMLError as err:
            raise UserError(f"--set {override!r}: the value is not valid YAML ({err.problem})") from err
    return cfg


def metric_prefix(split: str, hit_threshold: float | None, overrides: Sequence[str] = ()) -> str:
    """`test`; `test_hit0.7` at another working point, `test_trainer.precision-bf16` with a changed
    configuration: such metrics stand beside the run's own instead of replacing them."""
    prefix = split if hit_threshold is None else f"{split}_hit{hit_threshold:g}"
    return "_".join([prefix, *(o.replace("=", "-") for o in overrides)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muonreg.evaluate", description=__doc__.splitlines()[0])
    add_source_arguments(
        parser,
        "a checkpoint written by training (best.pt or last.pt)",
        "an MLflow run whose best checkpoint to evaluate; the report is logged to it",
    )
    parser.add_argument("--split", choices=("train", "val", "test", *EVALUATION_SETS), default="test")
    parser.add_argument("--out", type=Path, help="report directory (default: beside the checkpoint)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-reference", action="store_true", help="skip the least-squares fit reference")
    parser.add_argument(
        "--hit-threshold",
        type=float,
        help="working point of the tracker's hit assignment (default: the run's model.hit_mask.threshold)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change the run's stored configuration for this evaluation, e.g. evaluation.precision=bf16",
    )
    args = parser.parse_args(argv)
    with exit_on_user_errors():
        _evaluate(args)


def _evaluate(args: argparse.Namespace) -> None:
    if args.run_id:
        uri = args.tracking_uri or default_tracking_uri()
        with checkpoint_file(None, args.run_id, uri) as path:
            report_dir = args.out or path.parent.parent / "report"
            metrics, report = evaluate_checkpoint(
                path,
                args.split,
                report_dir,
                args.device,
                not args.no_reference,
                args.hit_threshold,
                args.set,
            )
            name = f"evaluation-{metric_prefix(args.split, args.hit_threshold, args.set)}"
            with mlflow.start_run(run_id=args.run_id):
                mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
                mlflow.log_artifacts(str(report), name)
            if args.out is None:
                print(f"report logged to run {args.run_id} as {name}/")
    else:
        metrics, report = evaluate_checkpoint(
            args.checkpoint,
            args.split,
            args.out,
            args.device,
            not args.no_reference,
            args.hit_threshold,
            args.set,
        )
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.5g}")
    if args.out or not args.run_id:
        print(f"report: {report}")


if __name__ == "__main__":
    main()

"""`python -m muonreg.pipeline DIR`: the per-stage summary of the ATLAS chain that `make pipeline` runs.

Stages, each in DIR: `ntuples/` (ROOT hit dumps with pile-up) -> `filter_data/` (muonreg-prepare root)
-> `filter_run/` (the hit filter, model=hit_filter) -> `tracking_data/` (muonreg-prepare filter at the
filter's stored cut, on simulated events it never saw) -> `tracker_run/` (the tracker). The summary
reads what each stage wrote: dataset metadata, the runs' MLflow metrics (run.json names the run and
its store) and the tracker's resolution table (network beside the least-squares fit of the same
muons' truth hits).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from muonreg.data.format import DatasetReader
from muonreg.errors import UserError, exit_on_user_errors
from muonreg.evaluation.filter_metrics import working_point_name
from muonreg.reco.road_search import WORKING_POINTS as ROAD_WORKING_POINTS

STAGES = ("filter_data", "filter_run", "tracking_data", "tracker_run")


def run_metrics(run_dir: Path) -> dict[str, float]:
    """The final metrics of the training run in `run_dir` (its run.json names the MLflow run)."""
    record = json.loads((run_dir / "run.json").read_text())
    return MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"]).data.metrics


def dataset_lines(path: Path) -> list[str]:
    reader = DatasetReader(path)
    hits = reader.num_hits()
    return [f"{path.name}: {len(reader)} events, {hits.mean():.0f} hits per event (max {hits.max()})"]


def filter_lines(metrics: dict[str, float]) -> list[str]:
    lines = [
        f"hit filter, test split: AUC {metrics['test/auc']:.5f} (road search {metrics['test/road/auc']:.4f})"
    ]
    rows = [
        (f"filter {working_point_name(wp)[2:]}", f"test/{working_point_name(wp)}") for wp in (0.99, 0.995)
    ]
    rows += [(f"road >= {n} layers", f"test/road/layers{n}") for n in ROAD_WORKING_POINTS]
    for name, key in rows:
        if f"{key}/efficiency" not in metrics:
            continue
        lines.append(
            f"  {name:>18}: muon-hit efficiency {metrics[f'{key}/efficiency']:.4f}, purity "
            f"{metrics[f'{key}/purity']:.3f}, rejection {metrics[f'{key}/background_rejection']:.1f}, muons < 3 hits "
            f"{metrics[f'{key}/muons_lost']:.4f}, {metrics[f'{key}/hits_kept_per_event']:.0f} hits kept per event"
        )
    return lines


def tracking_data_lines(path: Path) -> list[str]:
    meta = yaml.safe_load((path / "metadata.yaml").read_text())["processing_parameters"]["hit_filter"]
    losses = meta["losses"]
    return [
        f"tracking set ({meta['cut_from']} cut {meta['threshold']:.4g}): {losses['events_written']} of "
        f"{losses['events_in']} events written, muon-hit efficiency {losses['muon_hit_efficiency']:.4f}, "
        f"background kept {losses['background_kept_fraction']:.4g}, muons lost (< 3 hits) "
        f"{losses['muons_lost_too_few_hits']} of {losses['muons_in']}, {losses['hits_written'] / max(losses['events_written'], 1):.0f} hits per event",
    ]


def tracker_lines(run_dir: Path, metrics: dict[str, float]) -> list[str]:
    lines = [
        f"tracker, test split: track efficiency {metrics['test/track_efficiency']:.3f}, fake rate "
        f"{metrics['test/fake_rate']:.3f}, hit efficiency {metrics['test/hit_efficiency']:.3f}, hit purity "
        f"{metrics['test/hit_purity']:.3f}"
    ]
    report = (run_dir / "evaluation" / "resolution.md").read_text().split("\n")
    start = next((i for i, line in enumerate(report) if line.startswith("### pT")), None)
    if start is not None:
        table = report[start + 2 :]
        lines += [
            "  " + line
            for line in table[: next((i for i, x in enumerate(table) if not x.strip()), len(table))]
        ]
    return lines


def summary(directory: str | Path) -> str:
    """What every stage of a pipeline directory produced, as text; a UserError names a missing stage."""
    directory = Path(directory)
    missing = [stage for stage in STAGES if not (directory / stage).exists()]
    if missing:
        raise UserError(f"{directory}: no {', '.join(missing)} (run `make pipeline` first)")
    lines = [f"== pipeline {directory}"]
    lines += dataset_lines(directory / "filter_data")
    lines += filter_lines(run_metrics(directory / "filter_run"))
    lines += tracking_data_lines(directory / "tracking_data")
    lines += tracker_lines(directory / "tracker_run", run_metrics(directory / "tracker_run"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muonreg.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="the pipeline directory (make pipeline's PIPELINE)")
    args = parser.parse_args(argv)
    with exit_on_user_errors():
        print(summary(args.directory))


if __name__ == "__main__":
    main()

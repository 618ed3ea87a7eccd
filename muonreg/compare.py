"""Compare the runs of a sweep from MLflow: `python -m muonreg.compare [--parent ID | --experiment NAME ...]`.

By default the latest sweep (the newest parent run made by a multirun). One row per combination
of the swept parameters, with the mean and spread over seeds of the key test metrics, and how
many of its runs FINISHED, FAILED, are still RUNNING, or are DEAD: RUNNING in MLflow, but their
process died without closing them (failed rows are shown, not dropped), and the best run by the
metric the runs optimised (`best/<optimized_metric>`: an Optuna search's best trial). Plots
show each metric against each numeric swept parameter. The report (Markdown, CSV, PNG) is
written to --out and logged to the sweep's parent run. Works on the SQLite store and on an
`mlflow server` alike (--tracking-uri or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from muonreg.config import project_root
from muonreg.errors import exit_on_user_errors
from muonreg.tracking.liveness import process_died
from muonreg.tracking.store import connect, default_tracking_uri

METRICS = (
    ("test/pt_resolution", "σ(pT)/pT core"),
    ("test/qpt_resolution", "σ(q/pT)·pT core"),
    ("test/pt_resolution_rms", "σ(pT)/pT RMS"),
    ("test/track_efficiency", "efficiency"),
    ("test/fake_rate", "fake rate"),
    ("test/hit_purity", "hit purity"),
    ("test/hit_efficiency", "hit efficiency"),
    ("test/charge_accuracy", "charge acc."),
    ("test/eta_resolution", "σ(η)"),
    ("test/phi_resolution_mrad", "σ(φ) mrad"),
    ("test/oracle_pt_resolution", "truth-assignment σ(pT)/pT"),
    ("test/robust_fit_pt_resolution", "robust fit of assigned hits σ(pT)/pT"),
    ("test/fit_pt_resolution", "LSQ fit σ(pT)/pT"),
    ("test/fit_qpt_resolution", "LSQ fit σ(q/pT)·pT"),
    ("test/fit_eta_resolution", "LSQ fit σ(η)"),
    ("test/fit_phi_resolution_mrad", "LSQ fit σ(φ) mrad"),
)
# Per pT bin (metrics <name>_pt<lo>_<hi>, see evaluation.report): the network beside the fit.
BINNED = (
    ("test/pt_resolution", "σ(pT)/pT"),
    ("ratio", "÷ LSQ fit"),
    ("test/oracle_pt_resolution", "truth assignment"),
    ("test/pt_bias", "bias"),
    ("test/charge_accuracy", "charge acc."),
    ("test/fit_pt_resolution", "LSQ fit"),
)
BIN = re.compile(r"^test/pt_resolution_(pt[0-9p]+_[0-9p]+)$")
REFERENCE = {"test/pt_resolution": "test/fit_pt_resolution", "test/qpt_resolution": "test/fit_qpt_resolution"}
PLOTTED = ("test/pt_resolution", "test/qpt_resolution", "test/track_efficiency", "test/hit_purity")
IGNORED_PARAMS = ("paths.", "tracking.", "resume")  # where a run logged, not what it computed
SEED = "seed"


def latest_sweep(client: MlflowClient) -> Run:
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments,
        filter_string="tags.`muonreg.role` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise SystemExit(
            "no sweep found in this MLflow store: run `python train.py -m ...` first, or give --experiment"
        )
    return found[0]


def select_runs(
    client: MlflowClient,
    parent: str | Sequence[str] | None = None,
    experiment: str | None = None,
    filter_string: str = "",
) -> tuple[list[Run], list[Run]]:
    """(the parent runs, none for an experiment or filter; the runs to compare). Several parents pool
    the children of sweeps that extend one study (more seeds, another value) into one table."""
    if parent is None and (experiment or filter_string):
        if experiment:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise SystemExit(f"no experiment named {experiment!r} in this MLflow store")
            ids = [found.experiment_id]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string)
        return [], [r for r in runs if r.data.tags.get("muonreg.role") != "sweep"]
    parents = [parent] if isinstance(parent, str) else list(parent or [])
    roots = [client.get_run(p) for p in parents] or [latest_sweep(client)]
    runs = []
    for root in roots:
        children_filter = f"tags.mlflow.parentRunId = '{root.info.run_id}'"
        if filter_string:
            children_filter += f" and {filter_string}"
        runs += client.search_runs([root.info.experiment_id], filter_string=children_filter)
    return roots, runs


def _title(roots: list[Run], selection: str) -> str:
    """The sweep's name; for pooled sweeps, how many and which (first 8 characters of each id)."""
    if not roots:
        return f"runs of {selection}"
    if len(roots) == 1:
        return roots[0].info.run_name
    return f"{len(roots)} sweeps pooled: " + ", ".join(r.info.run_id[:8] for r in roots)


def varied(runs: list[Run]) -> list[str]:
    """Params whose value differs between runs (what the sweep changed), seed last. A param only some
    runs have (one that a newer version of the code added) is not a difference between them."""
    keys = sorted({k for r in runs for k in r.data.params if not k.startswith(IGNORED_PARAMS)})
    out = [k for k in keys if len({r.data.params[k] for r in runs if k in r.data.params}) > 1 and k != SEED]
    return out + ([SEED] if len({r.data.params.get(SEED) for r in runs}) > 1 else [])


def pt_bins(runs: list[Run]) -> list[str]:
    """The pT bins the runs logged per-bin metrics for (pt5_10, ...), in increasing pT."""
    found = {m.group(1) for r in runs for k in r.data.metrics if (m := BIN.match(k))}
    return sorted(found, key=_bin_low)


def _bin_low(name: str) -> float:
    """The lower edge of a bin name: 5.0 for pt5_10."""
    return float(name[2:].split("_")[0].replace("p", "."))


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = float(np.mean(values)) if values else math.nan
    return mean, float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def table(runs: list[Run], swept: list[str]) -> list[dict]:
    """One row per combination of swept values (seeds pooled): statuses, mean and std of each metric,
    overall and per pT bin (`<metric>_<bin>`; `ratio_<bin>`: network over LSQ fit, per run)."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    keys = [k for k in swept if k != SEED]
    for run in runs:
        groups[tuple(run.data.params.get(k, "") for k in keys)].append(run)
    bins = pt_bins(runs)
    rows = []
    for values, members in sorted(groups.items()):
        status = defaultdict(int)
        for run in members:
            status["DEAD" if process_died(run) else run.info.status] += 1
        done = [r.data.metrics for r in members if r.info.status == "FINISHED"]
        row = {
            **dict(zip(keys, values, strict=True)),
            "runs": len(members),
            "status": ", ".join(f"{n} {s}" for s, n in sorted(status.items())),
        }
        names = [m for m, _ in METRICS] + [f"{m}_{b}" for m, _ in BINNED if m != "ratio" for b in bins]
        for name in names:
            row[name], row[f"{name} std"] = _mean_std([m[name] for m in done if name in m])
        for b in bins:
            net, fit = f"test/pt_resolution_{b}", f"test/fit_pt_resolution_{b}"
            ratios = [m[net] / m[fit] for m in done if net in m and m.get(fit, 0) > 0]
            row[f"ratio_{b}"], row[f"ratio_{b} std"] = _mean_std(ratios)
        rows.append(row)
    return rows


def best_run(runs: list[Run]) -> tuple[Run, str, int] | None:
    """The FINISHED run with the lowest value of the metric the runs optimised (an Optuna search's
    best trial): (run, metric, how many runs logged it), or None when they optimised different metrics."""
    targets = {r.data.params.get("optimized_metric") for r in runs}
    if len(targets) != 1 or None in targets:
        return None
    metric = f"best/{targets.pop()}"
    done = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not done:
        return None
    return min(done, key=lambda r: r.data.metrics[metric]), metric, len(done)


def _best_line(found: tuple[Run, str, int] | None, swept: list[str], total: int) -> list[str]:
    if found is None:
        return []
    run, metric, logged = found
    values = ", ".join(f"{k}={run.data.params.get(k)}" for k in swept)
    among = f" (of the {logged} of {total} runs that logged it)" if logged < total else ""
    return [
        f"Best run by {metric}{among}: {run.data.metrics[metric]:.5g}, run {run.info.run_id} "
        f"({values or run.info.run_name}).",
        "",
    ]


def _cell(row: dict, metric: str) -> str:
    mean, std = row[metric], row[f"{metric} std"]
    if math.isnan(mean):
        return "–"
    if math.isnan(std):
        return f"{mean:.4g}"
    if std <= 1e-9 * abs(mean):  # the same value in every seed (e.g. the LSQ reference)
        return f"{mean:.4g} ± 0"
    return f"{mean:.4g} ± {std:.2g}"


def markdown(
    rows: list[dict], swept: list[str], title: str, bins: list[str] = (), best: list[str] = ()
) -> str:
    keys = [k for k in swept if k != SEED]
    head = [*keys, "runs", "status", *[name for _, name in METRICS]]
    lines = [f"## {title}", "", *best, "Mean ± standard deviation over seeds (FINISHED runs only).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = (
            [str(row[k]) for k in keys]
            + [str(row["runs"]), row["status"]]
            + [_cell(row, m) for m, _ in METRICS]
        )
        lines.append("| " + " | ".join(cells) + " |")
    for metric, name in BINNED if bins else ():
        lines += [
            "",
            f"### {name} per pT bin [GeV]"
            + (" (network over least-squares fit, per run)" if metric == "ratio" else ""),
            "",
        ]
        head = [*keys, *[b[2:].replace("_", "-").replace("p", ".") for b in bins]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            key = "ratio" if metric == "ratio" else metric
            lines.append(
                "| "
                + " | ".join([str(row[k]) for k in keys] + [_cell(row, f"{key}_{b}") for b in bins])
                + " |"
            )
    return "\n".join(lines) + "\n"


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def plot(rows: list[dict], swept: list[str], out: Path) -> list[Path]:
    """For each swept parameter: the key metrics against it, one line per other combination.

    Numeric parameters (assignment_threshold) get a numeric axis, others (inverse_fields) categories.
    """
    keys = [k for k in swept if k != SEED]
    paths = []
    for x in keys:
        numeric = all(_number(r[x]) is not None for r in rows)
        position = _number if numeric else str
        others = [k for k in keys if k != x]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
        for ax, metric in zip(axes.flat, PLOTTED, strict=True):
            lines: dict[tuple, list[dict]] = defaultdict(list)
            for r in rows:
                lines[tuple(r[k] for k in others)].append(r)
            for label, members in sorted(lines.items()):
                members = sorted(members, key=lambda r: position(r[x]))
                ax.errorbar(
                    [position(r[x]) for r in members],
                    [r[metric] for r in members],
                    yerr=[0 if math.isnan(r[f"{metric} std"]) else r[f"{metric} std"] for r in members],
                    marker="o",
                    linestyle="-" if numeric else "none",
                    capsize=3,
                    label=", ".join(f"{k}={v}" for k, v in zip(others, label, strict=True)) or None,
                )
            reference = REFERENCE.get(metric)
            fits = [r[reference] for r in rows if reference and not math.isnan(r[reference])]
            if fits:  # the classical fit on the same test events, for scale
                ax.axhline(float(np.mean(fits)), color="grey", linestyle="--", label="least-squares fit")
            ax.set_xlabel(x)
            ax.set_ylabel(dict(METRICS)[metric])
            ax.grid(alpha=0.3)
            if others or fits:
                ax.legend(fontsize=8)
        fig.suptitle(f"test metrics against {x} (mean ± std over seeds)")
        fig.tight_layout()
        path = out / f"compare_{x.replace('/', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(
    tracking_uri: str | None = None,
    parent: str | Sequence[str] | None = None,
    experiment: str | None = None,
    filter_string: str = "",
    out: str | Path | None = None,
) -> tuple[list[dict], Path]:
    client = connect(tracking_uri or default_tracking_uri())
    roots, runs = select_runs(client, parent, experiment, filter_string)
    if not runs:
        raise SystemExit("no runs match this selection")
    swept = varied(runs)
    rows = table(runs, swept)
    name = roots[0].info.run_id[:8] if roots else (experiment or "selection")
    out = Path(out) if out else project_root() / "reports" / f"compare-{name}"
    out.mkdir(parents=True, exist_ok=True)
    best = _best_line(best_run(runs), swept, len(runs))
    title = _title(roots, experiment or filter_string)
    (out / "compare.md").write_text(markdown(rows, swept, title, pt_bins(runs), best))
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, swept, out)
    if roots:  # the first sweep's: the others may keep a comparison of their own there
        client.log_artifacts(roots[0].info.run_id, str(out), "comparison")
    return rows, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muonreg.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the project's mlflow.db")
    parser.add_argument(
        "--parent", nargs="+", help="parent run ids of one or more sweeps, pooled (default: the latest sweep)"
    )
    parser.add_argument("--experiment", help="compare all runs of this experiment instead")
    parser.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"params.seed = '0'\"")
    parser.add_argument("--out", type=Path, help="report directory (default: reports/compare-<parent>)")
    args = parser.parse_args(argv)
    with exit_on_user_errors():
        _, out = compare(args.tracking_uri, args.parent, args.experiment, args.filter, args.out)
    print((out / "compare.md").read_text())
    print(f"report: {out}")


if __name__ == "__main__":
    main()

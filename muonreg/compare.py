"""Compare the runs of a sweep from MLflow: `python -m muonreg.compare [--parent ID | --experiment NAME ...]`.

By default the latest sweep (the newest parent run made by a multirun). One row per combination
of the swept parameters, with the mean over seeds of the key metrics and its 95 % Student-t
interval (n - 1 degrees of freedom: 3 seeds give 4.30 standard errors, not 1.96), and how many of
its runs FINISHED, FAILED, are still RUNNING, or are DEAD: RUNNING in MLflow, but their process died
without closing them (failed rows are shown, not dropped). The metrics come per set (DESIGN
section 8): `validation/` chooses (rows are ranked by `--rank-by`, a validation metric, and the best
row per pT bin is marked there), `heldout/` (the held-out detector) and `test/` (the default
dataset's test split) are reported beside it; every per-bin table counts its muons. Also the best
run by the metric the runs optimised (`best/<optimized_metric>`: an Optuna search's best trial).
Plots show each metric against each numeric swept parameter. The report (Markdown, CSV, PNG) is
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
from scipy import stats

from muonreg.config import project_root
from muonreg.errors import UserError, exit_on_user_errors
from muonreg.tracking.liveness import process_died
from muonreg.tracking.store import connect, default_tracking_uri

# The sets a run is evaluated on (metric prefixes), in the order of the report: choose, then measure.
SETS = (
    ("validation", "validation: what choices are made on"),
    ("heldout", "held-out detector: the headline figures"),
    ("test", "test split of the default dataset: quick look"),
)
RANK_BY = "validation/pt_resolution"
MARKED = ("ratio_pt_resolution", "ratio_lost_pt_resolution", "pt_resolution")  # lower is better
CONFIDENCE = 0.95
METRICS = (
    ("pt_resolution", "σ(pT)/pT core"),
    ("ratio_pt_resolution", "÷ LSQ fit, same muons"),
    ("ratio_lost_pt_resolution", "÷ LSQ fit, lost = failed"),
    ("qpt_resolution", "σ(q/pT)·pT core"),
    ("track_efficiency", "efficiency"),
    ("fake_rate", "fake rate"),
    ("hit_purity", "hit purity"),
    ("hit_efficiency", "hit efficiency"),
    ("charge_accuracy", "charge acc."),
    ("eta_resolution", "σ(η)"),
    ("phi_resolution_mrad", "σ(φ) mrad"),
    ("oracle_pt_resolution", "truth-assignment σ(pT)/pT"),
    ("fit_pt_resolution", "LSQ fit σ(pT)/pT"),
)
# Per pT bin (metrics <set>/<name>_pt<lo>_<hi>, see evaluation.report).
BINNED = (
    ("ratio_pt_resolution", "σ(pT)/pT ÷ LSQ fit, same muons"),
    ("ratio_lost_pt_resolution", "σ(pT)/pT ÷ LSQ fit, lost muons as failures"),
    ("pt_resolution", "σ(pT)/pT"),
    ("oracle_pt_resolution", "truth-assignment σ(pT)/pT"),
    ("fit_pt_resolution", "LSQ fit σ(pT)/pT"),
    ("pt_bias", "bias"),
    ("charge_accuracy", "charge acc."),
    ("track_efficiency", "efficiency"),
)
BIN = re.compile(
    r"^(?:validation|heldout|test)/muons_(pt[0-9p]+_[0-9p]+)$"
)  # every evaluated set logs its counts
PLOTTED = ("pt_resolution", "qpt_resolution", "track_efficiency", "hit_purity")
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


def sets(runs: list[Run]) -> list[str]:
    """The sets (metric prefixes of SETS) that any of the runs was evaluated on."""
    logged = {k.split("/")[0] for r in runs for k in r.data.metrics}
    return [name for name, _ in SETS if name in logged]


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, count and the half-width of the CONFIDENCE Student-t
    interval of the mean (n - 1 degrees of freedom); NaN where the values cannot give it."""
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    std = float(np.std(values, ddof=1)) if n > 1 else math.nan
    t = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1)) if n > 1 else math.nan
    return {"": mean, " std": std, " n": float(n), " ci": t * std / math.sqrt(n) if n > 1 else math.nan}


def metric_names(prefixes: list[str], bins: list[str]) -> list[str]:
    """Every metric a row summarises: each set's overall metrics, then its per-bin ones."""
    names = []
    for prefix in prefixes:
        names += [f"{prefix}/{m}" for m, _ in METRICS]
        names += [f"{prefix}/{m}_{b}" for m, _ in BINNED for b in bins]
        names += [f"{prefix}/muons_{b}" for b in bins]
    return names


def table(runs: list[Run], swept: list[str], rank_by: str = RANK_BY) -> list[dict]:
    """One row per combination of swept values (seeds pooled): statuses, and `spread` of each metric
    (`<name>`, `<name> std`, `<name> n`, `<name> ci`), overall and per pT bin, of every set. Rows are
    ranked by the mean of `rank_by` (lowest first; rows without it last)."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    keys = [k for k in swept if k != SEED]
    for run in runs:
        groups[tuple(run.data.params.get(k, "") for k in keys)].append(run)
    names = metric_names(sets(runs), pt_bins(runs))
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
        for name in [*names, rank_by]:
            row |= {name + k: v for k, v in spread([m[name] for m in done if name in m]).items()}
        rows.append(row)
    return sorted(rows, key=lambda r: math.inf if math.isnan(r[rank_by]) else r[rank_by])


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


def _cell(row: dict, metric: str, bold: bool = False) -> str:
    mean, half = row[metric], row[f"{metric} ci"]
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        text = f"{mean:.4g}"
    elif row[f"{metric} std"] <= 1e-9 * abs(mean):  # the same value in every seed (e.g. the LSQ reference)
        text = f"{mean:.4g} ± 0"
    else:
        text = f"{mean:.4g} ± {half:.2g}"
    return f"**{text}**" if bold else text


def _bin_label(rows: list[dict], prefix: str, b: str) -> str:
    """A pT bin's column: its edges and the muons it holds (a range where the runs' sets differ)."""
    counts = [r[f"{prefix}/muons_{b}"] for r in rows if not math.isnan(r[f"{prefix}/muons_{b}"])]
    edges = b[2:].replace("_", "-").replace("p", ".")
    if not counts:
        return edges
    lo, hi = min(counts), max(counts)
    return f"{edges} (n={lo:.0f})" if lo == hi else f"{edges} (n={lo:.0f}-{hi:.0f})"


def _table_lines(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(c) + " |" for c in body
    ]


def markdown(
    rows: list[dict],
    swept: list[str],
    title: str,
    bins: Sequence[str] = (),
    best: Sequence[str] = (),
    prefixes: Sequence[str] = ("test",),
    rank_by: str = RANK_BY,
) -> str:
    keys = [k for k in swept if k != SEED]
    lines = [f"## {title}", "", *best]
    ranked = [r for r in rows if not math.isnan(r[rank_by])]
    if ranked and keys:
        chosen = ", ".join(f"{k}={ranked[0][k]}" for k in keys)
        lines += [f"Chosen by validation (lowest mean {rank_by}, rows ranked by it): {chosen}.", ""]
    lines += [
        f"Mean over seeds ± the half-width of its {CONFIDENCE:.0%} Student-t interval (n - 1 degrees of "
        "freedom; FINISHED runs only); bold: the best row of a validation bin. n: true muons per bin.",
        "",
    ]
    labels = dict(SETS)
    for prefix in prefixes:
        lines += [f"### {labels[prefix]}", ""]
        head = [*keys, "runs", "status", *[name for _, name in METRICS]]
        lines += _table_lines(
            head,
            [
                [str(r[k]) for k in keys]
                + [str(r["runs"]), r["status"]]
                + [_cell(r, f"{prefix}/{m}") for m, _ in METRICS]
                for r in rows
            ],
        )
        for metric, name in BINNED if bins else ():
            lines += ["", f"#### {prefix}: {name} per pT bin [GeV]", ""]
            head = [*keys, *[_bin_label(rows, prefix, b) for b in bins]]
            body = []
            for r in rows:
                cells = []
                for b in bins:
                    key = f"{prefix}/{metric}_{b}"
                    means = [x[key] for x in rows if not math.isnan(x[key])]
                    best_here = prefix == "validation" and metric in MARKED and len(means) > 1
                    cells.append(_cell(r, key, bold=best_here and r[key] == min(means)))
                body.append([str(r[k]) for k in keys] + cells)
            lines += _table_lines(head, body)
        lines.append("")
    return "\n".join(lines) + "\n"


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def plot(rows: list[dict], swept: list[str], out: Path, prefix: str = "test") -> list[Path]:
    """For each swept parameter: the key metrics of one set against it, one line per other combination
    (error bars: the t-interval of the mean).

    Numeric parameters (assignment_threshold) get a numeric axis, others (inverse_fields) categories.
    """
    keys = [k for k in swept if k != SEED]
    paths = []
    for x in keys:
        numeric = all(_number(r[x]) is not None for r in rows)
        position = _number if numeric else str
        others = [k for k in keys if k != x]
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
        for ax, name in zip(axes.flat, PLOTTED, strict=True):
            metric = f"{prefix}/{name}"
            lines: dict[tuple, list[dict]] = defaultdict(list)
            for r in rows:
                lines[tuple(r[k] for k in others)].append(r)
            for label, members in sorted(lines.items()):
                members = sorted(members, key=lambda r: position(r[x]))
                ax.errorbar(
                    [position(r[x]) for r in members],
                    [r[metric] for r in members],
                    yerr=[0 if math.isnan(r[f"{metric} ci"]) else r[f"{metric} ci"] for r in members],
                    marker="o",
                    linestyle="-" if numeric else "none",
                    capsize=3,
                    label=", ".join(f"{k}={v}" for k, v in zip(others, label, strict=True)) or None,
                )
            reference = f"{prefix}/fit_{name}"
            fits = [r[reference] for r in rows if not math.isnan(r.get(reference, math.nan))]
            if fits:  # the classical fit on the same muons, for scale
                ax.axhline(float(np.mean(fits)), color="grey", linestyle="--", label="least-squares fit")
            ax.set_xlabel(x)
            ax.set_ylabel(dict(METRICS)[name])
            ax.grid(alpha=0.3)
            if others or fits:
                ax.legend(fontsize=8)
        fig.suptitle(f"{prefix} metrics against {x} (mean, {CONFIDENCE:.0%} t-interval over seeds)")
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
    rank_by: str = RANK_BY,
) -> tuple[list[dict], Path]:
    if not rank_by.startswith("validation/"):
        raise UserError(
            f"--rank-by {rank_by}: choices are made on validation/... metrics, never on test or held-out"
        )
    client = connect(tracking_uri or default_tracking_uri())
    roots, runs = select_runs(client, parent, experiment, filter_string)
    if not runs:
        raise SystemExit("no runs match this selection")
    swept = varied(runs)
    rows = table(runs, swept, rank_by)
    name = roots[0].info.run_id[:8] if roots else (experiment or "selection")
    out = Path(out) if out else project_root() / "reports" / f"compare-{name}"
    out.mkdir(parents=True, exist_ok=True)
    best = _best_line(best_run(runs), swept, len(runs))
    title = _title(roots, experiment or filter_string)
    prefixes = sets(runs)
    (out / "compare.md").write_text(markdown(rows, swept, title, pt_bins(runs), best, prefixes, rank_by))
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, swept, out, "heldout" if "heldout" in prefixes else "test")
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
    parser.add_argument(
        "--rank-by",
        default=RANK_BY,
        help=f"the validation metric rows are ranked and chosen by, lowest first (default {RANK_BY}), e.g. "
        "validation/ratio_pt_resolution_pt100_200",
    )
    args = parser.parse_args(argv)
    with exit_on_user_errors():
        _, out = compare(args.tracking_uri, args.parent, args.experiment, args.filter, args.out, args.rank_by)
    print((out / "compare.md").read_text())
    print(f"report: {out}")


if __name__ == "__main__":
    main()

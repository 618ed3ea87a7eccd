"""An evaluation report: tables (Markdown and CSV) and plots, the network beside the least-squares fit.

Every number of the network is shown next to the classical MS-standalone fit of the same muons'
truth hits (muonreg.reco.fit), so a result always reads against that reference; and next to two
diagnostics that split the network's error into assignment and regression: the network's
regression with the truth hit assignment (oracle), and the least-squares fit of the hits the
network assigned (plain and outlier-rejecting). The references are measured on the muons the
network reconstructed (`muonreg.evaluation.same_muons`); the network over the fit is given on
those same muons and with the network's lost muons counted as failures, each with its bootstrap
error, and every table counts its muons.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from muonreg.evaluation import plots
from muonreg.evaluation.metrics import binned, residuals, resolution_metrics
from muonreg.evaluation.pulls import has_pulls, pull_metrics, pulls
from muonreg.evaluation.same_muons import comparison, comparison_table
from muonreg.tasks.uncertainty import UNCERTAIN

# The methods of a report, and the prefix of their overall metrics (the network's have none).
NETWORK, FIT = "network", "least-squares fit"
COMPARISON = "network ÷ least-squares fit"  # not a method: the comparison's tables (same_muons)
SAME_MUONS, LOST_AS_FAILED = "same muons", "lost muons as failures"  # the comparison's two measures
ORACLE = "network, truth assignment"
ASSIGNED_FIT, ROBUST_FIT = "fit of assigned hits", "robust fit of assigned hits"
PREFIX = {ORACLE: "oracle_", FIT: "fit_", ASSIGNED_FIT: "assigned_fit_", ROBUST_FIT: "robust_fit_"}


# Logged per pT bin for every method (keys <prefix><metric>_pt<lo>_<hi>).
BINNED = (
    "pt_resolution",
    "pt_bias",
    "charge_accuracy",
    "eta_resolution",
    "phi_resolution_mrad",
    "track_efficiency",
    "pt_resolution_err",
    "measured",
)
COLUMNS = (
    ("muons", "muons", "{:.0f}"),
    ("measured", "measured", "{:.0f}"),
    ("track_efficiency", "efficiency", "{:.3f}"),
    ("track_efficiency_err", "eff. err", "{:.3f}"),
    ("pt_resolution", "σ(pT)/pT core", "{:.4f}"),
    ("pt_resolution_err", "boot. err", "{:.4f}"),
    ("pt_resolution_rms", "σ(pT)/pT RMS", "{:.4f}"),
    ("pt_bias", "pT bias", "{:+.4f}"),
    ("qpt_resolution", "σ(q/pT)·pT core", "{:.4f}"),
    ("charge_accuracy", "charge acc.", "{:.4f}"),
    ("eta_resolution", "σ(η)", "{:.4f}"),
    ("phi_resolution_mrad", "σ(φ) mrad", "{:.2f}"),
)
# The network over the fit (same_muons.comparison): logged overall and per pT bin, and tabled.
COMPARED = (
    "paired_muons",
    "fit_failed",
    "ratio_pt_resolution",
    "ratio_pt_resolution_err",
    "lost_pt_resolution",
    "fit_lost_pt_resolution",
    "ratio_lost_pt_resolution",
    "ratio_lost_pt_resolution_err",
)
COMPARISON_COLUMNS = (
    ("muons", "muons", "{:.0f}"),
    ("track_efficiency", "network efficiency", "{:.3f}"),
    ("paired_muons", "same muons", "{:.0f}"),
    ("fit_failed", "fit failed", "{:.0f}"),
    ("pt_resolution", "network σ(pT)/pT", "{:.4f}"),
    ("fit_pt_resolution", "fit σ(pT)/pT", "{:.4f}"),
    ("ratio_pt_resolution", "ratio", "{:.3f}"),
    ("ratio_pt_resolution_err", "boot. err", "{:.3f}"),
    ("lost_pt_resolution", "network σ, lost = failed", "{:.4f}"),
    ("fit_lost_pt_resolution", "fit σ, failed = failed", "{:.4f}"),
    ("ratio_lost_pt_resolution", "ratio, lost = failed", "{:.3f}"),
    ("ratio_lost_pt_resolution_err", "boot. err", "{:.3f}"),
)
HEADER = (
    "Muons: the true muons of a bin; measured: those a method's widths use. The references (the "
    "fits, the truth assignment) are measured on the muons the network reconstructed, so their "
    "efficiency is the share of true muons they are measured on. Errors: binomial (efficiency), "
    "bootstrap of the muons (widths, ratios)."
)
COMPARISON_HEADER = (
    "The network over the least-squares fit of the truth hits, per bin. *Same muons*: both on the "
    "muons the network reconstructed and the fit converged on ('fit failed' counts the network's "
    "muons the fit lost). *Lost = failed*: the half-width of the central 68.27 % of all true muons of "
    "the bin, a muon the network lost (the fit: failed on) counting as beyond both ends; inf when "
    "more than 31.7 % are lost. Errors: bootstrap of the muons, network and fit resampled together."
)
BINNINGS = ("all", "pT [GeV]", "abs(eta)")


def _tables(
    rows: dict[str, np.ndarray], pt_edges: list[float], eta_edges: list[float]
) -> dict[str, list[dict]]:
    return {
        "all": [{"lo": float("nan"), "hi": float("nan"), **resolution_metrics(rows)}],
        "pT [GeV]": binned(rows, "pt", pt_edges),
        "abs(eta)": binned(rows, "abs_eta", eta_edges),
    }


def _comparison_tables(
    network: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    pt_edges: list[float],
    eta_edges: list[float],
) -> dict[str, list[dict]]:
    return {
        "all": [{"lo": float("nan"), "hi": float("nan"), **comparison(network, reference)}],
        "pT [GeV]": comparison_table(network, reference, "pt", pt_edges),
        "abs(eta)": comparison_table(network, reference, "abs_eta", eta_edges),
    }


def _markdown(tables: dict[str, dict[str, list[dict]]], columns=COLUMNS, header: str = HEADER) -> str:
    lines = [header, ""]
    for binning in BINNINGS:
        lines += [f"### {binning if binning != 'all' else 'All muons'}", ""]
        head = ["method", *([] if binning == "all" else [binning])] + [name for _, name, _ in columns]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, by in tables.items():
            for row in by[binning]:
                cells = [method] + ([] if binning == "all" else [f"{row['lo']:g}-{row['hi']:g}"])
                cells += [fmt.format(row[key]) for key, _, fmt in columns]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _csv(path: Path, tables: dict[str, dict[str, list[dict]]], keys: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "binning", "lo", "hi", *keys])
        for method, by in tables.items():
            for binning, rows in by.items():
                for row in rows:
                    writer.writerow([method, binning, row["lo"], row["hi"], *[row[k] for k in keys]])


def write_report(
    out_dir: str | Path,
    methods: dict[str, dict[str, np.ndarray]],
    pt_edges: list[float],
    eta_edges: list[float],
    reference: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, list[dict]]]]:
    """Write tables and plots of `methods` (name -> TrackRecords rows, NETWORK first) into `out_dir`.

    `reference`: the fit of every true muon lined up with the network's rows
    (same_muons.lined_up): adds the network-over-fit comparison (COMPARED) under the key
    COMPARISON of the returned tables. Returns the overall metrics of every method but the network,
    prefixed (PREFIX), the per-pT-bin metrics of every method (BINNED, `<prefix><metric>_<bin_name>`),
    the network's muon counts per bin (`muons_<bin_name>`), the comparison's (COMPARED, overall and
    per pT bin), and the tables.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {m: _tables(rows, pt_edges, eta_edges) for m, rows in methods.items()}
    text = _markdown(tables)
    _csv(out / "resolution.csv", tables, [k for k, _, _ in COLUMNS])
    compared = None
    if reference is not None:
        compared = _comparison_tables(methods[NETWORK], reference, pt_edges, eta_edges)
        text += "\n## Network ÷ least-squares fit\n\n" + _markdown(
            {NETWORK: compared}, COMPARISON_COLUMNS, COMPARISON_HEADER
        )
        _csv(out / "ratio.csv", {NETWORK: compared}, [k for k, _, _ in COMPARISON_COLUMNS])
        by_pt = compared["pT [GeV]"]
        lost = [
            {
                **r,
                "ratio_pt_resolution": r["ratio_lost_pt_resolution"],
                "ratio_pt_resolution_err": r["ratio_lost_pt_resolution_err"],
            }
            for r in by_pt
        ]
        plots.versus(
            {SAME_MUONS: by_pt, LOST_AS_FAILED: lost},
            "ratio_pt_resolution",
            "ratio_pt_resolution_err",
            r"true $p_T$ [GeV]",
            r"$\sigma(p_T)/p_T$ (68% core): network / least-squares fit",
            out / "ratio_vs_pt.png",
            log_x=True,
        )
    (out / "resolution.md").write_text(text)
    plots.residual_histograms(
        {m: residuals(rows) for m, rows in methods.items() if m in (NETWORK, ORACLE, FIT)},
        out / "residuals.png",
    )
    by_pt = {m: t["pT [GeV]"] for m, t in tables.items()}
    by_eta = {m: t["abs(eta)"] for m, t in tables.items()}
    plots.versus(
        by_pt,
        "pt_resolution",
        "pt_resolution_err",
        r"true $p_T$ [GeV]",
        r"$\sigma(p_T)/p_T$ (68% core)",
        out / "resolution_vs_pt.png",
        log_x=True,
    )
    plots.versus(  # the core width is centred on the median: only the bias shows a pull towards the mean
        by_pt,
        "pt_bias",
        None,
        r"true $p_T$ [GeV]",
        r"$p_T$ bias: median of $(p_T^{pred} - p_T^{true})/p_T^{true}$",
        out / "bias_vs_pt.png",
        log_x=True,
    )
    plots.versus(
        by_eta,
        "pt_resolution",
        "pt_resolution_err",
        r"true $|\eta|$",
        r"$\sigma(p_T)/p_T$ (68% core)",
        out / "resolution_vs_eta.png",
        log_x=False,
    )
    plots.versus(
        {NETWORK: by_pt[NETWORK]},
        "track_efficiency",
        "track_efficiency_err",
        r"true $p_T$ [GeV]",
        "track efficiency",
        out / "efficiency_vs_pt.png",
        log_x=True,
    )
    keys = {key for key, _, _ in COLUMNS} - {"muons"}
    metrics = {
        f"{PREFIX[m]}{k}": v
        for m, t in tables.items()
        if m in PREFIX
        for k, v in t["all"][0].items()
        if k in keys
    }
    metrics |= {
        f"{PREFIX.get(m, '')}{k}_{bin_name(row['lo'], row['hi'])}": row[k]
        for m, t in tables.items()
        for row in t["pT [GeV]"]
        for k in BINNED
    }
    metrics |= {f"muons_{bin_name(r['lo'], r['hi'])}": r["muons"] for r in tables[NETWORK]["pT [GeV]"]}
    if compared is not None:
        metrics |= {k: compared["all"][0][k] for k in COMPARED}
        metrics |= {
            f"{k}_{bin_name(row['lo'], row['hi'])}": row[k] for row in compared["pT [GeV]"] for k in COMPARED
        }
        tables[COMPARISON] = compared
    if has_pulls(methods[NETWORK]):
        metrics |= write_pulls(out, methods[NETWORK], pt_edges, eta_edges)
    return metrics, tables


PULL_NAMES = {"qpt": "q/pT", "eta": "η", "phi": "φ"}


def write_pulls(
    out: Path, rows: dict[str, np.ndarray], pt_edges: list[float], eta_edges: list[float]
) -> dict[str, float]:
    """The network's pulls (evaluation.pulls): pulls.md, pulls.csv, pulls.png (distributions) and
    pull_width_vs_pt.png; returns the metrics `<field>_pull_width[_median]` and the count of their
    muons `pull_muons`, overall and per pT bin."""
    tables = {
        "all": [{"lo": float("nan"), "hi": float("nan"), **pull_metrics(rows)}],
        "pT [GeV]": binned(rows, "pt", pt_edges, pull_metrics),
        "abs(eta)": binned(rows, "abs_eta", eta_edges, pull_metrics),
    }
    columns = ["pull_muons"] + [f"{f}_pull_{k}" for f in UNCERTAIN for k in ("width", "width_err", "median")]
    lines = [
        "Pulls (predicted - true) / sigma of the network's per-track uncertainties, reconstructed muons:",
        "width = half the central 68 % interval (1 when calibrated), its statistical error, median.",
        "",
    ]
    for binning, rows_ in tables.items():
        head = [binning, "muons"] + [
            f"{PULL_NAMES[f]} {k}" for f in UNCERTAIN for k in ("width", "err", "median")
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows_:
            label = "all" if binning == "all" else f"{row['lo']:g}-{row['hi']:g}"
            cells = [f"{row['pull_muons']:.0f}"] + [f"{row[c]:.3f}" for c in columns[1:]]
            lines.append("| " + " | ".join([label, *cells]) + " |")
        lines.append("")
    (out / "pulls.md").write_text("\n".join(lines))
    with open(out / "pulls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["binning", "lo", "hi", *columns])
        for binning, rows_ in tables.items():
            writer.writerows([binning, row["lo"], row["hi"], *[row[c] for c in columns]] for row in rows_)
    plots.pull_histograms(pulls(rows), out / "pulls.png")
    plots.pull_widths(tables["pT [GeV]"], UNCERTAIN, r"true $p_T$ [GeV]", out / "pull_width_vs_pt.png")
    keys = ["pull_muons"] + [f"{f}_pull_{k}" for f in UNCERTAIN for k in ("width", "median")]
    metrics = {k: tables["all"][0][k] for k in keys}
    for row in tables["pT [GeV]"]:
        metrics |= {f"{k}_{bin_name(row['lo'], row['hi'])}": row[k] for k in keys}
    return metrics


def bin_name(lo: float, hi: float) -> str:
    """A pT bin as a metric-name suffix: pt5_10, pt2p5_5 (MLflow keys take no '.' or '-' well)."""
    return "pt" + "_".join(f"{x:g}".replace(".", "p") for x in (lo, hi))


def _ratio(value: float, error: float) -> str:
    """A ratio with its error: '1.23 ± 0.04x'; '-' where the network lost more than 31.7 % (no width)."""
    if math.isinf(value):
        return "-"
    return f"{value:.2f}x" if math.isnan(error) else f"{value:.2f} ± {error:.2f}x"


def summary(tables: dict[str, dict[str, list[dict]]]) -> str:
    """A few readable lines: the network beside the least-squares fit, overall and per pT bin."""
    net, compared = tables[NETWORK], tables.get(COMPARISON)
    lines = [
        "pT: 68 % core of (pT - true) / true, median bias, charge accuracy; network"
        + (
            " | least-squares fit of the truth hits | core ratio on the same muons | ratio with lost muons"
            " as failures (± bootstrap errors) | muons"
            if compared
            else ""
        )
    ]
    for i, row in enumerate([net["all"][0], *net["pT [GeV]"]]):
        label = "all" if i == 0 else f"{row['lo']:g}-{row['hi']:g} GeV"
        text = f"  {label:>11}: {row['pt_resolution']:.3f} {row['pt_bias']:+.3f} {row['charge_accuracy']:.3f}"
        if compared:  # a comparison comes with the fit's own table (write_report's `reference`)
            ref = [tables[FIT]["all"][0], *tables[FIT]["pT [GeV]"]][i]
            c = [compared["all"][0], *compared["pT [GeV]"]][i]
            text += (
                f" | {ref['pt_resolution']:.3f} {ref['pt_bias']:+.3f} {ref['charge_accuracy']:.3f}"
                f" | {_ratio(c['ratio_pt_resolution'], c['ratio_pt_resolution_err'])}"
                f" | {_ratio(c['ratio_lost_pt_resolution'], c['ratio_lost_pt_resolution_err'])}"
                f" | {c['muons']:.0f}"
            )
        lines.append(text)
    return "\n".join(lines)

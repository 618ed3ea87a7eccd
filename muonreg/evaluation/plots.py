"""Slide-ready plots of an evaluation: the network beside the least-squares fit reference."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on clusters
import matplotlib.pyplot as plt
import numpy as np

from muonreg.evaluation.metrics import core_width

STYLE = {
    "network": {"color": "C0", "marker": "o"},
    "network, truth assignment": {"color": "C2", "marker": "^"},
    "least-squares fit": {"color": "C3", "marker": "s"},
    "fit of assigned hits": {"color": "C1", "marker": "v"},
    "robust fit of assigned hits": {"color": "C4", "marker": "D"},
    "same muons": {"color": "C0", "marker": "o"},  # the network over the fit (evaluation.same_muons)
    "lost muons as failures": {"color": "C5", "marker": "x"},
}
RESIDUALS = (
    ("pt_rel", r"$(p_T^{pred} - p_T^{true}) / p_T^{true}$", (-0.5, 0.5)),
    ("qpt_rel", r"$(q/p_T^{pred} - q/p_T^{true}) \cdot p_T^{true}$", (-0.5, 0.5)),
    ("eta", r"$\eta^{pred} - \eta^{true}$", (-0.1, 0.1)),
    ("phi_mrad", r"$\phi^{pred} - \phi^{true}$ [mrad]", (-50, 50)),
)


def residual_histograms(residuals: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for ax, (key, label, limits) in zip(axes.flat, RESIDUALS, strict=True):
        bins = np.linspace(*limits, 61)
        for method, res in residuals.items():
            x = res[key]
            if len(x) == 0:  # nothing reconstructed (e.g. an untrained network): no curve
                continue
            ax.hist(
                np.clip(x, *limits),
                bins=bins,
                histtype="step",
                density=True,
                color=STYLE[method]["color"],
                label=f"{method}: 68% core {core_width(x):.3g} ({len(x)} muons)",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("muons (normalised)")
        ax.legend(fontsize=8)
    fig.suptitle("Residuals on the test set (values beyond the range in the edge bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def versus(
    tables: dict[str, list[dict]],
    key: str,
    error: str | None,
    xlabel: str,
    ylabel: str,
    path: Path,
    log_x: bool,
) -> Path:
    """A metric per bin (points at bin centres, horizontal bars = bin widths, vertical = errors)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, rows in tables.items():
        lo, hi = np.array([r["lo"] for r in rows]), np.array([r["hi"] for r in rows])
        centre = np.sqrt(lo * hi) if log_x else (lo + hi) / 2
        y = np.array([r[key] for r in rows])
        yerr = np.array([r[error] for r in rows]) if error else None
        ax.errorbar(
            centre,
            y,
            xerr=[centre - lo, hi - centre],
            yerr=yerr,
            linestyle="none",
            label=method,
            capsize=2,
            **STYLE[method],
        )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    values = [r[key] for rows in tables.values() for r in rows if np.isfinite(r[key])]
    if min(values, default=0.0) < 0:
        ax.axhline(0, color="grey", linewidth=0.8)  # signed quantity (a bias): zero is the reference
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PULL_LABELS = {"qpt": r"$q/p_T$", "eta": r"$\eta$", "phi": r"$\phi$"}
PULL_TARGET = (0.9, 1.1)  # pull widths calibrated within 10 %


def pull_histograms(pulls: dict[str, np.ndarray], path: Path) -> Path:
    """Each field's pull distribution beside a unit Gaussian (values beyond +-5 in the edge bins)."""
    fig, axes = plt.subplots(1, len(pulls), figsize=(4.2 * len(pulls), 3.8))
    bins = np.linspace(-5, 5, 61)
    for ax, (field, x) in zip(np.atleast_1d(axes), pulls.items(), strict=True):
        if len(x):
            label = f"68% core {core_width(x):.3f}, median {np.median(x):+.3f} ({len(x)} muons)"
            ax.hist(np.clip(x, -5, 5), bins=bins, histtype="step", density=True, color="C0", label=label)
        ax.plot(
            bins,
            np.exp(-0.5 * bins**2) / np.sqrt(2 * np.pi),
            color="grey",
            linestyle="--",
            label="unit Gaussian",
        )
        ax.set_xlabel(f"pull of {PULL_LABELS[field]}: (pred - true) / $\\sigma$")
        ax.set_ylabel("muons (normalised)")
        ax.legend(fontsize=7)
    fig.suptitle("Pulls of the per-track uncertainties on the test set")
    return _save(fig, path)


def pull_widths(rows: list[dict], fields: tuple[str, ...], xlabel: str, path: Path) -> Path:
    """Pull width (68 % core) per bin of each field, with its error, against the 0.9-1.1 target band."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lo, hi = np.array([r["lo"] for r in rows]), np.array([r["hi"] for r in rows])
    centre = np.sqrt(lo * hi)
    for i, field in enumerate(fields):
        shift = centre * (1 + 0.04 * (i - 1))  # side by side within the bin
        ax.errorbar(
            shift,
            [r[f"{field}_pull_width"] for r in rows],
            yerr=[r[f"{field}_pull_width_err"] for r in rows],
            xerr=[shift - lo, hi - shift],
            linestyle="none",
            marker="os^"[i % 3],
            capsize=2,
            label=PULL_LABELS[field],
        )
    ax.axhspan(*PULL_TARGET, color="grey", alpha=0.15, label="target 0.9-1.1")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(lo.min(), hi.max())  # the binning's range, also where no bin has muons
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pull width (68% core)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def filter_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], working_points: dict[str, dict], path: Path
) -> Path:
    """Hit-filter ROC curves, {name: (background kept, muon-hit efficiency)} (the first is the
    filter, whose working points are marked): background rejection (1 / background kept, log)
    against efficiency; beside it the plain ROC curves."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (name, (background_kept, efficiency)) in enumerate(curves.items()):
        kept = background_kept > 0
        left.plot(efficiency[kept], 1 / background_kept[kept], color=f"C{i}", label=name)
        right.plot(background_kept, efficiency, color=f"C{i}", label=name)
    for i, (name, wp) in enumerate(working_points.items()):
        if wp["background_kept"] > 0:
            left.plot(
                wp["efficiency"],
                1 / wp["background_kept"],
                "o",
                color=f"C{len(curves) + i}",
                label=f"{name}: cut {wp['threshold']:.3g}",
            )
    left.set_yscale("log")
    left.set_xlim(max(0.0, min([0.9, *(wp["efficiency"] - 0.02 for wp in working_points.values())])), 1.0)
    left.set_xlabel("muon-hit efficiency")
    left.set_ylabel("background rejection (1 / background kept)")
    left.legend(fontsize=8)
    right.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    right.set_xlabel("background hits kept")
    right.set_ylabel("muon hits kept")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("Hit filter on the test set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def filter_scores(scores: np.ndarray, labels: np.ndarray, thresholds: dict[str, float], path: Path) -> Path:
    """Score distributions of muon and background hits (normalised, log), the working-point cuts marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    bins = np.linspace(0, 1, 101)
    for selected, name, colour in ((labels, "muon hits", "C0"), (~labels, "background hits", "C3")):
        if selected.any():
            ax.hist(scores[selected], bins=bins, histtype="step", density=True, color=colour, label=name)
    for i, (name, cut) in enumerate(thresholds.items()):
        ax.axvline(cut, color=f"C{i + 1}", linestyle="--", linewidth=0.8, label=f"{name} cut {cut:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("hit-filter score (muon probability)")
    ax.set_ylabel("hits (normalised)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

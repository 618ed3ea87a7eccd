"""Hit-filter metrics from per-hit scores and labels (muon hit = positive): ROC curve and its area,
and the working points that keep a target fraction of the muon hits.

A working point is a muon-hit efficiency (0.99: keep 99 % of the muon hits); its threshold is the
highest score that keeps at least that fraction, as the reference takes the first ROC threshold
whose true-positive rate reaches the target. At a threshold: efficiency (muon hits kept / muon
hits), purity (muon hits kept / hits kept), background kept (background hits kept / background
hits) and background rejection, 1 / background kept (the HEP convention; infinite when no
background hit is kept).
"""

from __future__ import annotations

import math

import numpy as np


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background kept, efficiency, threshold) for every distinct score, from the highest down,
    after a first point (0, 0, +inf): hits with score >= threshold are kept."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    signal = np.cumsum(labels)[last_of_value]
    background = (last_of_value + 1) - signal
    efficiency = np.r_[0.0, signal / max(labels.sum(), 1)]
    background_kept = np.r_[0.0, background / max((~labels).sum(), 1)]
    return background_kept, efficiency, np.r_[np.inf, scores[last_of_value]]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both muon and background hits."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return math.nan
    background_kept, efficiency, _ = roc_curve(scores, labels)
    return float(np.trapezoid(efficiency, background_kept))


def threshold_at_efficiency(muon_scores: np.ndarray, efficiency: float) -> float:
    """The highest threshold that keeps at least `efficiency` of the muon hits (scores of muon hits only)."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"working point {efficiency} must be a muon-hit efficiency in (0, 1]")
    if len(muon_scores) == 0:
        raise ValueError("no muon hit to set a working point on")
    ranked = np.sort(np.asarray(muon_scores, dtype=np.float64))[::-1]
    needed = math.ceil(efficiency * len(ranked) - 1e-9)  # the float product may sit just above an integer
    return float(ranked[needed - 1])


def at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Efficiency, purity, background kept and background rejection of keeping scores >= threshold."""
    labels = np.asarray(labels, dtype=bool)
    kept = np.asarray(scores) >= threshold
    muons, background = labels.sum(), (~labels).sum()
    kept_muons, kept_background = (kept & labels).sum(), (kept & ~labels).sum()
    background_kept = kept_background / background if background else math.nan
    return {
        "efficiency": float(kept_muons / muons) if muons else math.nan,
        "purity": float(kept_muons / kept.sum()) if kept.any() else math.nan,
        "background_kept": float(background_kept),
        "background_rejection": float(1 / background_kept) if background_kept else math.inf,
    }


def muons_lost(muon_ids: np.ndarray, kept: np.ndarray, min_hits: int = 3) -> float:
    """Share of the muons (hits carrying one id per muon, -1 for background) left with fewer than
    `min_hits` kept hits: the tracking dataset's cut removes them. NaN without a muon."""
    muon_ids, kept = np.asarray(muon_ids), np.asarray(kept, dtype=bool)
    on_muon = muon_ids >= 0
    _, muon, counts = np.unique(muon_ids[on_muon], return_inverse=True, return_counts=True)
    if not len(counts):
        return math.nan
    kept_hits = np.bincount(muon, weights=kept[on_muon], minlength=len(counts))
    return float((kept_hits < min_hits).mean())


def working_point_name(efficiency: float) -> str:
    """A working point as a metric-name part: wp0.99, wp0.995."""
    return f"wp{efficiency:g}"


def filter_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    working_points: list[float],
    thresholds: dict[float, float] | None = None,
) -> dict[str, float]:
    """`auc` and, per working point, `wp<e>/threshold|efficiency|purity|background_kept|background_rejection`.

    Thresholds are set on these hits unless given (a region of the detector is measured at the
    thresholds of the whole test split: the filter has one cut, not one per region).
    """
    labels = np.asarray(labels, dtype=bool)
    metrics = {"auc": roc_auc(scores, labels)}
    for wp in working_points:
        if thresholds is not None:
            threshold = thresholds[wp]
        elif labels.any():
            threshold = threshold_at_efficiency(np.asarray(scores)[labels], wp)
        else:
            continue
        name = working_point_name(wp)
        metrics[f"{name}/threshold"] = threshold
        metrics.update({f"{name}/{k}": v for k, v in at_threshold(scores, labels, threshold).items()})
    return metrics

"""The network against a reference on the same muons (DESIGN section 8).

Two measures of "how many times the least-squares fit's resolution", per bin:

- **same muons** (`ratio_pt_resolution`): the 68 % core of (pT - true) / true of the network over
  the fit's, both on the muons the network reconstructed and the fit converged on (`paired_muons`);
  the network's efficiency stands beside it, and the network's muons where the fit did not converge
  are counted (`fit_failed`), not hidden.
- **lost muons as failures** (`ratio_lost_pt_resolution`): every true muon of the bin counts. A muon
  the network lost (or the fit failed on) counts as a residual beyond both ends of the interval,
  half of them below and half above; the width is then the half-width of the central 68.27 % of
  *all* muons (`lost_core_width`), which is the core width when nothing is lost and infinite once
  more than 31.7 % are. A tracker that loses its hardest muons cannot look better by it.

Errors are bootstraps of the muons (`metrics.bootstrap_indices`): the network and the fit are
resampled together, so the ratio's error keeps their correlation (the same muons' scattering).
"""

from __future__ import annotations

import itertools

import numpy as np

from muonreg.evaluation.metrics import CORE, bootstrap_indices, core_width, core_widths

NAN = float("nan")


def _keys(rows: dict[str, np.ndarray]) -> np.ndarray:
    """One integer per muon: its event and slot."""
    return rows["event"].astype(np.int64) * 65536 + rows["slot"].astype(np.int64)


def lined_up(reference: dict[str, np.ndarray], network: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`reference` rows reordered to the network's muons (both hold one row per true muon of the
    same events); a muon missing from the reference is a ValueError."""
    ref_keys, net_keys = _keys(reference), _keys(network)
    if not len(net_keys):
        return {k: v[:0] for k, v in reference.items()}
    order = np.argsort(ref_keys, kind="stable")
    found = order[np.searchsorted(ref_keys, net_keys, sorter=order).clip(0, max(len(order) - 1, 0))]
    if not len(order) or np.any(ref_keys[found] != net_keys):
        raise ValueError("the reference does not hold every muon of the network's events")
    return {k: v[found] for k, v in reference.items()}


def on_network_muons(rows: dict[str, np.ndarray], network: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows lined up with the network's, measured only on the muons the network reconstructed."""
    return {**rows, "reco": rows["reco"].astype(bool) & network["reco"].astype(bool)}


def relative_pt(rows: dict[str, np.ndarray]) -> np.ndarray:
    """(pT - true) / true of every row, NaN where the method has no measurement (not `reco`)."""
    residual = (rows["pred_pt"] - rows["true_pt"]) / rows["true_pt"]
    return np.where(rows["reco"].astype(bool), residual, np.nan)


def lost_core_widths(samples: np.ndarray) -> np.ndarray:
    """Half-width of the central 68.27 % of each row of `samples` [k, n], a NaN (a lost muon) counting
    as beyond both ends (the first half of a row's NaNs below, the rest above): core_width where
    nothing is lost, infinite where too much is. Linear interpolation between order statistics, as
    np.percentile's default."""
    k, n = samples.shape
    if n == 0:
        return np.full(k, np.nan)
    lost = np.isnan(samples).sum(1)
    found = np.sort(np.where(np.isnan(samples), np.inf, samples), axis=1)  # measured first, in order
    n_found = n - lost
    ends = []
    for level in CORE:
        position = level / 100 * (n - 1) - lost // 2  # position among the measured values
        inside = (position >= 0) & (position <= n_found - 1)
        low = np.floor(np.clip(position, 0, None)).astype(np.int64)
        low = np.minimum(low, np.maximum(n_found - 1, 0))
        high = np.minimum(low + 1, np.maximum(n_found - 1, 0))
        a = np.take_along_axis(found, low[:, None], 1)[:, 0]
        b = np.take_along_axis(found, high[:, None], 1)[:, 0]
        with np.errstate(invalid="ignore"):
            value = np.where(high > low, a + (position - low) * (b - a), a)
        ends.append(np.where(inside, value, np.inf if level > 50 else -np.inf))
    return (ends[1] - ends[0]) / 2


def lost_core_width(residuals: np.ndarray) -> float:
    """lost_core_widths of one sample (NaN: a lost muon)."""
    return float(lost_core_widths(residuals[None, :])[0])


def _ratio_and_error(net: np.ndarray, ref: np.ndarray, widths) -> tuple[float, float]:
    """widths(net) / widths(ref) and its bootstrap error, resampling the muons of both together."""
    with np.errstate(divide="ignore", invalid="ignore"):  # an infinite width (too many lost) gives no ratio
        value = widths(net[None, :])[0] / widths(ref[None, :])[0] if len(net) else NAN
        if len(net) < 2 or not np.isfinite(value):
            return float(value), NAN
        idx = bootstrap_indices(len(net))
        ratios = widths(net[idx]) / widths(ref[idx])
    finite = ratios[np.isfinite(ratios)]
    return float(value), float(np.std(finite, ddof=1)) if len(finite) == len(ratios) else NAN


def comparison(network: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Both measures for one set of muons (`reference` lined up with `network`, all its muons)."""
    net, ref = relative_pt(network), relative_pt(reference)
    paired = ~np.isnan(net) & ~np.isnan(ref)
    ratio, ratio_err = _ratio_and_error(net[paired], ref[paired], core_widths)
    lost_ratio, lost_ratio_err = _ratio_and_error(net, ref, lost_core_widths)
    n = len(net)
    return {
        "muons": float(n),
        "track_efficiency": float(np.mean(~np.isnan(net))) if n else NAN,
        "paired_muons": float(paired.sum()),
        "fit_failed": float((~np.isnan(net) & np.isnan(ref)).sum()),
        "pt_resolution": core_width(net[paired]),
        "fit_pt_resolution": core_width(ref[paired]),
        "ratio_pt_resolution": ratio,
        "ratio_pt_resolution_err": ratio_err,
        "lost_pt_resolution": lost_core_width(net),
        "fit_lost_pt_resolution": lost_core_width(ref),
        "ratio_lost_pt_resolution": lost_ratio,
        "ratio_lost_pt_resolution_err": lost_ratio_err,
    }


def comparison_table(
    network: dict[str, np.ndarray], reference: dict[str, np.ndarray], by: str, edges: list[float]
) -> list[dict[str, float]]:
    """`comparison` in bins of true pT (`by="pt"`) or true |eta| (`by="abs_eta"`)."""
    value = network["true_pt"] if by == "pt" else np.abs(network["true_eta"])
    out = []
    for lo, hi in itertools.pairwise(edges):
        sel = (value >= lo) & (value < hi)
        part = {k: v[sel] for k, v in network.items()}
        out.append({"lo": lo, "hi": hi, **comparison(part, {k: v[sel] for k, v in reference.items()})})
    return out

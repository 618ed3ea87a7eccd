"""Tracking and regression metrics from matched predictions (DESIGN section 8).

`TrackRecords` collects, batch by batch, one row per truth muon (its truth parameters, the
matched prediction, the hit efficiency and purity of the matched track) and counts of predicted
tracks; `summarise` turns those rows into the scalar metrics that are logged every epoch.

Definitions. A truth muon is *reconstructed* when its matched query is predicted valid and
shares at least half of its hits both ways (hit efficiency >= 0.5 and purity >= 0.5), the usual
double-matching criterion. Fake rate: predicted tracks that reconstruct no muon / predicted
tracks. Resolutions use reconstructed muons only; the core width of a residual is half the
16-84 % interval (the 68 % core), robust to the tails that RMS also reports. Its error is a
bootstrap's (`core_width_err`): the Gaussian formula core / sqrt(2n) understates a quantile width's.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import torch

FIELDS = ("pt", "eta", "phi", "q")
CORE = (15.865, 84.135)  # percentiles bounding the central 68.27 % (one Gaussian sigma either side)
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 0  # fixed: the same evaluation gives the same errors


def core_width(x: np.ndarray) -> float:
    """Half-width of the central 68 % interval; NaN for an empty sample."""
    if len(x) == 0:
        return float("nan")
    lo, hi = np.percentile(x, CORE)
    return float((hi - lo) / 2)


def bootstrap_indices(n: int) -> np.ndarray:
    """[BOOTSTRAP_RESAMPLES, n] indices of resamples with replacement (fixed seed)."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, (BOOTSTRAP_RESAMPLES, n))


def core_widths(samples: np.ndarray) -> np.ndarray:
    """core_width of each row of `samples` [k, n]."""
    lo, hi = np.percentile(samples, CORE, axis=-1)
    return (hi - lo) / 2


def core_width_err(x: np.ndarray) -> float:
    """Bootstrap standard error of core_width(x); NaN below two values."""
    if len(x) < 2:
        return float("nan")
    return float(np.std(core_widths(x[bootstrap_indices(len(x))]), ddof=1))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else float("nan")


def wrap_angle(x: np.ndarray) -> np.ndarray:
    """Angle difference folded into [-pi, pi)."""
    return (x + np.pi) % (2 * np.pi) - np.pi


class TrackRecords:
    """Per-muon rows and per-prediction counts accumulated over an evaluation.

    Each row names its muon: `event` (dataset index) and `slot` (the muon's place in the event), so
    other methods' rows of the same muons can be lined up with it. With `keep_hits`, each row also
    remembers the hits its matched track was given (a bool mask over the event's hits), for fitting
    the network's own hit lists.
    """

    def __init__(self, keep_hits: bool = False) -> None:
        self.rows: dict[str, list[np.ndarray]] = defaultdict(list)
        self.predicted = 0
        self.predicted_fake = 0
        self.keep_hits = keep_hits
        self.hits: list[np.ndarray] = []

    def update(self, preds: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """`preds` are aligned to truth order (slot j of preds is the query matched to truth slot j)."""
        truth_valid = batch["particle_valid"]
        n_slots = truth_valid.shape[1]
        pred_valid = preds["track_valid"][:, :n_slots]
        pred_hits = preds["track_hit_valid"][:, :n_slots] & batch["hit_valid"].unsqueeze(1)
        true_hits = batch["particle_hit_valid"]
        shared = (pred_hits & true_hits).sum(-1).float()
        hit_eff = shared / true_hits.sum(-1).clamp(min=1)
        hit_pur = torch.where(
            pred_hits.any(-1), shared / pred_hits.sum(-1).clamp(min=1), torch.zeros_like(shared)
        )
        reco = pred_valid & truth_valid & (hit_eff >= 0.5) & (hit_pur >= 0.5)
        # Queries beyond the truth slots, and valid predictions on empty slots or failing the match, are fakes.
        all_pred_valid = preds["track_valid"]
        self.predicted += int(all_pred_valid.sum())
        self.predicted_fake += int(all_pred_valid.sum()) - int(reco.sum())
        sel = truth_valid
        columns = {
            "event": batch["event_index"].unsqueeze(1).expand_as(sel),
            "slot": torch.arange(n_slots, device=sel.device).expand_as(sel),
            "reco": reco,
            "pred_valid": pred_valid,
            "hit_eff": hit_eff,
            "hit_pur": hit_pur,
            **{f"true_{f}": batch[f"particle_truthMuon_{f}"] for f in FIELDS},
            **{f"pred_{f}": preds[f"track_truthMuon_{f}"][:, :n_slots] for f in FIELDS},
            # per-track uncertainties, where the network gives them (evaluation.pulls)
            **{
                k.removeprefix("track_"): v[:, :n_slots]
                for k, v in preds.items()
                if k.startswith("track_sigma_")
            },
        }
        if self.keep_hits:
            counts = batch["hit_valid"].sum(-1).tolist()
            masks = pred_hits.cpu().numpy()
            for b, j in sel.nonzero().tolist():
                self.hits.append(masks[b, j, : counts[b]])
        for key, value in columns.items():
            value = value[sel].detach()
            self.rows[key].append((value.float() if value.is_floating_point() else value).cpu().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.rows.items()}


def residuals(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Residuals of reconstructed muons: relative pT, q/pT times pT, eta, phi (mrad), charge agreement."""
    r = {k: v[rows["reco"].astype(bool)] for k, v in rows.items()}
    pt_true, pt_pred = r["true_pt"], r["pred_pt"]
    q_pred = np.where(r["pred_q"] >= 0, 1.0, -1.0)
    return {
        "pt_rel": (pt_pred - pt_true) / pt_true,
        "qpt_rel": (q_pred / pt_pred - r["true_q"] / pt_true) * pt_true,
        "eta": r["pred_eta"] - r["true_eta"],
        "phi_mrad": wrap_angle(r["pred_phi"] - r["true_phi"]) * 1e3,
        "charge_ok": (q_pred == r["true_q"]).astype(np.float64),
    }


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def resolution_metrics(rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Efficiency and resolutions of a set of truth-muon rows (all, or one bin)."""
    n = len(rows["reco"])
    res = residuals(rows)
    n_reco = len(res["pt_rel"])
    efficiency = _mean(rows["reco"].astype(float))
    return {
        "muons": float(n),
        "measured": float(n_reco),
        "track_efficiency": efficiency,
        "track_efficiency_err": float(np.sqrt(efficiency * (1 - efficiency) / n)) if n else float("nan"),
        "pt_resolution": core_width(res["pt_rel"]),
        "pt_resolution_err": core_width_err(res["pt_rel"]),
        "pt_resolution_rms": rms(res["pt_rel"]),
        "pt_bias": float(np.median(res["pt_rel"])) if n_reco else float("nan"),
        "qpt_resolution": core_width(res["qpt_rel"]),
        "eta_resolution": core_width(res["eta"]),
        "phi_resolution_mrad": core_width(res["phi_mrad"]),
        "charge_accuracy": _mean(res["charge_ok"]),
    }


def binned(
    rows: dict[str, np.ndarray], by: str, edges: list[float], metrics=resolution_metrics
) -> list[dict[str, float]]:
    """`metrics` (resolution_metrics) in bins of true pT (`by="pt"`) or true |eta| (`by="abs_eta"`)."""
    value = rows["true_pt"] if by == "pt" else np.abs(rows["true_eta"])
    out = []
    for lo, hi in itertools.pairwise(edges):
        sel = (value >= lo) & (value < hi)
        out.append({"lo": lo, "hi": hi, **metrics({k: v[sel] for k, v in rows.items()})})
    return out


def summarise(records: TrackRecords) -> dict[str, float]:
    """The scalar metrics logged every epoch."""
    rows = records.arrays()
    if not rows:
        return {"track_efficiency": float("nan"), "fake_rate": float("nan")}
    # without any muon every metric is there, NaN: what a run monitors must not depend on the batch
    matched = rows["pred_valid"].astype(bool)
    metrics = resolution_metrics(rows)
    for key in ("muons", "measured", "track_efficiency_err", "pt_resolution_err"):
        metrics.pop(key)
    return {
        **metrics,
        "fake_rate": records.predicted_fake / records.predicted if records.predicted else 0.0,
        "hit_efficiency": _mean(rows["hit_eff"][matched]),
        "hit_purity": _mean(rows["hit_pur"][matched]),
    }


def fit_rows(fit: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows in TrackRecords' layout from a least-squares fit of truth hits (muonreg.reco.fit.fit_events)."""
    ok = fit["ok"].astype(bool)
    return {
        "event": fit["event"],
        "slot": fit["track"],
        "reco": ok,
        "pred_valid": ok,
        "hit_eff": np.ones(len(ok)),
        "hit_pur": np.ones(len(ok)),
        **{f"true_{f}": fit[f"{f}_true"] for f in FIELDS},
        **{f"pred_{f}": fit[f] for f in FIELDS},
    }

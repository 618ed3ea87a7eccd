"""The hit filter over a split: mean losses and filter metrics every epoch (validation), the working
points' cuts set on validation after training, and at the end of a run the test evaluation with its
report: the filter at its stored cuts beside the classical road search (muonreg.reco.road_search) at
its natural working points, on the same hits; overall, per technology and per |eta| region; with
ROC and score plots."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from muonreg.data.dataset import MuonEventDataset
from muonreg.data.features import DERIVED, derived_features
from muonreg.data.schema import Technology
from muonreg.evaluation.filter_metrics import (
    at_threshold,
    filter_metrics,
    muons_lost,
    roc_auc,
    roc_curve,
    threshold_at_efficiency,
    working_point_name,
)
from muonreg.evaluation.inference import forward_loss, unwrap
from muonreg.evaluation.plots import filter_roc, filter_scores
from muonreg.reco.road_search import WORKING_POINTS as ROAD_WORKING_POINTS
from muonreg.reco.road_search import road_layers
from muonreg.training.device import to_device

ROAD = "road"  # metric prefix of the road search


@dataclass
class HitScores:
    """Every real hit's score, label, muon (index within its event, -1 for background) and road-search
    score (when asked for), event by event (`events`: their dataset indices)."""

    events: list[int] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    muons: list[np.ndarray] = field(default_factory=list)
    roads: list[np.ndarray] = field(default_factory=list)

    def update(self, probability: torch.Tensor, batch: dict[str, torch.Tensor], road: bool = False) -> None:
        valid = batch["hit_valid"].cpu().numpy()
        probability = probability.float().cpu().numpy()
        on_muon = batch["particle_hit_valid"]
        muon = torch.where(on_muon.any(1), on_muon.int().argmax(1), -1).cpu().numpy()
        layers = (
            road_layers(batch["hit_geometry"], batch["hit_valid"] & batch["hit_geometry_valid"]).cpu().numpy()
            if road
            else None
        )
        for i, event in enumerate(batch["event_index"].tolist()):
            self.events.append(event)
            self.scores.append(probability[i][valid[i]])
            self.muons.append(muon[i][valid[i]])
            if layers is not None:
                self.roads.append(layers[i][valid[i]])

    def arrays(self) -> dict[str, np.ndarray]:
        """All hits, concatenated in event order: `scores`, `labels` (muon hit), `muon_ids` (one id per
        muon of the split, -1 for background) and, when recorded, `roads`."""
        if not self.events:
            return {
                "scores": np.zeros(0, np.float32),
                "labels": np.zeros(0, bool),
                "muon_ids": np.zeros(0, int),
            }
        muon = np.concatenate(self.muons)
        event = np.repeat(np.arange(len(self.events)), [len(m) for m in self.muons])
        out = {
            "scores": np.concatenate(self.scores),
            "labels": muon >= 0,
            "muon_ids": np.where(muon >= 0, event * (muon.max() + 1) + muon, -1),
        }
        if self.roads:
            out["roads"] = np.concatenate(self.roads)
        return out


@torch.no_grad()
def evaluate_filter(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    prefix: str = "val",
    working_points: tuple[float, ...] = (0.99, 0.995),
    road: bool = False,
) -> tuple[dict[str, float], HitScores]:
    """Mean losses and filter metrics (`<prefix>/...`, cuts set on this split) of a split, with the hit
    scores behind them (and the road search's, with `road`)."""
    model.eval()
    core = unwrap(model)
    sums: dict[str, float] = defaultdict(float)
    records = HitScores()
    n = 0
    loader.batch_sampler.set_epoch(0)
    for batch in loader:
        batch = to_device(batch, device)
        outputs, losses = forward_loss(core, batch, device, amp_dtype)
        size = len(batch["event_index"])
        for k, v in losses.items():
            sums[k] += float(v) * size
        n += size
        records.update(core.predict(outputs), batch, road)
    metrics = {f"{prefix}/{k}": v / max(n, 1) for k, v in sums.items()}
    hits = records.arrays()
    metrics.update(
        {
            f"{prefix}/{k}": v
            for k, v in filter_metrics(hits["scores"], hits["labels"], list(working_points)).items()
        }
    )
    return metrics, records


def set_validation_cuts(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None
) -> dict[float, float]:
    """Set the filter's cut for each of its working points on a validation split (the highest cut that
    keeps that share of its muon hits) and store them in the model; return them."""
    core = unwrap(model)
    _, records = evaluate_filter(model, loader, device, amp_dtype, working_points=())
    hits = records.arrays()
    if not hits["labels"].any():
        raise ValueError("the validation split holds no muon hit to set the working points' cuts on")
    cuts = {
        wp: threshold_at_efficiency(hits["scores"][hits["labels"]], wp) for wp in core.working_points.tolist()
    }
    core.set_cuts(cuts)
    return cuts


def hit_regions(
    dataset: MuonEventDataset, events: list[int], eta_edges: list[float]
) -> dict[str, np.ndarray]:
    """Per hit (in HitScores order): a mask per technology present and per |eta| region of the hit's
    position; the last region takes every |eta| above its lower edge."""
    reader = dataset.reader
    tech_col, low = reader.hit_index["spacePoint_technology"], [reader.hit_index[c] for c in DERIVED["eta"]]
    hits = [reader.read(e).hits for e in events]
    tech = np.concatenate([h[:, tech_col] for h in hits]).astype(int)
    x, y, z = (np.concatenate([h[:, c] for h in hits]) for c in low)
    abs_eta = np.abs(derived_features(x, y, z)["eta"])
    regions = {Technology(t).name: tech == t for t in np.unique(tech) if t in set(Technology)}
    for i, (lo, hi) in enumerate(itertools.pairwise(eta_edges)):
        last = i == len(eta_edges) - 2
        regions[f"abseta{lo:g}_{hi:g}".replace(".", "p")] = (abs_eta >= lo) & (last | (abs_eta < hi))
    return regions


def kept_metrics(
    hits: dict[str, np.ndarray], scores: np.ndarray, cut: float, events: int
) -> dict[str, float]:
    """Keeping the hits with score >= cut: efficiency, purity, background kept and rejection, the
    share of muons left with fewer than 3 hits and the hits kept per event."""
    kept = scores >= cut
    return {
        "threshold": float(cut),
        **at_threshold(scores, hits["labels"], cut),
        "muons_lost": muons_lost(hits["muon_ids"], kept),
        "hits_kept_per_event": float(kept.sum() / max(events, 1)),
    }


def road_metrics(hits: dict[str, np.ndarray], events: int) -> dict[str, float]:
    """The road search at its working points (at least n layers in the road), as `road/...`."""
    metrics = {"auc": roc_auc(hits["roads"], hits["labels"])}
    for layers in ROAD_WORKING_POINTS:
        metrics.update(
            {f"layers{layers}/{k}": v for k, v in kept_metrics(hits, hits["roads"], layers, events).items()}
        )
    return {f"{ROAD}/{k}": v for k, v in metrics.items()}


def filter_evaluation(
    model: nn.Module,
    loader: DataLoader,
    dataset: MuonEventDataset,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    working_points: list[float],
    eta_edges: list[float],
    out_dir: str | Path,
    prefix: str = "test",
) -> tuple[dict[str, float], str]:
    """Evaluate a split at the filter's stored cuts (set on validation; set on this split only for a
    model that has none, and the report says so), beside the road search; write the report
    (hit_filter.md, roc.png, scores.png) into `out_dir`; return (metrics `<prefix>/...`,
    `<prefix>/<region>/...`, `<prefix>/road/...`, and a readable summary)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, records = evaluate_filter(model, loader, device, amp_dtype, prefix, (), road=True)
    hits = records.arrays()
    scores, labels = hits["scores"], hits["labels"]
    stored = unwrap(model).stored_cuts()
    thresholds = stored or {
        wp: threshold_at_efficiency(scores[labels], wp) for wp in working_points if labels.any()
    }
    regions = {"all": np.ones(len(labels), bool), **hit_regions(dataset, records.events, eta_edges)}
    rows = {}
    for region, selected in regions.items():
        row = filter_metrics(scores[selected], labels[selected], list(thresholds), thresholds)
        rows[region] = {**row, "hits": int(selected.sum()), "muon_hits": int(labels[selected].sum())}
        metrics.update(
            {(f"{prefix}/{k}" if region == "all" else f"{prefix}/{region}/{k}"): v for k, v in row.items()}
        )
    events = len(records.events)
    for wp, cut in thresholds.items():
        for key, value in kept_metrics(hits, scores, cut, events).items():
            rows["all"][f"{working_point_name(wp)}/{key}"] = value
            metrics[f"{prefix}/{working_point_name(wp)}/{key}"] = value
    road = road_metrics(hits, events)
    metrics.update({f"{prefix}/{k}": v for k, v in road.items()})
    (out / "hit_filter.md").write_text(_markdown(rows, road, thresholds, events, bool(stored)))
    names = {working_point_name(wp): wp for wp in thresholds}
    points = {
        name: {k.split("/")[1]: v for k, v in rows["all"].items() if k.startswith(f"{name}/")}
        for name in names
    }
    road_curve = roc_curve(hits["roads"], labels)[:2]
    filter_roc({"filter": roc_curve(scores, labels)[:2], "road search": road_curve}, points, out / "roc.png")
    filter_scores(scores, labels, {name: thresholds[wp] for name, wp in names.items()}, out / "scores.png")
    return metrics, _summary(rows["all"], road, thresholds, events)


def _filter_cells(row: dict, name: str) -> list[str]:
    return [
        *(f"{row[f'{name}/{k}']:.4g}" for k in ("threshold", "efficiency", "purity", "background_kept")),
        f"{row[f'{name}/background_rejection']:.1f}",
    ]


def _kept_cells(row: dict, name: str) -> list[str]:
    return [
        *_filter_cells(row, name),
        f"{row[f'{name}/muons_lost']:.4f}",
        f"{row[f'{name}/hits_kept_per_event']:.0f}",
    ]


def _markdown(
    rows: dict[str, dict], road: dict[str, float], thresholds: dict[float, float], events: int, stored: bool
) -> str:
    wps = list(thresholds)
    where = (
        "set on the validation split and stored with the model"
        if stored
        else "set on these test hits (the model stores none)"
    )
    head = [
        "",
        "AUC",
        "cut",
        "efficiency",
        "purity",
        "bkg kept",
        "rejection",
        "muons < 3 hits",
        "hits kept / event",
    ]
    lines = [
        f"# Hit filter on {events} test events",
        "",
        f"Filter cuts {where}; the road search (muonreg.reco.road_search) keeps a hit with at least n "
        "detector layers hit in its road from the vertex. Both on the same hits.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for wp in wps:
        row, name = rows["all"], working_point_name(wp)
        lines.append(
            "| " + " | ".join([f"filter {wp:g}", f"{row['auc']:.5f}", *_kept_cells(row, name)]) + " |"
        )
    for layers in ROAD_WORKING_POINTS:
        name = f"{ROAD}/layers{layers}"
        lines.append(
            "| "
            + " | ".join([f"road >= {layers} layers", f"{road[f'{ROAD}/auc']:.4f}", *_kept_cells(road, name)])
            + " |"
        )
    head = ["region", "hits", "muon share", "AUC"]
    for wp in wps:
        head += [f"{wp:g}: cut", "efficiency", "purity", "bkg kept", "rejection"]
    lines += [
        "",
        "## The filter per region, at the same cuts",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for region, row in rows.items():
        cells = [
            region,
            str(row["hits"]),
            f"{row['muon_hits'] / max(row['hits'], 1):.4f}",
            f"{row['auc']:.4f}",
        ]
        for wp in wps:
            cells += _filter_cells(row, working_point_name(wp))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _summary(
    row: dict[str, float], road: dict[str, float], thresholds: dict[float, float], events: int
) -> str:
    lines = [
        f"hit filter, {events} events, {row['hits']} hits ({row['muon_hits']} of muons): AUC {row['auc']:.5f}"
    ]
    for wp in thresholds:
        name = working_point_name(wp)
        lines.append(
            f"  working point {wp:g}: cut {row[f'{name}/threshold']:.4g}, muon-hit efficiency "
            f"{row[f'{name}/efficiency']:.4f}, purity {row[f'{name}/purity']:.4f}, background kept "
            f"{row[f'{name}/background_kept']:.4g} (rejection {row[f'{name}/background_rejection']:.1f}), "
            f"muons left with < 3 hits {row[f'{name}/muons_lost']:.4f}"
        )
    efficient = [n for n in ROAD_WORKING_POINTS if road[f"{ROAD}/layers{n}/efficiency"] >= 0.99]
    best = max(efficient, default=ROAD_WORKING_POINTS[0])  # the tightest road keeping 99 % of muon hits
    name = f"{ROAD}/layers{best}"
    lines.append(
        f"  road search (AUC {road[f'{ROAD}/auc']:.4f}), >= {best} layers: efficiency {road[f'{name}/efficiency']:.4f}, "
        f"purity {road[f'{name}/purity']:.4f}, rejection {road[f'{name}/background_rejection']:.1f}"
    )
    return "\n".join(lines)

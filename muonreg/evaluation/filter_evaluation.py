"""The hit filter over a split: mean losses and filter metrics every epoch (validation), and at the
end of a run the test evaluation with its report: overall, per technology and per |eta| region of
the hits, at the working points' thresholds of the whole split, with ROC and score plots."""

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
from muonreg.evaluation.filter_metrics import filter_metrics, roc_curve, working_point_name
from muonreg.evaluation.inference import forward_loss, unwrap
from muonreg.evaluation.plots import filter_roc, filter_scores
from muonreg.models.hit_filter import muon_hit_labels
from muonreg.training.device import to_device


@dataclass
class HitScores:
    """Every real hit's score and label, event by event (`events`: their dataset indices)."""

    events: list[int] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def update(self, probability: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        valid = batch["hit_valid"].cpu().numpy()
        probability, labels = probability.float().cpu().numpy(), muon_hit_labels(batch).cpu().numpy()
        for i, event in enumerate(batch["event_index"].tolist()):
            self.events.append(event)
            self.scores.append(probability[i][valid[i]])
            self.labels.append(labels[i][valid[i]])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) of all hits, concatenated in event order."""
        if not self.events:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        return np.concatenate(self.scores), np.concatenate(self.labels)


@torch.no_grad()
def evaluate_filter(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    prefix: str = "val",
    working_points: tuple[float, ...] = (0.99, 0.995),
) -> tuple[dict[str, float], HitScores]:
    """Mean losses and filter metrics (`<prefix>/...`) of a split, with the hit scores behind them."""
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
        records.update(core.predict(outputs), batch)
    metrics = {f"{prefix}/{k}": v / max(n, 1) for k, v in sums.items()}
    scores, labels = records.arrays()
    metrics.update(
        {f"{prefix}/{k}": v for k, v in filter_metrics(scores, labels, list(working_points)).items()}
    )
    return metrics, records


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
    """Evaluate a split, write the report (hit_filter.md, roc.png, scores.png) into `out_dir`;
    return (metrics `<prefix>/...`, `<prefix>/<region>/...`, and a readable summary)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, records = evaluate_filter(model, loader, device, amp_dtype, prefix, tuple(working_points))
    scores, labels = records.arrays()
    overall = {k.removeprefix(f"{prefix}/"): v for k, v in metrics.items()}
    thresholds = {
        wp: overall[f"{working_point_name(wp)}/threshold"]
        for wp in working_points
        if f"{working_point_name(wp)}/threshold" in overall
    }
    regions = {"all": np.ones(len(labels), bool), **hit_regions(dataset, records.events, eta_edges)}
    rows = {}
    for region, selected in regions.items():
        row = filter_metrics(scores[selected], labels[selected], list(thresholds), thresholds)
        if region != "all":
            metrics.update({f"{prefix}/{region}/{k}": v for k, v in row.items()})
        rows[region] = {**row, "hits": int(selected.sum()), "muon_hits": int(labels[selected].sum())}
    (out / "hit_filter.md").write_text(_markdown(rows, list(thresholds), len(records.events)))
    background_kept, efficiency, _ = roc_curve(scores, labels)
    names = {working_point_name(wp): wp for wp in thresholds}
    points = {
        name: {k.split("/")[1]: v for k, v in rows["all"].items() if k.startswith(f"{name}/")}
        for name in names
    }
    filter_roc(background_kept, efficiency, points, out / "roc.png")
    filter_scores(scores, labels, {name: thresholds[wp] for name, wp in names.items()}, out / "scores.png")
    return metrics, _summary(rows["all"], list(thresholds), len(records.events))


def _markdown(rows: dict[str, dict], working_points: list[float], events: int) -> str:
    head = ["region", "hits", "muon share", "AUC"]
    for wp in working_points:
        head += [f"{wp:g}: cut", "efficiency", "purity", "bkg kept", "rejection"]
    lines = [
        f"# Hit filter on {events} test events",
        "",
        "Cuts are set on all test hits and applied unchanged to every region.",
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
        for wp in working_points:
            name = working_point_name(wp)
            cells += [
                f"{row[f'{name}/{k}']:.4g}" for k in ("threshold", "efficiency", "purity", "background_kept")
            ]
            cells.append(f"{row[f'{name}/background_rejection']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _summary(row: dict[str, float], working_points: list[float], events: int) -> str:
    lines = [
        f"hit filter, {events} events, {row['hits']} hits ({row['muon_hits']} of muons): AUC {row['auc']:.4f}"
    ]
    for wp in working_points:
        name = working_point_name(wp)
        lines.append(
            f"  working point {wp:g}: cut {row[f'{name}/threshold']:.4g}, muon-hit efficiency "
            f"{row[f'{name}/efficiency']:.4f}, purity {row[f'{name}/purity']:.4f}, background kept "
            f"{row[f'{name}/background_kept']:.4f} (rejection {row[f'{name}/background_rejection']:.1f})"
        )
    return "\n".join(lines)

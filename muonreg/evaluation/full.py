"""The evaluation of a split with every reference: what a run ends with, and `python -m muonreg.evaluate`.

The network's own metrics and records; the oracle (its regression on the truth hit assignment);
the least-squares fit of the truth hits (cached per dataset); the least-squares fit of the hits
the network assigned, plain and robust; then the report (tables, plots, `evaluation.displays` event
displays: best, typical and worst by pT residual) and a short summary. The oracle and the fit are
measured on the muons the network reconstructed (evaluation.same_muons).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from muonreg.data.dataset import MuonEventDataset
from muonreg.evaluation.assigned_fit import assigned_fit_rows
from muonreg.evaluation.inference import evaluate
from muonreg.evaluation.metrics import TrackRecords
from muonreg.evaluation.reference import fit_reference
from muonreg.evaluation.report import ASSIGNED_FIT, FIT, NETWORK, ORACLE, ROBUST_FIT, summary, write_report
from muonreg.evaluation.same_muons import lined_up, on_network_muons


def full_evaluation(
    model: nn.Module,
    loader: DataLoader,
    dataset: MuonEventDataset,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    evaluation: DictConfig,
    cache_dir: str | Path,
    out_dir: str | Path,
    prefix: str = "test",
) -> tuple[dict[str, float], str]:
    """Evaluate, write the report into `out_dir`; return (metrics `<prefix>/...`, a readable summary)."""
    oracle = TrackRecords()
    metrics, records = evaluate(model, loader, device, amp_dtype, prefix=prefix, diagnostics=oracle)
    network = records.arrays()
    methods = {NETWORK: network, ORACLE: on_network_muons(lined_up(oracle.arrays(), network), network)}
    reference = None
    if evaluation.fit_reference:
        reference = lined_up(fit_reference(dataset.reader, dataset.indices, cache_dir), network)
        methods[FIT] = on_network_muons(reference, network)
    if evaluation.get("assigned_fit_events", 0):
        for name, robust in ((ASSIGNED_FIT, False), (ROBUST_FIT, True)):
            methods[name] = assigned_fit_rows(records, dataset.reader, robust, evaluation.assigned_fit_events)
    extra, tables = write_report(
        out_dir, methods, list(evaluation.pt_bins), list(evaluation.eta_bins), reference
    )
    if evaluation.get("displays", 0):
        from muonreg.display import draw_examples  # matplotlib figures only when asked for
        from muonreg.evaluation.inference import unwrap

        draw_examples(
            unwrap(model), dataset, methods[NETWORK], Path(out_dir) / "displays", evaluation.displays
        )
    metrics.update({f"{prefix}/{k}": v for k, v in extra.items()})
    return metrics, summary(tables)

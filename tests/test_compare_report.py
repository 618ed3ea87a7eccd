"""The comparison report's table cells and plots, on hand-made rows (no MLflow needed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

from muonreg.compare import BINNED, METRICS, markdown, plot, varied


def _row(**values) -> dict:
    row = {"runs": 3, "status": "3 FINISHED"}
    for metric, _ in METRICS:
        row[metric], row[f"{metric} std"] = 0.5, 0.01
    row["test/fit_pt_resolution"], row["test/fit_pt_resolution std"] = 0.047, 0.0  # same in every seed
    return {**row, **values}


def test_markdown_shows_spread_and_a_zero_spread_as_zero():
    rows = [_row(inverse_fields="[pt]"), _row(inverse_fields="[]", status="2 FINISHED, 1 FAILED")]
    text = markdown(rows, ["inverse_fields", "seed"], "ablation")
    assert "| [pt] | 3 | 3 FINISHED | 0.5 ± 0.01 |" in text
    assert "| [] | 3 | 2 FINISHED, 1 FAILED |" in text
    assert text.count("0.047 ± 0 |") == 2


def test_categorical_and_numeric_parameters_are_both_plotted(tmp_path):
    rows = [_row(assignment_threshold=t, inverse_fields=f) for t in ("0.1", "0.5") for f in ("[pt]", "[]")]
    rows[0]["test/pt_resolution std"] = math.nan  # a single seed: no error bar, still plotted
    paths = plot(rows, ["assignment_threshold", "inverse_fields", "seed"], tmp_path)
    assert sorted(p.name for p in paths) == [
        "compare_assignment_threshold.png",
        "compare_inverse_fields.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_per_pt_bin_tables_show_the_network_beside_the_fit():
    row = _row(pooling="fit")
    for metric, value in (("test/pt_resolution", 0.06), ("ratio", 1.2), ("test/fit_pt_resolution", 0.05)):
        row[f"{metric}_pt5_10"], row[f"{metric}_pt5_10 std"] = value, 0.002
    for metric, _ in BINNED:
        row.setdefault(f"{metric}_pt5_10", math.nan)
        row.setdefault(f"{metric}_pt5_10 std", math.nan)
    text = markdown([row], ["pooling", "seed"], "pooling", ["pt5_10"])
    assert "### σ(pT)/pT per pT bin [GeV]" in text and "| pooling | 5-10 |" in text
    assert "| fit | 0.06 ± 0.002 |" in text and "| fit | 1.2 ± 0.002 |" in text
    assert pt_bins_order(["pt100_200", "pt5_10", "pt10_20"]) == ["pt5_10", "pt10_20", "pt100_200"]


def pt_bins_order(bins):
    from muonreg.compare import _bin_low

    return sorted(bins, key=_bin_low)


def test_a_param_that_only_newer_runs_log_is_not_a_difference():
    def run(**params):
        return SimpleNamespace(
            data=SimpleNamespace(params={k.replace("__", "."): v for k, v in params.items()})
        )

    runs = [
        run(seed="0", assignment_threshold="0.1"),  # logged before trainer.tf32 existed
        run(seed="1", assignment_threshold="0.1", trainer__tf32="True"),
        run(seed="0", assignment_threshold="0.5", trainer__tf32="True"),
    ]
    assert varied(runs) == ["assignment_threshold", "seed"]

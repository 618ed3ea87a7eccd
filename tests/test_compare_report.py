"""The comparison report's table cells, intervals, ranking and plots, on hand-made rows (no MLflow needed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from muonreg.compare import METRICS, _bin_low, markdown, metric_names, plot, spread, table, varied


def _row(**values) -> dict:
    row = {"runs": 3, "status": "3 FINISHED"}
    for name in metric_names(["validation", "heldout", "test"], ["pt5_10"]):
        row |= {name + k: v for k, v in spread([0.49, 0.5, 0.51]).items()}
    row |= {f"test/fit_pt_resolution{k}": v for k, v in spread([0.047] * 3).items()}  # same in every seed
    row |= {f"{p}/muons_pt5_10": 400.0 for p in ("validation", "heldout", "test")}
    return {**row, **values}


def test_a_three_seed_spread_is_a_student_t_interval_with_two_degrees_of_freedom():
    s = spread([1.0, 2.0, 3.0])  # mean 2, std 1: the 95 % t quantile at 2 dof is 4.303
    assert s[""] == 2 and s[" std"] == 1 and s[" n"] == 3
    assert s[" ci"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    single = spread([5.0])
    assert single[""] == 5 and math.isnan(single[" ci"]) and math.isnan(spread([])[""])


def test_markdown_shows_the_interval_and_a_zero_spread_as_zero():
    rows = [_row(inverse_fields="[pt]"), _row(inverse_fields="[]", status="2 FINISHED, 1 FAILED")]
    text = markdown(rows, ["inverse_fields", "seed"], "ablation", prefixes=["validation", "heldout", "test"])
    assert "| [pt] | 3 | 3 FINISHED | 0.5 ± 0.025 |" in text  # 4.303 * 0.01 / sqrt(3)
    assert "| [] | 3 | 2 FINISHED, 1 FAILED |" in text
    assert text.count("0.047 ± 0 |") == 2
    assert text.index("### validation") < text.index("### held-out") < text.index("### test split")


def test_rows_are_ranked_and_chosen_by_validation_and_each_validation_bin_marks_its_best():
    def run(threshold: str, seed: str, validation: float, test: float):
        metrics = {"validation/pt_resolution": validation, "test/pt_resolution": test}
        metrics |= {
            "validation/ratio_pt_resolution_pt5_10": validation * 20,
            "validation/muons_pt5_10": 400.0,
        }
        return SimpleNamespace(
            data=SimpleNamespace(params={"assignment_threshold": threshold, "seed": seed}, metrics=metrics),
            info=SimpleNamespace(status="FINISHED", run_id=f"{threshold}{seed}"),
        )

    runs = [run("0.1", "0", 0.06, 0.05), run("0.1", "1", 0.06, 0.05), run("0.5", "0", 0.05, 0.07)]
    rows = table(runs, ["assignment_threshold", "seed"])
    assert [r["assignment_threshold"] for r in rows] == ["0.5", "0.1"]  # by validation, not by test
    text = markdown(rows, ["assignment_threshold", "seed"], "sweep", ["pt5_10"], prefixes=["validation"])
    assert (
        "Chosen by validation (lowest mean validation/pt_resolution, rows ranked by it): assignment_threshold=0.5"
        in text
    )
    assert "| assignment_threshold | 5-10 (n=400) |" in text
    assert "| 0.5 | **1** |" in text and "| 0.1 | 1.2 ± 0 |" in text


def test_categorical_and_numeric_parameters_are_both_plotted(tmp_path):
    rows = [_row(assignment_threshold=t, inverse_fields=f) for t in ("0.1", "0.5") for f in ("[pt]", "[]")]
    rows[0]["heldout/pt_resolution ci"] = math.nan  # a single seed: no error bar, still plotted
    paths = plot(rows, ["assignment_threshold", "inverse_fields", "seed"], tmp_path, "heldout")
    assert sorted(p.name for p in paths) == [
        "compare_assignment_threshold.png",
        "compare_inverse_fields.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_per_pt_bin_tables_show_the_network_beside_the_fit():
    row = _row(pooling="fit")
    for metric, value in (("pt_resolution", 0.06), ("ratio_pt_resolution", 1.2), ("fit_pt_resolution", 0.05)):
        row |= {f"heldout/{metric}_pt5_10{k}": v for k, v in spread([value, value + 0.002]).items()}
    text = markdown([row], ["pooling", "seed"], "pooling", ["pt5_10"], prefixes=["heldout"])
    assert "#### heldout: σ(pT)/pT per pT bin [GeV]" in text and "| pooling | 5-10 (n=400) |" in text
    assert "| fit | 0.061 ± 0.013 |" in text and "| fit | 1.201 ± 0.013 |" in text  # 12.71 * 0.001
    assert sorted(["pt100_200", "pt5_10", "pt10_20"], key=_bin_low) == ["pt5_10", "pt10_20", "pt100_200"]
    assert len(METRICS) == len({m for m, _ in METRICS})


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

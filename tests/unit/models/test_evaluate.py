"""The evaluation on a small seeded subset: the JSON object's shape and value
ranges (the targets are for the full-series command, not for this subset)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from models.detectors import evaluate as ev

CSV = Path(__file__).resolve().parents[3] / "streams/replay/data/cryptopunks_sales.csv"
KEYS = {"drift_detected_share", "drift_delay_median", "false_alarms_per_10k", "spurious_alarms_per_10k"}


@pytest.fixture(scope="module")
def result():
    return ev.evaluate(CSV, seed_tune=1, seed_report=5, limit=1800, count=6,
                       detectors=("robust_cusum", "baseline", "page_hinkley"))


def _check_figures(figures):
    assert KEYS <= set(figures)
    assert 0.0 <= figures["drift_detected_share"] <= 1.0
    delay = figures["drift_delay_median"]
    assert delay is None or 1 <= delay <= ev.SHIFT_SALES
    assert 0 <= figures["spurious_alarms_per_10k"] <= figures["false_alarms_per_10k"]
    assert set(figures["by_factor"]) == {str(f) for f in ev.FACTORS}
    assert all(0 <= v <= 1 for v in figures["by_factor"].values())


def test_the_json_object_of_point_7(result):
    assert KEYS | {"default", "detectors"} <= set(result)
    assert result["default"] == "robust_cusum"
    assert set(result["detectors"]) == {"robust_cusum", "baseline", "page_hinkley"}
    for name, figures in result["detectors"].items():
        _check_figures(figures)
        assert figures["params"] and isinstance(figures["budget_met"], bool)
        assert 0 <= figures["chance_share"] <= 1
    for key in KEYS:
        assert result[key] == result["detectors"]["robust_cusum"][key]
    assert result["by_factor"] == result["detectors"]["robust_cusum"]["by_factor"]


def test_the_baseline_is_held_to_the_default_false_alarm_rate(result):
    assert result["detectors"]["baseline"]["false_alarms_per_10k"] <= result["false_alarms_per_10k"] + 1e-9


def test_it_says_what_was_run(result):
    e = result["evaluation"]
    assert e["sales"] == 1800 and e["seed_tune"] == 1 and e["seed_report"] == 5
    assert e["injections_per_factor"] == 6 and e["factors"] == list(ev.FACTORS)
    assert set(e["targets_met"]) >= {"drift_detected_share", "drift_delay_median", "false_alarms_per_10k",
                                     "spurious_alarms_per_10k", "above_baseline"}


def test_the_report_seed_is_never_the_tuning_seed():
    with pytest.raises(ValueError, match="must differ"):
        ev.evaluate(CSV, seed_tune=3, seed_report=3, limit=700, count=2)


def test_injection_points_are_seeded_and_leave_room_for_the_shift():
    a, b = ev.injection_points(5000, 1, 50), ev.injection_points(5000, 1, 50)
    assert a == b and a != ev.injection_points(5000, 2, 50)
    assert len(set(a)) == 50 and min(a) >= ev.WARMUP_SALES and max(a) <= 5000 - ev.SHIFT_SALES


def test_spurious_means_no_30_percent_move_around_the_alarm():
    flat = [1.0] * 1000
    step = [1.0] * 500 + [2.0] * 500
    assert ev.spurious_flags(flat)[500]
    assert not ev.spurious_flags(step)[500]
    assert ev.spurious_flags(step)[10] and ev.spurious_flags(step)[990]  # too close to an end to judge


def test_the_csv_is_read_exactly():
    sales = ev.load_sales(CSV, limit=3)
    assert [str(s.price) for s in sales] == ["0.01", "0.01", "0.1"]
    assert all(s.ts.tzinfo is not None and s.collection == "cryptopunks" for s in sales)
    assert not math.isnan(float(sales[0].price))

"""Each market detector finds a planted change and stays quiet on a stable market."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest

from models.detectors import market_detectors
from models.detectors.floor import FloorTracker
from models.detectors.median_threshold import MedianThreshold
from models.detectors.price_index import PriceIndex
from models.detectors.trend import TrendBreak
from models.detectors.volume import VolumeSpike
from models.scorer import prequential

from .helpers import T0, Listing, Sale, sales


def signals(scorer, records):
    return [s for _, out in prequential(scorer, records) for s in out.signals]


# -- trend_break --------------------------------------------------------------

TREND_SCORERS = {
    "robust_cusum": TrendBreak,
    "baseline": MedianThreshold,
}


@pytest.mark.parametrize("name", sorted(TREND_SCORERS))
def test_trend_detectors_stay_quiet_on_a_stable_market(name):
    quiet = sales([10.0] * 1500, seed=11)
    assert signals(TREND_SCORERS[name](), quiet) == []


@pytest.mark.parametrize("name", sorted(TREND_SCORERS))
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_trend_detectors_find_a_planted_level_shift(name, factor):
    shifted = sales([10.0] * 400 + [10.0 * factor] * 100, seed=5)
    found = signals(TREND_SCORERS[name](), shifted)
    assert len(found) == 1
    s = found[0]
    at = int(s.event_id[1:])
    assert 400 <= at < 440, f"alarm at sale {at}"
    ev = s.evidence
    assert ev["direction"] == ("up" if factor > 1 else "down")
    assert ev["level_before"] == pytest.approx(10.0, rel=0.1)
    assert ev["level_after"] == pytest.approx(10.0 * factor, rel=0.2)
    assert ev["change"] == pytest.approx(ev["level_after"] / ev["level_before"] - 1)
    assert {"detector", "version", "window", "statistic"} <= set(ev)
    assert s.kind == "trend_break" and s.collection == "punks" and not s.synthetic
    assert s.ts == shifted[at].ts


def test_trend_break_evidence_says_what_fired_and_over_which_sales():
    shifted = sales([10.0] * 300 + [20.0] * 60, seed=2)
    (s,) = signals(TrendBreak(), shifted)
    ev = s.evidence
    assert ev["detector"] == "robust_cusum" and ev["scorer"] == "trend_break" and s.version == TrendBreak.version
    assert ev["statistic"]["up"] > ev["statistic"]["h"] == 3.0
    assert ev["window"]["level_sales"] == 200
    assert ev["window"]["change_sales"] >= 1 and ev["window"]["change_from"] <= ev["window"]["to"]


@pytest.mark.parametrize("drift, params", [
    ("page_hinkley", {"min_instances": 15, "delta": 0.1, "threshold": 4.0}),
    ("adwin", {"delta": 0.002, "clock": 1}),
    ("kswin", {"alpha": 1e-4}),
])
def test_river_drift_detectors_on_the_residuals_find_a_doubling(drift, params):
    shifted = sales([10.0] * 300 + [20.0] * 120, seed=4)
    found = signals(TrendBreak(drift=drift, drift_params=params), shifted)
    assert any(int(s.event_id[1:]) >= 300 and s.evidence["direction"] == "up" for s in found)
    assert all(s.evidence["detector"].startswith("river.drift.") for s in found)


def test_holt_winters_level_finds_a_halving():
    shifted = sales([10.0] * 300 + [5.0] * 100, seed=8)
    found = signals(TrendBreak(level="holt_winters"), shifted)
    assert [s.evidence["direction"] for s in found if int(s.event_id[1:]) >= 300][:1] == ["down"]


def test_synthetic_sales_never_move_the_real_trend():
    real = sales([10.0] * 400, seed=1)
    fake = sales([10.0] * 200 + [40.0] * 200, seed=2, synthetic=True, prefix="f")
    mixed = sorted(real + fake, key=lambda r: r.ts)
    found = signals(TrendBreak(), mixed)
    assert found and all(s.synthetic for s in found)


def test_zero_prices_are_ignored():
    assert TrendBreak().key(replace(sales([1.0])[0], price=Decimal(0))) is None


# -- market_index ----------------------------------------------------------------

def test_price_index_is_the_median_of_recent_sales_and_counts_the_day():
    records = sales([10.0] * 60, seed=3, step_h=1.0)
    index = PriceIndex()
    rows = [r for _, out in prequential(index, records) for r in out.rows]
    assert len(rows) == len(records)
    last = rows[-1].values
    recent = sorted(r.price for r in records[-25:])
    assert last["index"] == recent[12] and last["index_sales"] == 25
    day = records[-24:]
    assert last["sales"] == 24 and last["volume"] == sum(r.price for r in day)
    assert last["floor"] is None and last["listings"] == 0
    assert rows[-1].series == "market_index" and rows[-1].key == "punks|ETH|real"


def test_price_index_floor_is_the_lowest_live_ask():
    listings = [Listing(f"l{i}", T0 + timedelta(hours=i), "punks", f"item{i}", Decimal(p))
                for i, p in enumerate(["12", "9", "15"])]
    sold = Sale("s1", T0 + timedelta(hours=5), "punks", "item1", Decimal("9.5"))  # the 9 ETH ask is gone
    later = Sale("s2", T0 + timedelta(days=9), "punks", "x", Decimal("10"))  # every ask expired (7 days)
    rows = [r for _, out in prequential(PriceIndex(), listings + [sold, later]) for r in out.rows]
    assert [r.values["floor"] for r in rows] == [Decimal("12"), None]
    assert rows[0].values["listings"] == 3


# -- floor_drop ------------------------------------------------------------------

def _asks(levels, seed=1, step_min=20):
    rng = random.Random(seed)
    return [Listing(f"l{i}", T0 + timedelta(minutes=step_min * i), "punks", str(rng.randrange(50)),
                    Decimal(str(round(level * (1 + 0.3 * rng.random()), 4))))
            for i, level in enumerate(levels)]


def test_floor_drop_stays_quiet_on_a_stable_book():
    assert signals(FloorTracker(), _asks([10.0] * 600)) == []
    assert signals(FloorTracker(), sales([10.0] * 600, seed=6, step_h=0.5)) == []


def test_floor_drop_from_listings():
    found = signals(FloorTracker(), _asks([10.0] * 200 + [6.0] * 100))
    assert len(found) == 1
    ev = found[0].evidence
    assert ev["source"] == "listings" and ev["drop"] >= 0.3 and ev["floor"] < 0.7 * ev["floor_high"]
    assert int(found[0].event_id[1:]) >= 200


def test_floor_drop_from_sales_when_nothing_is_listed():
    found = signals(FloorTracker(), sales([10.0] * 200 + [5.0] * 60, seed=9, step_h=0.5))
    # The 20th percentile of the last 20 sales falls in steps; a fall that goes
    # on after an alert may raise a second one (30% below the first alert's floor).
    assert 1 <= len(found) <= 2 and all(s.evidence["source"] == "sales" for s in found)
    assert 200 <= int(found[0].event_id[1:]) < 210
    assert found[0].evidence["floor_high"] == pytest.approx(10 * 0.8, rel=0.3)


# -- volume_spike ----------------------------------------------------------------

def _steady_then_surge(per_day=6, days=40, surge=80):
    times = [T0 + timedelta(days=i / per_day) for i in range(per_day * days)]
    if surge:
        times += [times[-1] + timedelta(minutes=10 * (i + 1)) for i in range(surge)]
    return [Sale(f"s{i}", t, "punks", str(i), Decimal("1")) for i, t in enumerate(times)]


def test_volume_spike_stays_quiet_at_a_steady_rate():
    assert signals(VolumeSpike(), _steady_then_surge(surge=0)) == []


def test_volume_spike_on_a_surge_once():
    records = _steady_then_surge()
    found = signals(VolumeSpike(), records)
    assert len(found) == 1
    ev = found[0].evidence
    assert ev["rate"] == "sales" and ev["count_24h"] >= 25 and ev["ratio"] >= 5
    assert ev["expected_24h"] == pytest.approx(6.0, rel=0.1)
    assert Decimal(ev["volume_24h"]) == ev["count_24h"]
    assert int(found[0].event_id[1:]) >= 240


def test_volume_spike_on_listings_too():
    records = [Listing(r.event_id, r.ts, r.collection, r.item_id, r.price) for r in _steady_then_surge()]
    (found,) = signals(VolumeSpike(), records)
    assert found.evidence["rate"] == "listings" and found.evidence["volume_24h"] is None


def test_the_default_set_of_market_detectors():
    names = [d.name for d in market_detectors()]
    assert names == ["market_index", "trend_break", "floor_drop", "volume_spike"]
    assert len(set(names)) == len(names)


def test_detectors_read_the_stream_records_as_they_are():
    from streams.records import Sale as StreamSale  # tests only: models never import streams

    rec = StreamSale(event_id="e1", ts=T0, collection="punks", item_id="1", buyer="b", seller="s",
                     price="12.5", currency="ETH")
    for scorer in market_detectors():
        key = scorer.key(rec)
        assert key == "punks|ETH|real"
        state = scorer.new_state(key)
        scorer.score(state, rec)
        scorer.learn(state, rec)
    assert math.isclose(float(rec.price), 12.5)

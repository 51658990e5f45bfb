"""The scorer protocol's contract, checked for every market detector.

score is pure (the checkpoint is byte-identical before and after), dump/load
round-trips (a restored state scores every later record exactly like the
original), and a checkpoint of another scorer, state version or parameters
is refused.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from models.detectors.floor import FloorParams, FloorTracker
from models.detectors.median_threshold import MedianThreshold
from models.detectors.price_index import IndexParams, PriceIndex
from models.detectors.trend import TrendBreak, TrendParams
from models.detectors.volume import VolumeParams, VolumeSpike
from models.scorer import CheckpointError, Scorer, encode_checkpoint

from .helpers import market

# Small settings so that a few hundred events exercise alarms, re-baselining and expiry.
SCORERS = {
    "price_index": lambda: PriceIndex(IndexParams(sales=9, day_s=6 * 3600)),
    "trend_break": lambda: TrendBreak(TrendParams(window=60, rearm=10)),
    "trend_break_page_hinkley": lambda: TrendBreak(TrendParams(window=60, rearm=10), drift="page_hinkley",
                                                   drift_params={"min_instances": 10, "threshold": 2.0}),
    "trend_break_adwin": lambda: TrendBreak(TrendParams(window=60, rearm=10), drift="adwin",
                                            drift_params={"delta": 0.1, "clock": 1}),
    "trend_break_kswin": lambda: TrendBreak(TrendParams(window=60, rearm=10), drift="kswin",
                                            drift_params={"alpha": 1e-3, "window_size": 40, "stat_size": 15}),
    "trend_break_holt_winters": lambda: TrendBreak(TrendParams(window=60, rearm=10), level="holt_winters"),
    "baseline": lambda: MedianThreshold(recent=9, reference=40, threshold=0.3),
    "floor_drop": lambda: FloorTracker(FloorParams(window_s=12 * 3600, min_listings=3, sales=8)),
    "volume_spike": lambda: VolumeSpike(VolumeParams(buckets=3, half_life_s=24 * 3600, warmup_s=6 * 3600,
                                                     min_events=5, multiple=2.5, rearm=1.5, cooldown_s=3600)),
}


def _outputs(scored):
    return (tuple((r.series, r.key, r.ts, tuple(sorted(r.values.items()))) for r in scored.rows),
            tuple((s.kind, s.event_id, s.severity, repr(sorted(s.evidence.items()))) for s in scored.signals))


@pytest.fixture(params=sorted(SCORERS))
def make(request):
    return SCORERS[request.param]


def test_is_a_scorer(make):
    scorer = make()
    assert isinstance(scorer, Scorer)
    assert scorer.kinds <= {"sales", "listings", "bids", "images"} and scorer.kinds
    assert isinstance(scorer.name, str) and scorer.name and isinstance(scorer.version, int)


def test_score_is_pure_and_checkpoints_round_trip(make):
    scorer = make()
    events = [e for e in market(n=360, shift_at=200, factor=0.4) if e.kind in scorer.kinds]
    states: dict = {}
    restored: dict = {}
    produced = 0
    for i, event in enumerate(events):
        key = scorer.key(event)
        if key is None:
            continue
        state = states.get(key) or scorer.new_state(key)
        before = scorer.dump(state)
        out = scorer.score(state, event)
        assert scorer.dump(state) == before, f"score changed the state at event {i}"
        assert _outputs(scorer.score(state, event)) == _outputs(out), "score is not deterministic"
        produced += len(out.rows) + len(out.signals)
        if i == len(events) // 2:  # checkpoint every key here and carry on with both copies
            restored = {k: scorer.load(scorer.dump(s)) for k, s in states.items()}
        if restored:
            twin = restored.get(key) or scorer.new_state(key)
            assert _outputs(scorer.score(twin, event)) == _outputs(out), f"restored state differs at event {i}"
            restored[key] = scorer.learn(twin, event)
        states[key] = scorer.learn(state, event)
        if restored:
            assert scorer.dump(restored[key]) == scorer.dump(states[key]), f"states diverged at event {i}"
    assert produced, "the stream should make this scorer produce something"


def test_other_versions_names_and_parameters_are_refused(make):
    scorer = make()
    events = [e for e in market(n=120) if e.kind in scorer.kinds]
    key = scorer.key(events[0])
    state = scorer.new_state(key)
    for event in events:
        if scorer.key(event) == key:
            state = scorer.learn(state, event)
    checkpoint = scorer.dump(state)

    newer = make()
    newer.version = scorer.version + 1  # instance attribute: the layout moved on
    with pytest.raises(CheckpointError, match="version"):
        newer.load(checkpoint)

    other = make()
    other.name = scorer.name + "-other"
    with pytest.raises(CheckpointError, match="belongs to scorer"):
        other.load(checkpoint)

    with pytest.raises(CheckpointError):
        scorer.load(b"not json at all")
    with pytest.raises(CheckpointError):
        scorer.load(encode_checkpoint("x", 1, {}) if scorer.name != "x" else b"{}")


@pytest.mark.parametrize("make_pair", [
    (lambda: TrendBreak(TrendParams(window=60)), lambda: TrendBreak(TrendParams(window=61))),
    (lambda: PriceIndex(), lambda: PriceIndex(IndexParams(sales=26))),
    (lambda: FloorTracker(), lambda: FloorTracker(replace(FloorParams(), drop=0.4))),
    (lambda: VolumeSpike(), lambda: VolumeSpike(replace(VolumeParams(), multiple=6.0))),
    (lambda: MedianThreshold(threshold=0.5), lambda: MedianThreshold(threshold=0.55)),
], ids=["trend", "index", "floor", "volume", "baseline"])
def test_a_checkpoint_written_with_other_parameters_is_refused(make_pair):
    first, second = make_pair[0](), make_pair[1]()
    state = first.new_state("punks|ETH|real")
    with pytest.raises(CheckpointError, match="other parameters"):
        second.load(first.dump(state))


def test_real_and_synthetic_events_never_share_state():
    scorer = TrendBreak()
    first = next(e for e in market(n=40) if e.kind == "sales")
    real, fake = replace(first, synthetic=False), replace(first, synthetic=True)
    assert scorer.key(real) != scorer.key(fake)
    assert scorer.key(real).endswith("|real") and scorer.key(fake).endswith("|synthetic")

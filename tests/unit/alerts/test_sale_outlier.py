"""alerts.kinds.sale_outlier: trailing-median outliers per (collection, currency)."""

from __future__ import annotations

import copy
import random
import statistics
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from alerts.alert import Alert, alert_id_for
from alerts.kinds.sale_outlier import KIND, SaleFacts, SaleOutlierRule

UTC = timezone.utc
T0 = datetime(2021, 1, 1, tzinfo=UTC)
WEEK = timedelta(days=7)
HUGE = Decimal(10) ** 15


def sale(event_id: str, ts: datetime, price, *, collection: str = "punks", currency: str = "ETH",
         item_id: str | None = None, synthetic: bool = False) -> SaleFacts:
    return SaleFacts(event_id, ts, collection, item_id or f"item-{event_id}", currency, Decimal(str(price)), synthetic)


def feed(rule: SaleOutlierRule, prices, start: datetime = T0, step: timedelta = timedelta(hours=1),
         prefix: str = "h", **kw) -> list:
    return [rule.observe(sale(f"{prefix}{i}", start + i * step, p, **kw)) for i, p in enumerate(prices)]


def probe(rule: SaleOutlierRule, ts: datetime, **kw) -> dict | None:
    """What the rule knows at ``ts``: the evidence a huge sale would get, on a copy
    of the rule (so the probe itself is never learned). None: the rule stays silent."""
    alert = copy.deepcopy(rule).observe(sale("probe", ts, HUGE, **kw))
    return None if alert is None else alert.evidence


# --- construction -----------------------------------------------------------------


@pytest.mark.parametrize("multiple", [1, 1.0, 0.5, 0, -3])
def test_rejects_multiple_not_above_one(multiple):
    with pytest.raises(ValueError, match="multiple"):
        SaleOutlierRule(multiple=multiple)


@pytest.mark.parametrize("min_history", [0, -1])
def test_rejects_min_history_below_one(min_history):
    with pytest.raises(ValueError, match="min_history"):
        SaleOutlierRule(min_history=min_history)


def test_rejects_a_negative_late_grace():
    with pytest.raises(ValueError, match="late_grace"):
        SaleOutlierRule(late_grace=timedelta(seconds=-1))


def test_accepts_smallest_valid_parameters():
    rule = SaleOutlierRule(multiple=1.01, window=WEEK, min_history=1)
    assert rule.observe(sale("a", T0, 100)) is None
    assert rule.observe(sale("b", T0 + timedelta(hours=1), 101)) is not None


# --- min_history and threshold ----------------------------------------------------


def test_silent_before_min_history():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=5)
    assert feed(rule, ["10"] * 4) == [None] * 4
    # 4 sales known: a 100x sale is still not judged
    assert rule.observe(sale("big-early", T0 + timedelta(hours=5), 1000)) is None


def test_speaks_once_min_history_is_reached():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=5)
    assert feed(rule, ["10"] * 5) == [None] * 5
    alert = rule.observe(sale("big", T0 + timedelta(hours=6), 1000))
    assert isinstance(alert, Alert)
    assert alert.evidence["window_sales"] == 5


@pytest.mark.parametrize(
    ("price", "alerts"),
    [("29.99", False), ("29.999999", False), ("30", True), ("30.00", True), ("30.01", True), ("300", True)],
)
def test_threshold_is_multiple_times_median_inclusive(price, alerts):
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["9", "10", "11"])
    alert = rule.observe(sale("x", T0 + timedelta(days=1), price))
    assert (alert is not None) is alerts
    if alert is not None:
        assert alert.evidence["median"] == "10"
        assert Decimal(alert.evidence["ratio"]) == (Decimal(price) / 10).quantize(Decimal("0.01")).normalize()


def test_fractional_multiple_is_exact():
    rule = SaleOutlierRule(multiple=2.5, window=WEEK, min_history=1)
    feed(rule, ["4"])
    assert probe(rule, T0 + timedelta(hours=1)) is not None
    assert rule.observe(sale("below", T0 + timedelta(hours=2), "9.99")) is None
    # the window now holds 4 and 9.99: median 6.995, threshold 17.4875
    assert rule.observe(sale("just-below", T0 + timedelta(hours=3), "17.4874")) is None
    # 4, 9.99, 17.4874 -> median 9.99, threshold 24.975
    assert rule.observe(sale("at", T0 + timedelta(hours=4), "24.975")) is not None


def test_even_count_median_is_the_mean_of_the_middle_two():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=2)
    feed(rule, ["10", "20"])
    assert probe(rule, T0 + timedelta(hours=3))["median"] == "15"
    assert rule.observe(sale("a", T0 + timedelta(hours=3), "44.99")) is None
    # 10, 20, 44.99 -> 20
    assert rule.observe(sale("b", T0 + timedelta(hours=4), "60")) is not None


def test_zero_median_never_alerts():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["0", "0", "0"])
    assert rule.observe(sale("x", T0 + timedelta(days=1), 5)) is None


def test_keys_are_separate_per_collection_and_currency():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 3, collection="punks", currency="ETH")
    assert rule.knows("punks", "ETH")
    assert not rule.knows("punks", "USD") and not rule.knows("meebits", "ETH")
    later = T0 + timedelta(days=1)
    assert rule.observe(sale("usd", later, 1000, currency="USD")) is None
    assert rule.observe(sale("other", later, 1000, collection="meebits")) is None
    assert rule.observe(sale("eth", later, 1000)) is not None


# --- window -----------------------------------------------------------------------


def test_sales_older_than_the_window_stop_counting():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 3)  # T0, T0+1h, T0+2h
    # exactly one window after the first sale: that sale sits on the edge and still counts
    assert probe(rule, T0 + WEEK)["window_sales"] == 3
    # one second later it has left: 2 < min_history, the rule is silent
    assert probe(rule, T0 + WEEK + timedelta(seconds=1)) is None
    assert rule.observe(sale("late", T0 + WEEK + timedelta(seconds=1), 1000)) is None
    # the expired sale is gone for good: +1h, +2h and the late sale remain
    assert probe(rule, T0 + WEEK + timedelta(seconds=2))["window_sales"] == 3


def test_expiry_changes_the_median():
    rule = SaleOutlierRule(multiple=3, window=timedelta(days=1), min_history=2)
    feed(rule, ["100", "100", "100"], start=T0, prefix="old")  # T0, +1h, +2h
    feed(rule, ["10", "10"], start=T0 + timedelta(hours=20), prefix="new")  # +20h, +21h
    ev = probe(rule, T0 + timedelta(hours=22))
    assert (ev["window_sales"], ev["median"]) == (5, "100")
    assert copy.deepcopy(rule).observe(sale("x", T0 + timedelta(hours=22), 30)) is None
    # the edge: at +1d+2h the +2h sale still counts (10, 10, 100 -> 10)
    assert probe(rule, T0 + timedelta(days=1, hours=2))["window_sales"] == 3
    # at +1d+3h every old sale has expired: 30 is now 3x the median of 10
    at = T0 + timedelta(days=1, hours=3)
    ev = probe(rule, at)
    assert (ev["window_sales"], ev["median"]) == (2, "10")
    assert rule.observe(sale("x", at, 30)) is not None


def test_a_long_quiet_period_empties_the_window():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 10)
    assert rule.observe(sale("after-a-month", T0 + timedelta(days=30), 1000)) is None
    assert probe(rule, T0 + timedelta(days=30, hours=1)) is None  # only one sale known


# --- ordering ---------------------------------------------------------------------


def test_out_of_order_sales_give_the_right_median():
    rng = random.Random(7)
    rows = [(T0 + timedelta(minutes=rng.randrange(0, 60 * 24 * 3)), f"e{i}", Decimal(rng.randrange(1, 10_000)) / 100)
            for i in range(301)]
    shuffled = rows[:]
    rng.shuffle(shuffled)
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=1)
    for ts, eid, price in shuffled:
        rule.observe(sale(eid, ts, price))
    ev = probe(rule, T0 + timedelta(days=4))
    assert ev["window_sales"] == 301
    assert Decimal(ev["median"]) == statistics.median(p for _, _, p in rows)


def test_out_of_order_sales_expire_by_their_own_time():
    rule = SaleOutlierRule(multiple=3, window=timedelta(days=1), min_history=1)
    # arrive newest first
    for h, price in ((30, "10"), (20, "20"), (10, "1000"), (5, "1000")):
        rule.observe(sale(f"h{h}", T0 + timedelta(hours=h), price))
    # at T0+31h the window starts at T0+7h: the sale at 5h left, 10h/20h/30h remain
    ev = probe(rule, T0 + timedelta(hours=31))
    assert (ev["window_sales"], ev["median"]) == (3, "20")
    # at T0+34h+1s only 20h and 30h remain
    ev = probe(rule, T0 + timedelta(hours=34, seconds=1))
    assert (ev["window_sales"], ev["median"]) == (2, "15")


def test_late_sales_are_counted_and_their_alerts_say_how_late():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3, late_grace=timedelta(minutes=20))
    feed(rule, ["10"] * 3)  # hours 0, 1, 2
    assert rule.late_sales == 0
    within_grace = rule.observe(sale("slightly", T0 + timedelta(minutes=100), 100))
    assert rule.late_sales == 0 and within_grace.evidence["late_by_s"] == 1200
    late = rule.observe(sale("late", T0 + timedelta(minutes=90), 100))
    assert rule.late_sales == 1
    assert late is not None and late.evidence["late_by_s"] == 1800
    # a redelivery is neither scored nor late; an in-order sale is not late
    assert rule.observe(sale("h0", T0, "10")) is None
    on_time = rule.observe(sale("next", T0 + timedelta(hours=3), 100))
    assert rule.late_sales == 1
    assert on_time is not None and on_time.evidence["late_by_s"] == 0


def test_median_matches_reference_over_a_random_stream():
    """Every decision equals a brute-force recomputation over the same window."""
    rng = random.Random(2024)
    window = timedelta(hours=12)
    rule = SaleOutlierRule(multiple=2, window=window, min_history=4)
    seen: list[tuple[datetime, str, Decimal]] = []
    t = T0
    for i in range(600):
        t += timedelta(minutes=rng.randrange(0, 40))
        ts = t - timedelta(minutes=rng.randrange(0, 90))  # jitter: out of order
        price = Decimal(rng.choice([rng.randrange(50, 150), rng.randrange(200, 400)]))
        eid = f"r{i}"
        alert = rule.observe(sale(eid, ts, price))
        # reference: the window is pruned by each sale's own time, cumulatively
        cut = ts - window
        seen = [r for r in seen if r[0] >= cut]
        expect = None
        if len(seen) >= 4:
            med = statistics.median(sorted(p for _, _, p in seen))
            if med > 0 and price >= 2 * med:
                expect = med
        assert (alert is None) == (expect is None), (i, alert, expect)
        if alert is not None:
            assert Decimal(alert.evidence["median"]) == expect
            assert alert.evidence["window_sales"] == len(seen)
        seen.append((ts, eid, price))


# --- idempotence ------------------------------------------------------------------


def test_the_same_event_twice_is_learned_once_and_alerts_once():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 3)
    big = sale("big", T0 + timedelta(hours=5), 100)
    first = rule.observe(big)
    assert first is not None
    assert rule.observe(big) is None
    assert rule.observe(big) is None
    ev = probe(rule, T0 + timedelta(hours=6))
    assert ev["window_sales"] == 4  # three 10s and one 100, not two
    assert ev["median"] == "10"


def test_duplicates_before_min_history_do_not_count_twice():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    s = sale("dup", T0, 10)
    for _ in range(5):
        assert rule.observe(s) is None
    rule.observe(sale("two", T0 + timedelta(hours=1), 10))
    # only 2 distinct sales known: still silent
    assert rule.observe(sale("big", T0 + timedelta(hours=2), 1000)) is None


def test_warm_seeds_the_window():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=5)
    assert not rule.knows("punks", "ETH")
    history = [(T0 + timedelta(hours=i), f"db{i}", Decimal("10"), False) for i in range(5)]
    rule.warm("punks", "ETH", history)
    assert rule.knows("punks", "ETH")
    assert not rule.knows("punks", "USD")
    alert = rule.observe(sale("live", T0 + timedelta(days=1), 50))
    assert alert is not None and alert.evidence["window_sales"] == 5


def test_warm_then_redelivery_of_a_stored_sale_is_not_alerted_or_counted():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    history = [(T0 + timedelta(hours=i), f"db{i}", Decimal(p), False) for i, p in enumerate(["10", "10", "10", "100"])]
    rule.warm("punks", "ETH", reversed(history))  # order of the query does not matter
    assert rule.observe(sale("db3", T0 + timedelta(hours=3), 100)) is None
    # warming the same rows again (a second start) does not double count
    rule.warm("punks", "ETH", history)
    ev = probe(rule, T0 + timedelta(hours=4))
    assert ev["window_sales"] == 4 and ev["median"] == "10"


def test_warm_with_empty_history_marks_the_key_known():
    rule = SaleOutlierRule()
    rule.warm("punks", "ETH", [])
    assert rule.knows("punks", "ETH")


# --- real and synthetic sales apart ---------------------------------------------------


def test_a_real_sale_is_judged_only_against_real_sales():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 3)  # real
    feed(rule, ["1000"] * 10, prefix="syn", synthetic=True)  # cheap real sales look dear to synthetic ones
    ev = probe(rule, T0 + timedelta(days=1))
    assert (ev["window_sales"], ev["median"]) == (3, "10")  # none of the ten synthetic sales counted
    alert = rule.observe(sale("real-40", T0 + timedelta(days=1), 40))
    assert alert is not None and alert.synthetic is False and alert.evidence["median"] == "10"


def test_a_synthetic_sale_is_judged_only_against_synthetic_sales():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 5)  # real
    feed(rule, ["100"] * 2, prefix="syn", synthetic=True)
    # 2 synthetic sales known: below min_history, so silent, though 40x the real median
    assert rule.observe(sale("syn-big", T0 + timedelta(days=1), 400, synthetic=True)) is None
    # the third synthetic one makes history; judged against the synthetic median only
    alert = rule.observe(sale("syn-big2", T0 + timedelta(days=1, hours=1), 1000, synthetic=True))
    assert alert is not None and alert.synthetic is True
    assert (alert.evidence["median"], alert.evidence["window_sales"]) == ("100", 3)
    # and nothing synthetic moved the real window
    ev = probe(rule, T0 + timedelta(days=2))
    assert (ev["window_sales"], ev["median"]) == (5, "10")


def test_warm_splits_history_by_kind_and_marks_both_known():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=2)
    history = [(T0 + timedelta(hours=i), f"db{i}", Decimal(p), syn)
               for i, (p, syn) in enumerate([("10", False), ("500", True), ("10", False), ("500", True)])]
    rule.warm("punks", "ETH", history)
    assert rule.knows("punks", "ETH")
    real = rule.observe(sale("r", T0 + timedelta(hours=5), 31))
    assert real is not None and (real.evidence["median"], real.evidence["window_sales"]) == ("10", 2)
    assert rule.observe(sale("s", T0 + timedelta(hours=5), 1000, synthetic=True)) is None  # 2x 500: no outlier
    with pytest.raises(ValueError):  # a row without its kind is refused, never taken for a real sale
        rule.warm("punks", "USD", [(T0, "x", Decimal(1))])


def test_the_same_event_id_in_both_kinds_is_learnt_in_each():
    """Windows are separate all the way: ids too (a conflicting duplicate that
    flips ``synthetic`` is refused by the sink; the rule never mixes them)."""
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=1)
    rule.observe(sale("same", T0, 10))
    rule.observe(sale("same", T0, 10, synthetic=True))
    assert probe(rule, T0 + timedelta(hours=1))["window_sales"] == 1
    assert probe(rule, T0 + timedelta(hours=1), synthetic=True)["window_sales"] == 1


def test_forget_removes_only_that_version_of_an_id():
    """A conflicting duplicate (same id, other ts or price) must not take the stored version out."""
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=1)
    feed(rule, [10, 20, 30])  # h0, h1, h2
    other_price = sale("h1", T0 + timedelta(hours=1), 99)
    other_time = sale("h1", T0 + timedelta(hours=1, minutes=5), 20)
    other_kind = sale("h1", T0 + timedelta(hours=1), 20, synthetic=True)
    for version in (other_price, other_time, other_kind):
        assert rule.observe(version) is None or version is other_kind  # seen (or another window)
        rule.forget(version)
        ev = probe(rule, T0 + timedelta(hours=3))
        assert (ev["window_sales"], ev["median"]) == (3, "20"), version
    rule.forget(sale("h1", T0 + timedelta(hours=1), 20))  # the very version: gone
    assert probe(rule, T0 + timedelta(hours=3))["window_sales"] == 2


def test_learn_adds_without_scoring():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=1)
    feed(rule, [10])
    rule.learn(sale("quiet", T0 + timedelta(hours=1), 1000))  # would alert if scored
    rule.learn(sale("quiet", T0 + timedelta(hours=1), 1000))  # twice: once
    ev = probe(rule, T0 + timedelta(hours=2))
    assert ev["window_sales"] == 2


# --- the alert itself ---------------------------------------------------------------


def test_alert_fields_and_deterministic_id():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 3, synthetic=True)
    ts = T0 + timedelta(hours=10)
    alert = rule.observe(sale("0xdead", ts, "45", item_id="7804", synthetic=True))
    assert alert.alert_id == alert_id_for(KIND, "0xdead") == alert_id_for("sale_outlier", "0xdead")
    assert (alert.kind, alert.ts, alert.subject, alert.collection, alert.synthetic) == (
        "sale_outlier", ts, "7804", "punks", True,
    )
    assert alert.severity == "medium"
    assert alert.evidence["event_id"] == "0xdead"
    assert alert.evidence["price"] == "45"
    assert alert.evidence["currency"] == "ETH"
    assert alert.evidence["ratio"] == "4.5"
    assert alert.evidence["window_days"] == 7
    assert alert.evidence["late_by_s"] == 0


def test_same_evidence_same_id_across_rule_instances():
    ids = []
    for _ in range(2):
        rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
        feed(rule, ["10"] * 3)
        ids.append(rule.observe(sale("e-42", T0 + timedelta(days=1), 100)).alert_id)
    assert ids[0] == ids[1]
    assert alert_id_for(KIND, "e-42") != alert_id_for(KIND, "e-43")
    assert alert_id_for(KIND, "e-42") != alert_id_for("other_kind", "e-42")


def test_severity_high_from_twice_the_multiple():
    rule = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule, ["10"] * 3)
    assert rule.observe(sale("m", T0 + timedelta(hours=5), "59.9")).severity == "medium"
    rule2 = SaleOutlierRule(multiple=3, window=WEEK, min_history=3)
    feed(rule2, ["10"] * 3)
    assert rule2.observe(sale("h", T0 + timedelta(hours=5), "60")).severity == "high"


def test_ratio_beyond_the_default_decimal_precision_is_exact():
    """Prices span 1e-18 to 1e21: a ratio of 1e38 must alert, not raise."""
    rule = SaleOutlierRule(min_history=3)
    feed(rule, ["0.000000000000000001"] * 3)
    alert = rule.observe(sale("big", T0 + timedelta(hours=5), "100000000000000000000"))
    assert alert is not None and alert.severity == "high"
    assert alert.evidence["ratio"] == "1" + "0" * 38


def test_forget_takes_a_learnt_sale_back():
    rule = SaleOutlierRule(min_history=3)
    feed(rule, [10, 10, 10])
    zero = sale("refused", T0 + timedelta(hours=3), 0)
    rule.observe(zero)
    assert probe(rule, T0 + timedelta(hours=4))["window_sales"] == 4
    rule.forget(zero)
    rule.forget(zero)  # twice, or never learnt: no harm
    rule.forget(sale("unknown", T0, 1, collection="other"))
    evidence = probe(rule, T0 + timedelta(hours=4))
    assert (evidence["window_sales"], evidence["median"]) == (3, "10")
    assert rule.observe(zero) is None  # learnable again, e.g. after a fix and a replay

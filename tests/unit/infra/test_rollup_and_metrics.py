"""infra.db.rollup.fold against a reference; metric names, labels and BulkHistogram."""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infra.db.rollup import fold
from infra.metrics import _BATCH_BUCKETS, _LATENCY_BUCKETS, BulkHistogram, Metrics, build_metrics

UTC = timezone.utc
ZONES = [UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-7))]


# --- fold ---------------------------------------------------------------------------
# fold returns (minute groups, hour groups), keyed (bucket, collection, currency,
# synthetic); both levels are checked against the obvious computation below.


def random_rows(seed: int, n: int) -> list[tuple[datetime, str, str, bool, Decimal]]:
    rng = random.Random(seed)
    start = datetime(2021, 8, 1, 22, 0, tzinfo=UTC)
    rows = []
    for _ in range(n):
        ts = start + timedelta(seconds=rng.randrange(0, 4 * 3600), microseconds=rng.randrange(0, 1_000_000))
        if rng.random() < 0.05:  # boundaries: exactly on, and just before, a minute / hour
            ts = ts.replace(second=rng.choice([0, 59]), microsecond=rng.choice([0, 999_999]))
        ts = ts.astimezone(rng.choice(ZONES))  # same instant, any zone
        # wei-precision ETH, cents, whole yuan: all must add up exactly
        price = rng.choice([
            Decimal(rng.randrange(0, 10**22)).scaleb(-18),
            Decimal(rng.randrange(0, 10**9)).scaleb(-2),
            Decimal(rng.randrange(1, 50_000_000)),
        ])
        rows.append((ts, rng.choice(["punks", "meebits", "poly"]), rng.choice(["ETH", "USD"]), rng.random() < 0.3, price))
    return rows


def reference(rows, unit: str) -> dict:
    """The obvious computation: truncate the UTC time, then group (real and synthetic apart)."""
    groups: dict = defaultdict(list)
    for ts, collection, currency, synthetic, price in rows:
        utc = ts.astimezone(UTC)
        bucket = utc.replace(second=0, microsecond=0)
        if unit == "hour":
            bucket = bucket.replace(minute=0)
        groups[(bucket, collection, currency, synthetic)].append(price)
    out = {}
    with localcontext() as ctx:
        ctx.prec = 200  # exact for these inputs
        for key, prices in groups.items():
            n = len(prices)
            out[key] = [n, n if key[3] else 0, sum(prices, Decimal(0)), min(prices), max(prices)]
    return out


def assert_groups_equal(got: dict, want: dict) -> None:
    assert want, "an empty reference proves nothing"
    assert set(got) == set(want)
    for key, g in got.items():
        assert g == want[key], key
        n, n_syn, volume, lo, hi = g
        assert type(n) is int and type(n_syn) is int
        assert all(isinstance(v, Decimal) for v in (volume, lo, hi))  # no float ever crept in


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fold_matches_reference(seed):
    rows = random_rows(seed, 5000)
    minutes, hours = fold(rows)
    assert_groups_equal(minutes, reference(rows, "minute"))
    assert_groups_equal(hours, reference(rows, "hour"))
    assert sum(g[0] for g in minutes.values()) == sum(g[0] for g in hours.values()) == len(rows)
    assert len(hours) < len(minutes)  # the hour level really groups


def test_fold_keeps_real_and_synthetic_apart():
    """A synthetic sale never moves a real group's volume, min or max."""
    t = datetime(2021, 1, 1, 10, 0, 30, tzinfo=UTC)
    rows = [(t, "c", "ETH", False, Decimal(2)), (t, "c", "ETH", True, Decimal(1000)),
            (t + timedelta(minutes=5), "c", "ETH", True, Decimal("0.5")), (t, "c", "ETH", False, Decimal(4))]
    minutes, hours = fold(rows)
    m, h = t.replace(second=0), t.replace(minute=0, second=0)
    assert minutes[(m, "c", "ETH", False)] == [2, 0, Decimal(6), Decimal(2), Decimal(4)]
    assert minutes[(m, "c", "ETH", True)] == [1, 1, Decimal(1000), Decimal(1000), Decimal(1000)]
    assert hours == {
        (h, "c", "ETH", False): [2, 0, Decimal(6), Decimal(2), Decimal(4)],
        (h, "c", "ETH", True): [2, 2, Decimal("1000.5"), Decimal("0.5"), Decimal(1000)],
    }


def test_fold_keys_are_utc_bucket_starts():
    rows = random_rows(9, 2000)
    minutes, hours = fold(rows)
    assert minutes and hours
    for (bucket, _, _, _) in minutes:
        assert bucket.tzinfo is not None and bucket.utcoffset() == timedelta(0)
        assert (bucket.second, bucket.microsecond) == (0, 0)
    for (bucket, _, _, _) in hours:
        assert bucket.tzinfo is not None and bucket.utcoffset() == timedelta(0)
        assert (bucket.minute, bucket.second, bucket.microsecond) == (0, 0, 0)


def test_fold_groups_by_utc_time_not_local_time():
    # 10:20 and 10:50 in India (+05:30) are 04:50 and 05:20 UTC: two UTC hours.
    ist = timezone(timedelta(hours=5, minutes=30))
    a = datetime(2021, 1, 1, 10, 20, 5, tzinfo=ist)
    b = datetime(2021, 1, 1, 10, 50, 59, tzinfo=ist)
    minutes, hours = fold([(a, "c", "ETH", False, Decimal(1)), (b, "c", "ETH", False, Decimal(3))])
    assert minutes == {
        (datetime(2021, 1, 1, 4, 50, tzinfo=UTC), "c", "ETH", False): [1, 0, Decimal(1), Decimal(1), Decimal(1)],
        (datetime(2021, 1, 1, 5, 20, tzinfo=UTC), "c", "ETH", False): [1, 0, Decimal(3), Decimal(3), Decimal(3)],
    }
    assert all(k[0].tzinfo is not None and k[0].utcoffset() == timedelta(0) for k in minutes)
    assert hours == {  # local time would put both in 10:00
        (datetime(2021, 1, 1, 4, tzinfo=UTC), "c", "ETH", False): [1, 0, Decimal(1), Decimal(1), Decimal(1)],
        (datetime(2021, 1, 1, 5, tzinfo=UTC), "c", "ETH", False): [1, 0, Decimal(3), Decimal(3), Decimal(3)],
    }


def test_fold_minute_and_hour_edges():
    t = datetime(2021, 1, 1, 10, 0, tzinfo=UTC)
    rows = [
        (t - timedelta(microseconds=1), "c", "ETH", False, Decimal("1")),
        (t, "c", "ETH", False, Decimal("2")),
        (t + timedelta(seconds=59, microseconds=999_999), "c", "ETH", False, Decimal("4")),
        (t + timedelta(seconds=60), "c", "ETH", False, Decimal("8")),
        (t + timedelta(minutes=59, seconds=59, microseconds=999_999), "c", "ETH", False, Decimal("16")),
        (t + timedelta(hours=1), "c", "ETH", False, Decimal("32")),
    ]
    minutes, hours = fold(rows)
    assert minutes == {
        (t - timedelta(minutes=1), "c", "ETH", False): [1, 0, Decimal(1), Decimal(1), Decimal(1)],
        (t, "c", "ETH", False): [2, 0, Decimal(6), Decimal(2), Decimal(4)],
        (t + timedelta(minutes=1), "c", "ETH", False): [1, 0, Decimal(8), Decimal(8), Decimal(8)],
        (t + timedelta(minutes=59), "c", "ETH", False): [1, 0, Decimal(16), Decimal(16), Decimal(16)],
        (t + timedelta(hours=1), "c", "ETH", False): [1, 0, Decimal(32), Decimal(32), Decimal(32)],
    }
    assert hours == {
        (t - timedelta(hours=1), "c", "ETH", False): [1, 0, Decimal(1), Decimal(1), Decimal(1)],
        (t, "c", "ETH", False): [4, 0, Decimal(30), Decimal(2), Decimal(16)],
        (t + timedelta(hours=1), "c", "ETH", False): [1, 0, Decimal(32), Decimal(32), Decimal(32)],
    }


def test_fold_min_max_in_any_order():
    t = datetime(2021, 1, 1, tzinfo=UTC)
    prices = [Decimal(p) for p in ("5", "3", "9", "1", "9.5", "0", "7")]
    for order in (prices, prices[::-1], sorted(prices), sorted(prices, reverse=True)):
        # one minute apart each: the hour's min and max come from different minute groups
        minutes, hours = fold([(t + timedelta(minutes=i), "c", "ETH", False, p) for i, p in enumerate(order)])
        assert len(minutes) == 7
        (h,) = hours.values()
        assert h == [7, 0, Decimal("34.5"), Decimal(0), Decimal("9.5")]
        (m,) = fold([(t, "c", "ETH", False, p) for p in order])[0].values()
        assert m == [7, 0, Decimal("34.5"), Decimal(0), Decimal("9.5")]


def test_fold_sums_beyond_the_default_decimal_precision():
    """Prices carry up to ~39 digits (1e-18 to 1e21); the volume must be exact, as numeric is."""
    t = datetime(2021, 1, 1, 10, 0, tzinfo=timezone.utc)
    prices = [Decimal("10000000000"), Decimal("0.000000000000000001"), Decimal("999999999999999999999.999999999999999999")]
    # the last one a minute later: the hour sums across minute groups, also exactly
    minutes, hours = fold((t + timedelta(minutes=i // 2), "c", "ETH", False, p) for i, p in enumerate(prices))
    assert len(minutes) == 2
    (group,) = hours.values()
    assert str(group[2]) == "1000000000010000000000.000000000000000000"


def test_fold_empty():
    assert fold([]) == ({}, {})


def test_fold_accepts_an_iterator():
    rows = random_rows(4, 100)
    assert fold(iter(rows)) == fold(rows)


# --- metric names -----------------------------------------------------------------------

SUBSYSTEMS = {"streams", "infra", "alerts", "models"}
# base units (and counted things) a histogram or gauge may end in
UNITS = {"seconds", "bytes", "rows", "messages", "partitions", "events", "ratio", "info"}
NAME = re.compile(r"^artwatch_(?P<subsystem>[a-z]+)_(?P<rest>[a-z0-9_]+)$")
ID_LIKE = re.compile(
    r"(^|_)(id|ids|uuid|collection|collections|item|items|wallet|wallets|token|tokens|address|buyer|seller|"
    r"bidder|owner|user|tx|hash|event|subject|alert)(_|$)"
)


@pytest.fixture
def metrics() -> Metrics:
    m = build_metrics(CollectorRegistry())
    # touch one child of each labelled metric so every family has samples
    for value in vars(m).values():
        if isinstance(value, (Counter, Gauge, Histogram)):
            labels = value._labelnames
            child = value.labels(**{n: "0" for n in labels}) if labels else value
            if isinstance(value, Histogram):
                child.observe(1)
            elif isinstance(value, Counter):
                child.inc()
            else:
                child.set(1)
        elif isinstance(value, BulkHistogram):
            value.labels(**{n: "0" for n in value.labelnames}).observe_many([0.1, 2.0])
    return m


def families(m: Metrics):
    """The metric families as the registry defines them (the text parser would
    split out each ``_created`` series as a family of its own)."""
    return list(m.registry.collect())


def test_every_metric_field_is_on_the_registry(metrics):
    names = {f.name for f in metrics.registry.collect()}
    fields = [v for k, v in vars(metrics).items() if k != "registry"]
    assert len(names) == len(fields)
    assert len(fields) >= 11
    for v in fields:
        name = v.name if isinstance(v, BulkHistogram) else v._name
        assert name in names


def test_metric_names_follow_the_convention(metrics):
    fams = families(metrics)
    assert fams
    for f in fams:
        match = NAME.match(f.name)
        assert match, f.name
        assert match["subsystem"] in SUBSYSTEMS, f.name
        parts = match["rest"].split("_")
        if f.type == "counter":
            assert f.name.endswith("_total") is False  # family name; the sample carries _total
            assert len(parts) >= 1
            for s in f.samples:
                assert s.name in (f.name + "_total", f.name + "_created"), s.name
        else:
            assert f.type in ("histogram", "gauge"), (f.name, f.type)
            assert len(parts) >= 2, f"{f.name}: needs <name>_<unit>"
            assert parts[-1] in UNITS, f"{f.name}: unit {parts[-1]!r} is not a base unit"
            assert "milliseconds" not in f.name and "_ms" not in f.name


def test_counters_end_in_total_in_exposition(metrics):
    text = generate_latest(metrics.registry).decode()
    counters = re.findall(r"^# TYPE (\S+) counter$", text, re.M)
    assert {
        "artwatch_streams_events_in_total", "artwatch_streams_deadletter_total",
        "artwatch_infra_db_retries_total", "artwatch_alerts_emitted_total",
    } <= set(counters)
    for name in counters:
        assert name.endswith("_total"), name
        assert re.search(rf"^{name}\{{", text, re.M), f"no {name} sample"
    # and the parsed exposition agrees: every counter sample is a *_total
    for fam in text_string_to_metric_families(text):
        if fam.type == "counter":
            assert fam.samples and all(s.name.endswith("_total") for s in fam.samples), fam.name


def test_histograms_expose_their_unit_last_then_the_suffix(metrics):
    text = generate_latest(metrics.registry).decode()
    hists = re.findall(r"^# TYPE (\S+) histogram$", text, re.M)
    assert {
        "artwatch_infra_db_batch_rows",
        "artwatch_infra_db_batch_duration_seconds",
        "artwatch_streams_event_to_stored_seconds",
    } <= set(hists)
    for name in hists:
        for suffix in ("_bucket{", "_sum{", "_count{"):
            assert name + suffix in text, name + suffix


def test_no_label_is_an_identifier(metrics):
    seen = set()
    for f in families(metrics):
        for s in f.samples:
            for label in s.labels:
                if label in ("le", "quantile"):
                    continue
                seen.add(label)
                assert not ID_LIKE.search(label), f"{f.name}: label {label!r} is unbounded"
    # the documented bounded labels (infra/metrics.py docstring), nothing else
    assert seen <= {"topic", "partition", "reason", "table", "kind"}
    assert {"topic", "reason", "table"} <= seen


def test_build_metrics_uses_the_given_registry_only():
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    m1, m2 = build_metrics(r1), build_metrics(r2)  # two builds never clash
    m1.events_in.labels(topic="sales").inc(2)
    assert r1.get_sample_value("artwatch_streams_events_in_total", {"topic": "sales"}) == 2
    assert r2.get_sample_value("artwatch_streams_events_in_total", {"topic": "sales"}) is None
    assert m2.registry is r2
    with pytest.raises(ValueError):
        build_metrics(r1)  # duplicate names on one registry are refused


# --- BulkHistogram -------------------------------------------------------------------------


def _values(seed: int, bounds) -> list[float]:
    rng = np.random.default_rng(seed)
    vals = list(rng.lognormal(mean=-2.0, sigma=2.5, size=3000))
    vals += [float(b) for b in bounds] * 3  # exactly on a bound: counts in that bucket (le)
    vals += [math.nextafter(float(b), math.inf) for b in bounds]  # just above
    vals += [0.0, -1.0, 1e12, math.inf]
    random.Random(seed).shuffle(vals)
    return vals


def _bucket_lines(registry: CollectorRegistry, name: str) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines() if line.startswith((name + "_bucket", name + "_count")))


@pytest.mark.parametrize("buckets", [_LATENCY_BUCKETS, _BATCH_BUCKETS, (0.5,), (1e-5, 3.0, 7.25)])
@pytest.mark.parametrize("chunk", [1, 7, 500, 100_000])
def test_bulk_histogram_equals_prometheus_histogram(buckets, chunk):
    name = "artwatch_test_latency_seconds"
    ref_registry, bulk_registry = CollectorRegistry(), CollectorRegistry()
    ref = Histogram(name, "Reference.", ["topic"], buckets=buckets, registry=ref_registry)
    bulk = BulkHistogram(name, "Bulk.", ["topic"], buckets, bulk_registry)
    for topic, seed in (("sales", 1), ("bids", 2)):
        values = _values(seed, buckets)
        for v in values:
            ref.labels(topic=topic).observe(v)
        child = bulk.labels(topic=topic)
        for i in range(0, len(values), chunk):
            child.observe_many(values[i:i + chunk])
        child.observe_many([])  # no-op
    # identical exposition of buckets (le labels included) and counts
    assert _bucket_lines(bulk_registry, name) == _bucket_lines(ref_registry, name)
    for topic in ("sales", "bids"):
        les = [str(float(b)) for b in buckets] + ["+Inf"]
        for le in les:
            want = ref_registry.get_sample_value(name + "_bucket", {"topic": topic, "le": le})
            got = bulk_registry.get_sample_value(name + "_bucket", {"topic": topic, "le": le})
            assert got == want, (topic, le)
        # sums differ only by float summation order
        want_sum = ref_registry.get_sample_value(name + "_sum", {"topic": topic})
        got_sum = bulk_registry.get_sample_value(name + "_sum", {"topic": topic})
        assert got_sum == pytest.approx(want_sum, rel=1e-9) or (math.isinf(got_sum) and math.isinf(want_sum))


def test_bulk_histogram_single_observe_and_unsorted_buckets():
    r, ref_r = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("artwatch_x_seconds", "X.", [], (5.0, 0.1, 1.0), r)
    ref = Histogram("artwatch_x_seconds", "X.", buckets=(0.1, 1.0, 5.0), registry=ref_r)
    for v in (0.05, 0.1, 0.3, 1.0, 4.0, 6.0):
        bulk.labels().observe(v)
        ref.observe(v)
    assert _bucket_lines(r, "artwatch_x_seconds") == _bucket_lines(ref_r, "artwatch_x_seconds")


def test_bulk_histogram_exposition_parses_as_a_histogram():
    m = build_metrics(CollectorRegistry())
    m.event_to_stored.labels(topic="sales").observe_many(np.array([0.001, 0.2, 0.2, 45.0, 120.0]))
    (fam,) = [f for f in families(m) if f.name == "artwatch_streams_event_to_stored_seconds"]
    assert fam.type == "histogram"
    buckets = [s for s in fam.samples if s.name.endswith("_bucket")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts)  # cumulative
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 5
    assert m.registry.get_sample_value("artwatch_streams_event_to_stored_seconds_count", {"topic": "sales"}) == 5
    assert m.registry.get_sample_value(
        "artwatch_streams_event_to_stored_seconds_bucket", {"topic": "sales", "le": "0.25"}
    ) == 3


def test_bulk_histogram_drops_nan_instead_of_poisoning_the_sum():
    r = CollectorRegistry()
    bulk = BulkHistogram("artwatch_n_seconds", "N.", [], (1.0,), r)
    bulk.labels().observe_many([0.5, math.nan, 2.0])
    bulk.labels().observe(math.nan)
    assert r.get_sample_value("artwatch_n_seconds_count", {}) == 2
    assert r.get_sample_value("artwatch_n_seconds_bucket", {"le": "+Inf"}) == 2
    assert r.get_sample_value("artwatch_n_seconds_sum", {}) == 2.5

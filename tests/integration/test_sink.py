"""infra.db.sink.EventSink on a real PostgreSQL, with and without TimescaleDB.

Every check reads the database back: rows stored exactly once, the keys the
sink calls new, and rollups equal to a reference computed in SQL from the
event table itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql

from infra.db.sink import ROW_REJECTED, EventSink
from infra.errors import SinkBackpressure
from infra.metrics import build_metrics
from streams.records import RECORD_TYPES, Bid, Image, Listing, Sale
from streams.storage import TABLE_SPECS, row_builder
from tests.conftest import free_port

pytestmark = pytest.mark.integration

UTC = timezone.utc
T0 = datetime(2021, 8, 1, 22, 0, tzinfo=UTC)
ROLLUP_COLS = "bucket, collection, currency, n, n_synthetic, volume, min_price, max_price"
SALE_ROW = row_builder("sales")


# --- helpers ----------------------------------------------------------------------------


def make_sales(tag: str, n: int, seed: int, *, collections: int = 2, spread_s: int = 3 * 3600) -> list[Sale]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = T0 + timedelta(seconds=rng.randrange(spread_s), microseconds=rng.randrange(1_000_000))
        if i % 7 == 0:
            ts = ts.astimezone(timezone(timedelta(hours=8)))  # normalised to UTC by the record
        out.append(Sale(
            event_id=f"{tag}-{seed}-{i}",
            ts=ts,
            collection=f"{tag}-c{i % collections}",
            item_id=str(rng.randrange(10_000)),
            buyer=f"0xb{rng.randrange(100)}",
            seller=f"0xs{rng.randrange(100)}",
            price=rng.choice([
                Decimal(rng.randrange(0, 10**22)).scaleb(-18),  # wei precision
                Decimal(rng.randrange(1, 10**8)).scaleb(-2),
                Decimal(rng.randrange(1, 10**6)),
            ]),
            currency=rng.choice(["ETH", "USD"]),
            synthetic=rng.random() < 0.3,
            source="test-sink",
            tx=None if rng.random() < 0.5 else f"0x{rng.getrandbits(64):016x}",
        ))
    return out


def msgspec_replace(record, **changes):
    return msgspec.structs.replace(record, **changes)


def keys(records) -> set[tuple[str, datetime]]:
    return {(r.event_id, r.ts) for r in records}


def rows(records) -> list[tuple]:
    return [SALE_ROW(r) for r in records]


def collections(records) -> list[str]:
    return sorted({r.collection for r in records})


def tag() -> str:
    return "t" + uuid.uuid4().hex[:8]


@contextlib.asynccontextmanager
async def open_sink(dsn: str, **kw):
    sink = EventSink(dsn, TABLE_SPECS.values(), **kw)
    try:
        yield sink
    finally:
        await sink.close()


@pytest.fixture
def db(any_dsn):
    with psycopg.connect(any_dsn[0], autocommit=True) as conn:
        yield conn


def stored(db, table: str, colls: list[str]) -> dict[tuple[str, datetime], tuple]:
    spec = TABLE_SPECS[table]
    q = sql.SQL("SELECT {c} FROM {t} WHERE collection = ANY(%s)").format(
        c=sql.SQL(", ").join(map(sql.Identifier, spec.columns)), t=sql.Identifier(table)
    )
    out = {}
    for row in db.execute(q, (colls,)):
        out[spec.row_key(row)] = row
    return out


def rollups(db, table: str, colls: list[str], kind: str = "sales") -> dict:
    q = sql.SQL("SELECT " + ROLLUP_COLS + " FROM {t} WHERE kind = %s AND collection = ANY(%s)").format(
        t=sql.Identifier(table)
    )
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in db.execute(q, (kind, colls))}


def reference(db, width: str, colls: list[str], table: str = "sales", price: str = "price") -> dict:
    """The rollup recomputed from the event table: what must be in rollup_1m/1h."""
    q = sql.SQL(
        "SELECT date_bin(%s::interval, ts, 'epoch'), collection, currency, count(*),"
        " count(*) FILTER (WHERE synthetic), sum({p}), min({p}), max({p})"
        " FROM {t} WHERE collection = ANY(%s) GROUP BY 1, 2, 3"
    ).format(p=sql.Identifier(price), t=sql.Identifier(table))
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in db.execute(q, (width, colls))}


def assert_rollups_match(db, colls: list[str], table: str = "sales", price: str = "price") -> None:
    for rollup, width in (("rollup_1m", "1 minute"), ("rollup_1h", "1 hour")):
        want = reference(db, width, colls, table, price)
        assert want, "reference is empty: nothing was stored"
        got = rollups(db, rollup, colls, kind=table)
        assert got == want, f"{rollup} differs from the {table} table"


async def wait_gone(conn, pid: int) -> None:
    for _ in range(200):
        cur = await conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
        if await cur.fetchone() is None:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"backend {pid} did not exit")


# --- schema -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RECORD_TYPES))
def test_table_columns_cover_the_record_fields(db, kind):
    spec = TABLE_SPECS[kind]
    assert spec.table == kind
    cols = {
        r[0]: (r[1], r[2])
        for r in db.execute(
            "SELECT column_name, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s",
            (spec.table,),
        )
    }
    assert cols, f"table {spec.table} missing"
    missing = set(spec.columns) - set(cols)
    assert not missing, f"{spec.table} lacks record fields {sorted(missing)}"
    # every table column the record does not carry must be nullable or defaulted (COPY omits it)
    for name, (nullable, default) in cols.items():
        if name not in spec.columns:
            assert nullable == "YES" or default is not None, name
    # the conflict key is the table's primary key
    pk = [
        r[0]
        for r in db.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (spec.table,),
        )
    ]
    assert sorted(pk) == sorted(spec.key)
    if spec.price_column is not None:
        assert spec.price_column in spec.columns and {"collection", "currency", "synthetic"} <= set(spec.columns)


def test_timescale_mode_matches_the_storage_path(db, any_dsn):
    _, mode = any_dsn
    has_ext = db.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() is not None
    assert has_ext is (mode == "on")
    if has_ext:
        hypers = {r[0] for r in db.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")}
        assert {"sales", "listings", "bids", "images", "rollup_1m", "rollup_1h"} <= hypers


async def test_a_record_of_every_kind_round_trips(any_dsn, db):
    t = tag()
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    ts = datetime(2021, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    records = {
        "sales": Sale(event_id=f"{t}-s", ts=ts, collection=t, item_id="1", buyer="b", seller="s",
                      price=Decimal("1.000000000000000001"), currency="ETH", tx="0x1"),
        "listings": Listing(event_id=f"{t}-l", ts=ts, marketplace="m", collection=t, item_id="1", seller="s",
                            price=Decimal("12.5"), currency="WETH", image_ref=f"{t}-i", synthetic=True, source="syn"),
        "bids": Bid(event_id=f"{t}-b", ts=ts, auction_id="a", item_id="lot", collection=t, bidder="p",
                    amount=Decimal(1500000), currency="CNY"),
        "images": Image(event_id=f"{t}-i", ts=ts, item_id="1", collection=t, content_type="image/png",
                        sha256=hashlib.sha256(png).hexdigest(), data=png),
    }
    async with open_sink(any_dsn[0]) as sink:
        for kind, rec in records.items():
            res = await sink.write(kind, [row_builder(kind)(rec)])
            assert res.new_keys == {(rec.event_id, rec.ts)}
        assert sink.fallbacks == 0
    for kind, rec in records.items():
        (row,) = stored(db, kind, [t]).values()
        back = RECORD_TYPES[kind](**dict(zip(TABLE_SPECS[kind].columns, row)))
        assert back == rec, kind
    # sales, listings and bids feed the rollups under their own kind; images do not
    assert_rollups_match(db, [t], "sales", "price")
    assert_rollups_match(db, [t], "listings", "price")
    assert_rollups_match(db, [t], "bids", "amount")
    assert rollups(db, "rollup_1m", [t], kind="images") == {}


# --- fast path and fallback ----------------------------------------------------------------


async def test_new_batch_takes_the_fast_path(any_dsn, db):
    t = tag()
    batch = make_sales(t, 400, seed=1)
    async with open_sink(any_dsn[0]) as sink:
        res = await sink.write("sales", rows(batch))
        assert sink.fallbacks == 0
        assert res.new_keys == keys(batch)
        assert res.rows == 400 and res.seconds > 0
        # a second, disjoint batch: still the fast path
        more = make_sales(t, 100, seed=2)
        res2 = await sink.write("sales", rows(more))
        assert sink.fallbacks == 0 and res2.new_keys == keys(more)
    got = stored(db, "sales", collections(batch))
    assert set(got) == keys(batch) | keys(more)
    assert {k: SALE_ROW(r) for r in batch + more for k in [(r.event_id, r.ts)]} == got
    assert_rollups_match(db, collections(batch))


async def test_overlapping_batch_takes_the_fallback_and_stores_only_new_rows(any_dsn, db):
    t = tag()
    first = make_sales(t, 300, seed=3)
    fresh = make_sales(t, 200, seed=4)
    # the replayed half carries other prices: the stored rows must not change
    replayed = [msgspec_replace(s, price=s.price + 1000) for s in first[::2]]
    second = replayed + fresh
    random.Random(5).shuffle(second)
    colls = collections(first)
    async with open_sink(any_dsn[0]) as sink:
        await sink.write("sales", rows(first))
        assert sink.fallbacks == 0
        before_1m = rollups(db, "rollup_1m", colls)
        res = await sink.write("sales", rows(second))
        assert sink.fallbacks == 1
        assert res.new_keys == keys(fresh)
        assert res.rows == len(second)
        # the whole first batch again: nothing new, rollups do not move
        after_1m, after_1h = rollups(db, "rollup_1m", colls), rollups(db, "rollup_1h", colls)
        res = await sink.write("sales", rows(first))
        assert sink.fallbacks == 2
        assert res.new_keys == frozenset()
        assert rollups(db, "rollup_1m", colls) == after_1m
        assert rollups(db, "rollup_1h", colls) == after_1h
    assert before_1m != after_1m
    got = stored(db, "sales", colls)
    assert set(got) == keys(first) | keys(fresh)
    for s in first:
        assert got[(s.event_id, s.ts)] == SALE_ROW(s)  # original price kept
    assert_rollups_match(db, colls)


async def test_the_same_event_twice_in_one_batch_is_stored_once(any_dsn, db):
    t = tag()
    batch = make_sales(t, 50, seed=6)
    twin = msgspec_replace(batch[10], price=batch[10].price + 7)  # same key, other payload
    doubled = batch[:20] + [batch[3], twin] + batch[20:] + [batch[3]]
    async with open_sink(any_dsn[0]) as sink:
        res = await sink.write("sales", rows(doubled))
        assert res.new_keys == keys(batch)
        assert res.rows == len(doubled)
        assert sink.fallbacks == 1  # the batch conflicts with itself
    got = stored(db, "sales", collections(batch))
    assert set(got) == keys(batch)
    assert got[(batch[10].event_id, batch[10].ts)] == SALE_ROW(batch[10])  # the first of the two is kept
    n = db.execute("SELECT count(*) FROM sales WHERE collection = ANY(%s)", (collections(batch),)).fetchone()[0]
    assert n == 50
    assert_rollups_match(db, collections(batch))


async def test_empty_batch(any_dsn):
    async with open_sink(any_dsn[0]) as sink:
        res = await sink.write("sales", [])
        assert res.new_keys == frozenset() and res.rows == 0 and sink.fallbacks == 0


# --- rows the database refuses (poison) -----------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["fast-path", "fallback"])
async def test_rows_the_database_refuses_are_found_by_bisection(any_dsn, db, overlap):
    """The edge catches what it knows; whatever else the database refuses must
    be found row by row, or its batch would fail forever."""
    t = tag()
    batch = make_sales(t, 1000, seed=11)
    price = TABLE_SPECS["sales"].columns.index("price")
    negative = list(SALE_ROW(batch[500]))
    negative[price] = Decimal(-1)  # the CHECK constraint (the record type would refuse it)
    bad = {
        3: SALE_ROW(msgspec_replace(batch[3], buyer="0x\x00")),  # text cannot hold NUL
        500: tuple(negative),
        777: SALE_ROW(msgspec_replace(batch[777], price=Decimal("0E-20000"))),  # not sendable as numeric
    }
    mixed = [bad.get(i, SALE_ROW(s)) for i, s in enumerate(batch)]
    async with open_sink(any_dsn[0]) as sink:
        if overlap:  # a replayed batch takes the safe path; it must fail the same way
            await sink.write("sales", rows(batch[:10]))
        with pytest.raises(ROW_REJECTED):
            await sink.write("sales", mixed)
        found = await sink.rejected_rows("sales", mixed)
        assert [i for i, _ in found] == [3, 500, 777]
        assert "0x00" in found[0][1] and "check constraint" in found[1][1] and "too precise" in found[2][1]
        assert await sink.rejected_rows("sales", rows(batch)) == []  # every row fine on its own
        assert await sink.rejected_rows("sales", []) == []
    # Probing stores nothing; the failed batch stored nothing.
    assert set(stored(db, "sales", collections(batch))) == (keys(batch[:10]) if overlap else set())


# --- before_commit ------------------------------------------------------------------------


async def test_before_commit_rows_commit_with_the_batch(any_dsn, db):
    t = tag()
    first = make_sales(t, 40, seed=7)
    second = first[:10] + make_sales(t, 15, seed=8)
    seen = []

    async def add_deadletters(conn, new_keys):
        seen.append(new_keys)
        # a dependent row per new event, written in the sink's transaction
        for i, (event_id, _) in enumerate(sorted(new_keys)):
            await conn.execute(
                "INSERT INTO deadletters (topic, \"partition\", \"offset\", ts, reason, error)"
                " VALUES (%s, 0, %s, now(), 'test', %s)",
                (t, len(seen) * 1000 + i, event_id),
            )

    async with open_sink(any_dsn[0]) as sink:
        r1 = await sink.write("sales", rows(first), before_commit=add_deadletters)
        r2 = await sink.write("sales", rows(second), before_commit=add_deadletters)
    assert seen == [r1.new_keys, r2.new_keys]
    assert r2.new_keys == keys(second[10:])
    errors = sorted(r[0] for r in db.execute("SELECT error FROM deadletters WHERE topic = %s", (t,)))
    assert errors == sorted(k[0] for k in keys(first) | keys(second[10:]))


@pytest.mark.parametrize("overlap", [False, True], ids=["fast-path", "fallback"])
async def test_an_error_in_before_commit_stores_nothing(any_dsn, db, overlap):
    t = tag()
    base = make_sales(t, 60, seed=9, spread_s=600)
    batch = make_sales(t, 60, seed=10, spread_s=600) + (base[:5] if overlap else [])
    colls = collections(base)
    retries = []

    async def fail(conn, new_keys):
        await conn.execute(
            "INSERT INTO deadletters (topic, \"partition\", \"offset\", ts, reason, error)"
            " VALUES (%s, 0, 1, now(), 'test', 'x')", (t,)
        )
        raise RuntimeError("subscriber exploded")

    async with open_sink(any_dsn[0], on_retry=retries.append) as sink:
        await sink.write("sales", rows(base))
        snapshot = (stored(db, "sales", colls), rollups(db, "rollup_1m", colls), rollups(db, "rollup_1h", colls))
        with pytest.raises(RuntimeError, match="subscriber exploded"):
            await sink.write("sales", rows(batch), before_commit=fail)
        assert retries == []  # not a transient error: never retried
        assert (stored(db, "sales", colls), rollups(db, "rollup_1m", colls), rollups(db, "rollup_1h", colls)) == snapshot
        assert db.execute("SELECT count(*) FROM deadletters WHERE topic = %s", (t,)).fetchone()[0] == 0
        # the sink is usable afterwards and the batch still counts as new
        fallbacks = sink.fallbacks
        res = await sink.write("sales", rows(batch))
        assert res.new_keys == keys(batch) - keys(base)
        assert sink.fallbacks == fallbacks + (1 if overlap else 0)
    assert set(stored(db, "sales", colls)) == keys(base) | keys(batch)
    assert_rollups_match(db, colls)


# --- transient failures -----------------------------------------------------------------


async def test_a_read_whose_connection_dies_is_retried(any_dsn):
    """EventSink.read (the rule's warm-up query) retries like a write."""
    retries: list[BaseException] = []
    attempts = []

    async def query(conn):
        attempts.append(1)
        if len(attempts) == 1:  # the backend dies under the first attempt
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return (await (await conn.execute("SELECT 41 + 1")).fetchone())[0]

    async with open_sink(any_dsn[0], on_retry=retries.append, retry_max_s=10) as sink:
        assert await sink.read("answering", query) == 42
    assert len(attempts) == 2 and len(retries) == 1 and isinstance(retries[0], psycopg.OperationalError)


async def test_a_killed_connection_is_retried(any_dsn, db):
    t = tag()
    app = f"artwatch-sink-{t}"
    dsn = psycopg.conninfo.make_conninfo(any_dsn[0], application_name=app)
    metrics = build_metrics(CollectorRegistry())
    retries: list[BaseException] = []

    def on_retry(exc: BaseException) -> None:
        retries.append(exc)
        metrics.sink_retries.labels(table="sales").inc()

    first, second = make_sales(t, 30, seed=11), make_sales(t, 30, seed=12)
    async with open_sink(dsn, on_retry=on_retry, retry_max_s=10) as sink:
        await sink.write("sales", rows(first))
        (pid,) = db.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)).fetchone()
        assert db.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
        async with await psycopg.AsyncConnection.connect(any_dsn[0], autocommit=True) as watcher:
            await wait_gone(watcher, pid)
        res = await sink.write("sales", rows(second))
        assert res.new_keys == keys(second)
    assert len(retries) == 1
    assert isinstance(retries[0], psycopg.OperationalError)
    assert metrics.registry.get_sample_value("artwatch_infra_db_retries_total", {"table": "sales"}) == 1
    assert set(stored(db, "sales", collections(first))) == keys(first) | keys(second)
    assert_rollups_match(db, collections(first))


async def test_a_connection_lost_inside_the_transaction_retries_the_whole_batch(any_dsn, db):
    """Killed after the rows and rollups went in, before the commit: the retry
    must store and count the batch exactly once."""
    t = tag()
    app = f"artwatch-sink-{t}"
    dsn = psycopg.conninfo.make_conninfo(any_dsn[0], application_name=app)
    retries: list[BaseException] = []
    calls: list[frozenset] = []
    batch = make_sales(t, 80, seed=13)

    async def kill_first_time(conn, new_keys):
        calls.append(new_keys)
        if len(calls) == 1:
            pid = conn.info.backend_pid
            async with await psycopg.AsyncConnection.connect(any_dsn[0], autocommit=True) as killer:
                await killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await wait_gone(killer, pid)

    async with open_sink(dsn, on_retry=retries.append, retry_max_s=10) as sink:
        res = await sink.write("sales", rows(batch), before_commit=kill_first_time)
    assert len(retries) == 1 and len(calls) == 2
    assert calls[0] == calls[1] == res.new_keys == keys(batch)
    assert set(stored(db, "sales", collections(batch))) == keys(batch)
    assert_rollups_match(db, collections(batch))


async def test_an_unreachable_database_turns_into_backpressure():
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=2"
    retries: list[BaseException] = []
    async with open_sink(dsn, retry_max_s=0.5, on_retry=retries.append) as sink:
        with pytest.raises(SinkBackpressure) as info:
            await sink.write("sales", rows(make_sales(tag(), 3, seed=14)))
    assert len(retries) >= 2
    assert all(isinstance(e, psycopg.OperationalError) for e in retries)
    assert info.value.retry_after > 0
    assert isinstance(info.value.__cause__, psycopg.OperationalError)

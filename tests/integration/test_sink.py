"""infra.db.sink.EventSink on a real PostgreSQL, with and without TimescaleDB.

Every check reads the database back: rows stored exactly once, one identity
per event id, the keys the sink calls new, and rollups equal to a reference
computed in SQL from the event table itself, real and synthetic apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql

from infra.db.failures import RETRY_REASONS, classify
from infra.db.sink import ROW_REJECTED, EventSink, TableSpec
from infra.errors import SinkBackpressure
from infra.metrics import build_metrics
from streams.records import RECORD_TYPES, Bid, Image, Listing, Sale
from streams.storage import TABLE_SPECS, row_builder
from tests.conftest import free_port

pytestmark = pytest.mark.integration

UTC = timezone.utc
T0 = datetime(2021, 8, 1, 22, 0, tzinfo=UTC)
ROLLUP_COLS = "bucket, collection, currency, synthetic, n, n_synthetic, volume, min_price, max_price"
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
    return {(r[0], r[1], r[2], r[3]): tuple(r[4:]) for r in db.execute(q, (kind, colls))}


def reference(db, width: str, colls: list[str], table: str = "sales", price: str = "price") -> dict:
    """The rollup recomputed from the event table, real and synthetic apart:
    what must be in rollup_1m/1h."""
    q = sql.SQL(
        "SELECT date_bin(%s::interval, ts, 'epoch'), collection, currency, synthetic, count(*),"
        " count(*) FILTER (WHERE synthetic), sum({p}), min({p}), max({p})"
        " FROM {t} WHERE collection = ANY(%s) GROUP BY 1, 2, 3, 4"
    ).format(p=sql.Identifier(price), t=sql.Identifier(table))
    return {(r[0], r[1], r[2], r[3]): tuple(r[4:]) for r in db.execute(q, (width, colls))}


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
    # the replayed half carries other prices (conflicting duplicates): the stored rows must not change
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
        assert sorted(second[c.index].event_id for c in res.conflicts) == sorted(s.event_id for s in replayed)
        assert {c.differs for c in res.conflicts} == {("price",)} and res.duplicates == 0
        # the whole first batch again: nothing new, rollups do not move
        after_1m, after_1h = rollups(db, "rollup_1m", colls), rollups(db, "rollup_1h", colls)
        res = await sink.write("sales", rows(first))
        assert sink.fallbacks == 2
        assert res.new_keys == frozenset() and res.conflicts == () and res.duplicates == len(first)
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
        # batch[3] twice more is a plain duplicate; the twin of batch[10] is a conflicting one
        ((c,),) = [res.conflicts]
        assert (c.index, c.kept_index, c.differs) == (21, 10, ("price",)) and res.duplicates == 2
    got = stored(db, "sales", collections(batch))
    assert set(got) == keys(batch)
    assert got[(batch[10].event_id, batch[10].ts)] == SALE_ROW(batch[10])  # the first of the two is kept
    n = db.execute("SELECT count(*) FROM sales WHERE collection = ANY(%s)", (collections(batch),)).fetchone()[0]
    assert n == 50
    assert_rollups_match(db, collections(batch))


async def test_empty_batch(any_dsn):
    async with open_sink(any_dsn[0]) as sink:
        res = await sink.write("sales", [])
        assert res.new_keys == frozenset() and res.rows == 0 and sink.fallbacks == 0 and res.conflicts == ()


# --- one identity per event ------------------------------------------------------------------


def identities(db, kind: str, ids) -> dict[str, datetime]:
    """event_id -> the ts its identity holds."""
    return dict(db.execute(
        "SELECT event_id, ts FROM event_ids WHERE kind = %s AND event_id = ANY(%s)", (kind, sorted(ids))).fetchall())


def versions(db, table: str, ids) -> dict[str, int]:
    """event_id -> how many rows of it the table holds."""
    q = sql.SQL("SELECT event_id, count(*) FROM {t} WHERE event_id = ANY(%s) GROUP BY 1").format(
        t=sql.Identifier(table))
    return dict(db.execute(q, (sorted(ids),)).fetchall())


def assert_each_stored_once(db, records, table: str = "sales") -> None:
    """Exactly ``records`` (these versions) are stored, one row and one identity per id."""
    ids = {r.event_id for r in records}
    assert versions(db, table, ids) == {i: 1 for i in ids}
    spec = TABLE_SPECS[table]
    eid = spec.columns.index("event_id")
    got = {row[eid]: row for row in db.execute(
        sql.SQL("SELECT {c} FROM {t} WHERE event_id = ANY(%s)").format(
            c=sql.SQL(", ").join(map(sql.Identifier, spec.columns)), t=sql.Identifier(table)), (sorted(ids),))}
    want = {r.event_id: row_builder(table)(r) for r in records}
    assert got == want
    assert identities(db, table, ids) == {i: spec.identity(want[i])[1] for i in ids}


async def test_an_identical_resend_is_a_plain_duplicate_across_and_within_batches(any_dsn, db):
    t = tag()
    batch = make_sales(t, 60, seed=21)
    twice = [s for s in make_sales(t, 30, seed=22) for _ in range(2)]  # each event twice, one batch
    async with open_sink(any_dsn[0]) as sink:
        first = await sink.write("sales", rows(batch))
        assert (first.new_keys, first.conflicts, first.duplicates) == (keys(batch), (), 0)
        again = await sink.write("sales", rows(batch[::-1] + batch[:5]))  # same id, ts and content
        assert (again.new_keys, again.conflicts, again.duplicates) == (frozenset(), (), 65)
        inner = await sink.write("sales", rows(twice))
        assert (inner.new_keys, inner.conflicts, inner.duplicates) == (keys(twice), (), 30)
    assert_each_stored_once(db, batch + twice[::2])
    assert_rollups_match(db, collections(batch))


def resent(s: Sale, change: str) -> Sale:
    if change == "ts":  # 90 min later: other minute and hour buckets, had it been rolled up
        return msgspec_replace(s, ts=s.ts + timedelta(minutes=90))
    if change == "price":
        return msgspec_replace(s, price=s.price + 1)
    if change == "synthetic":
        return msgspec_replace(s, synthetic=not s.synthetic)
    raise AssertionError(change)


@pytest.mark.parametrize("change", ["ts", "price", "synthetic"])
@pytest.mark.parametrize("where", ["across-batches", "within-a-batch"])
async def test_a_resent_id_with_other_ts_or_content_is_a_conflicting_duplicate(any_dsn, db, change, where):
    """The first stored version wins: the other one is reported, never stored or rolled up."""
    t = tag()
    base = make_sales(t, 40, seed=23)
    others = [resent(s, change) for s in base[::3]]
    fresh = make_sales(t, 10, seed=24)
    colls = collections(base)
    async with open_sink(any_dsn[0]) as sink:
        if where == "across-batches":
            await sink.write("sales", rows(base))
            before = rollups(db, "rollup_1m", colls), rollups(db, "rollup_1h", colls)
            batch = others + fresh
            res = await sink.write("sales", rows(batch))
            assert res.new_keys == keys(fresh)
            assert (rollups(db, "rollup_1m", colls), rollups(db, "rollup_1h", colls)) != before  # fresh ones counted
            kept_at = {s.event_id: (None, SALE_ROW(s)) for s in base}
        else:
            # each other version right after its original: the original came first, it wins
            batch = [v for s in base for v in ([s, resent(s, change)] if s in base[::3] else [s])] + fresh
            res = await sink.write("sales", rows(batch))
            assert res.new_keys == keys(base + fresh)
            kept_at = {s.event_id: (i, SALE_ROW(s)) for i, s in enumerate(batch) if s in base}
        assert sink.fallbacks == 1 and res.duplicates == 0
        assert sorted(batch[c.index].event_id for c in res.conflicts) == sorted(s.event_id for s in others)
        for c in res.conflicts:
            orig = kept_at[c.event_id][1]
            assert batch[c.index] in others
            assert (c.ts, c.kept_ts) == (batch[c.index].ts, TABLE_SPECS["sales"].identity(orig)[1])
            assert (c.kept_index, c.kept) == kept_at[c.event_id]
            assert c.differs == (change,)
            assert c.event_id in c.describe() and change in c.describe()
        # sent once more, a conflicting version is refused again
        res2 = await sink.write("sales", rows(others))
        assert res2.new_keys == frozenset() and len(res2.conflicts) == len(others)
    assert_each_stored_once(db, base + fresh)
    assert_rollups_match(db, colls)


@pytest.mark.parametrize("kind", ["listings", "bids", "images"])
async def test_other_kinds_keep_one_identity_too(any_dsn, db, kind):
    t = tag()
    ts = datetime(2021, 5, 6, 7, 8, 9, tzinfo=UTC)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(100))
    make = {
        "listings": lambda i: Listing(event_id=f"{t}-{i}", ts=ts, marketplace="m", collection=t, item_id=str(i),
                                      seller="s", price=Decimal(i + 1), currency="ETH", synthetic=True, source="syn"),
        "bids": lambda i: Bid(event_id=f"{t}-{i}", ts=ts, auction_id="a", item_id=str(i), collection=t,
                              bidder="p", amount=Decimal(i + 1), currency="CNY"),
        "images": lambda i: Image(event_id=f"{t}-{i}", ts=ts, item_id=str(i), collection=t, content_type="image/png",
                                  sha256=hashlib.sha256(png + bytes([i])).hexdigest(), data=png + bytes([i])),
    }[kind]
    records = [make(i) for i in range(5)]
    later = msgspec_replace(records[0], ts=ts + timedelta(hours=2))
    changed = make(4)
    changed = msgspec_replace(changed, item_id="other", **({"data": png, "sha256": hashlib.sha256(png).hexdigest()}
                                                           if kind == "images" else {}))
    build = row_builder(kind)
    async with open_sink(any_dsn[0]) as sink:
        await sink.write(kind, [build(r) for r in records])
        res = await sink.write(kind, [build(later), build(records[1]), build(changed)])
    assert res.new_keys == frozenset() and res.duplicates == 1
    assert [(c.index, c.differs) for c in res.conflicts] == [
        (0, ("ts",)), (2, ("item_id", "sha256", "data") if kind == "images" else ("item_id",)),
    ]
    assert_each_stored_once(db, records, kind)
    if kind != "images":
        assert_rollups_match(db, [t], kind, "amount" if kind == "bids" else "price")


async def test_concurrent_batches_with_the_same_ids_store_each_once(any_dsn, db):
    """Two transactions claim the same ids at once (two batches in flight, a
    re-send racing its original): each id is stored once, the loser's version
    is reported as a conflict by exactly one of them."""
    t = tag()
    a = make_sales(t, 300, seed=25)
    b = [resent(s, "ts") for s in a]
    random.Random(26).shuffle(b)
    retries: list[BaseException] = []
    async with open_sink(any_dsn[0], on_retry=retries.append) as s1, \
            open_sink(any_dsn[0], on_retry=retries.append) as s2:
        ra, rb = await asyncio.gather(s1.write("sales", rows(a)), s2.write("sales", rows(b)))
    won_a = {k[0] for k in ra.new_keys}
    won_b = {k[0] for k in rb.new_keys}
    assert not won_a & won_b and len(won_a | won_b) == 300
    lost_a = {a[c.index].event_id for c in ra.conflicts}
    lost_b = {b[c.index].event_id for c in rb.conflicts}
    assert lost_a == won_b and lost_b == won_a
    assert all(isinstance(e, psycopg.errors.DeadlockDetected) for e in retries), retries  # retried, not lost
    assert_each_stored_once(db, [s for s in a if s.event_id in won_a] + [s for s in b if s.event_id in won_b])
    assert_rollups_match(db, collections(a))


async def test_an_id_a_concurrent_batch_commits_while_the_safe_path_claims_it(any_dsn, db):
    """The safe path looks the batch's ids up first and claims only the
    others: an id another transaction holds uncommitted is missed by the
    look-up, its claim waits for that transaction and finds it kept; the
    version it kept (read back from the table) is the one compared."""
    t = tag()
    app = f"artwatch-sink-{t}"
    dsn = psycopg.conninfo.make_conninfo(any_dsn[0], application_name=app)
    base = make_sales(t, 3, seed=32)
    spec = TABLE_SPECS["sales"]
    insert_row = sql.SQL("INSERT INTO sales ({c}) VALUES ({v})").format(
        c=sql.SQL(", ").join(map(sql.Identifier, spec.columns)),
        v=sql.SQL(", ").join(sql.Placeholder() * len(spec.columns)))
    async with open_sink(dsn) as sink:
        await sink.write("sales", rows(base[:1]))  # stored: the batch below fails the fast path on it at once
        async with await psycopg.AsyncConnection.connect(any_dsn[0]) as other:
            await other.execute("INSERT INTO event_ids (kind, event_id, ts) VALUES ('sales', %s, %s)",
                                (base[1].event_id, base[1].ts))
            await other.execute(insert_row, SALE_ROW(base[1]))  # claimed and stored, not committed yet
            write = asyncio.create_task(sink.write("sales", rows([base[0], resent(base[1], "price"), base[2]])))
            for _ in range(400):  # until the sink's claim waits for the other transaction
                if db.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                              " AND wait_event_type = 'Lock'", (app,)).fetchone() or write.done():
                    break
                await asyncio.sleep(0.025)
            assert not write.done(), write.result()
            await other.commit()
            res = await write
    assert res.new_keys == keys(base[2:]) and res.duplicates == 1 and sink.fallbacks == 1
    assert [(c.index, c.differs, c.kept, c.kept_index) for c in res.conflicts] == [
        (1, ("price",), SALE_ROW(base[1]), None)]
    assert_each_stored_once(db, base)


async def test_rollups_keep_real_and_synthetic_apart(any_dsn, db):
    t = tag()
    minute = datetime(2021, 9, 1, 12, 30, tzinfo=UTC)
    sale = lambda i, price, syn: Sale(  # noqa: E731
        event_id=f"{t}-{i}", ts=minute + timedelta(seconds=i), collection=t, item_id=str(i), buyer="b", seller="s",
        price=Decimal(price), currency="ETH", synthetic=syn)
    batch = [sale(0, "2", False), sale(1, "4", False), sale(2, "1000", True), sale(3, "0.5", True)]
    async with open_sink(any_dsn[0]) as sink:
        await sink.write("sales", rows(batch))
    for table, bucket in (("rollup_1m", minute), ("rollup_1h", minute.replace(minute=0))):
        assert rollups(db, table, [t]) == {
            (bucket, t, "ETH", False): (2, 0, Decimal(6), Decimal(2), Decimal(4)),
            (bucket, t, "ETH", True): (2, 2, Decimal("1000.5"), Decimal("0.5"), Decimal(1000)),
        }
    assert_rollups_match(db, [t])


async def test_a_stored_row_read_back_compares_equal_to_the_row_as_sent(any_dsn, db):
    """Versions of a known id are compared with the stored row, read back:
    every value as sent must compare equal to itself as stored (zones other
    than UTC, wei precision, NULL tx), or an identical re-send would be
    refused as a conflicting duplicate."""
    t = tag()
    batch = make_sales(t, 200, seed=27)
    async with open_sink(any_dsn[0]) as sink:
        await sink.write("sales", rows(batch))
        res = await sink.write("sales", rows(batch[::-1]))
        assert sink.fallbacks == 1
    assert (res.new_keys, res.conflicts, res.duplicates) == (frozenset(), (), 200)
    assert_each_stored_once(db, batch)


@pytest.mark.parametrize("where", ["across-batches", "within-a-batch"])
async def test_numerics_count_as_the_same_content_when_stored_alike(any_dsn, db, where):
    """The same content = what storing it would keep: 2.0 and 2.00 are stored
    with other scales (a conflict), 1E+3 and 1000 both as 1000 (a duplicate)."""
    t = tag()
    base = make_sales(t, 3, seed=29)
    first = [msgspec_replace(base[0], price=Decimal("2.0")), msgspec_replace(base[1], price=Decimal("1E+3")),
             msgspec_replace(base[2], price=Decimal("0.000000000000000120"))]
    again = [msgspec_replace(first[0], price=Decimal("2.00")), msgspec_replace(first[1], price=Decimal("1000")),
             msgspec_replace(first[2], price=Decimal("1.20E-16"))]
    async with open_sink(any_dsn[0]) as sink:
        if where == "across-batches":
            await sink.write("sales", rows(first))
            res = await sink.write("sales", rows(again))
            offset = 0
        else:
            res = await sink.write("sales", rows(first + again))
            offset = 3
    assert [(c.index, c.differs, c.kept_index) for c in res.conflicts] == [
        (offset, ("price",), 0 if where == "within-a-batch" else None)]
    assert res.duplicates == 2
    assert_each_stored_once(db, first)


async def test_an_id_whose_stored_row_is_gone_is_still_never_stored_again(any_dsn, db):
    """A row deleted (by hand, or retention dropping old chunks) while
    event_ids keeps its id: with no row to compare with, the ts still decides:
    another ts is a conflict, the same ts a plain duplicate (the content
    cannot be told, other content included)."""
    t = tag()
    batch = make_sales(t, 6, seed=28)
    async with open_sink(any_dsn[0]) as sink:
        await sink.write("sales", rows(batch))
        ids = [s.event_id for s in batch[:3]]
        db.execute("DELETE FROM sales WHERE event_id = ANY(%s)", (ids,))
        res = await sink.write("sales", rows([resent(batch[0], "ts"), resent(batch[1], "price"), batch[2]]))
    assert res.new_keys == frozenset() and res.duplicates == 2
    assert [(c.index, c.kept, c.kept_index, c.differs) for c in res.conflicts] == [(0, None, None, ("ts",))]
    assert "differs in ts" in res.conflicts[0].describe()
    assert versions(db, "sales", ids) == {}
    assert identities(db, "sales", ids) == {s.event_id: s.ts for s in batch[:3]}


async def test_a_row_written_around_the_sink_is_not_taken_for_the_kept_version(any_dsn, db):
    """The kept version is the stored row at the ts event_ids holds: another
    row of the id (written around the sink, at another ts) is not it, even
    when a re-send matches that row exactly."""
    t = tag()
    batch = make_sales(t, 3, seed=33)
    stray = msgspec_replace(batch[0], ts=batch[1].ts)  # batch[0]'s id at a ts inside the batch's range
    spec = TABLE_SPECS["sales"]
    async with open_sink(any_dsn[0]) as sink:
        await sink.write("sales", rows(batch))
        db.execute(sql.SQL("DELETE FROM sales WHERE event_id = %s"), (batch[0].event_id,))
        db.execute(sql.SQL("INSERT INTO sales ({c}) VALUES ({v})").format(
            c=sql.SQL(", ").join(map(sql.Identifier, spec.columns)),
            v=sql.SQL(", ").join(sql.Placeholder() * len(spec.columns))), SALE_ROW(stray))
        res = await sink.write("sales", rows([stray, batch[1], batch[2]]))
    assert [(c.index, c.kept, c.kept_ts, c.differs) for c in res.conflicts] == [(0, None, batch[0].ts, ("ts",))]
    assert res.new_keys == frozenset() and res.duplicates == 2
    assert identities(db, "sales", [batch[0].event_id]) == {batch[0].event_id: batch[0].ts}


def test_event_ids_has_a_partition_per_kind_keyed_by_the_id_alone(db):
    """Each kind's ids in a partition of their own, unique by event_id alone
    (a (kind, event_id) key cost ~0.4 us more per stored event); other kinds
    in the default partition, unique by (kind, event_id)."""
    parts = dict(db.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c"
        " ON c.oid = i.inhrelid WHERE i.inhparent = 'event_ids'::regclass").fetchall())
    kinds = sorted(RECORD_TYPES) + ["alerts"]
    assert parts == {**{f"event_ids_{k}": f"FOR VALUES IN ('{k}')" for k in kinds}, "event_ids_other": "DEFAULT"}
    for name in parts:
        (key,) = db.execute(
            "SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = %s::regclass AND i.indisprimary", (name,)).fetchone()
        assert key == (["kind", "event_id"] if name == "event_ids_other" else ["event_id"]), name


async def test_a_kind_without_a_partition_of_its_own_keeps_one_identity_too(any_dsn, db):
    """A table the migration gave no event_ids partition: its ids go through
    the parent into event_ids_other, keyed by (kind, event_id), and the same
    rules hold; the same event_id under another kind is another event."""
    t = tag()
    table = f"test_gifts_{t}"
    db.execute(sql.SQL("CREATE TABLE {} (event_id text NOT NULL, ts timestamptz NOT NULL, note text,"
                       " PRIMARY KEY (event_id, ts))").format(sql.Identifier(table)))
    spec = TableSpec(table=table, columns=("event_id", "ts", "note"))
    first = [(f"{t}-{i}", T0 + timedelta(seconds=i), f"n{i}") for i in range(5)]
    again = [first[0], (first[1][0], first[1][1], "other"), (first[2][0], T0 + timedelta(days=1), first[2][2]),
             (f"{t}-9", T0, None)]
    sale = make_sales(t, 1, seed=30)[0]
    try:
        sink = EventSink(any_dsn[0], [spec, TABLE_SPECS["sales"]])
        try:
            assert (await sink.write(table, first)).new_keys == {(e, ts) for e, ts, _ in first}
            assert sink.fallbacks == 0
            res = await sink.write(table, again)
            assert sink.fallbacks == 1
            assert res.new_keys == {(f"{t}-9", T0)} and res.duplicates == 1
            assert [(c.index, c.differs, c.kept) for c in res.conflicts] == [(1, ("note",), first[1]),
                                                                            (2, ("ts",), first[2])]
            same_id = msgspec_replace(sale, event_id=first[0][0])  # a sale: other kind, other event
            assert (await sink.write("sales", rows([same_id]))).new_keys == keys([same_id])
        finally:
            await sink.close()
        got = db.execute("SELECT kind, event_id, ts FROM event_ids_other WHERE kind = %s ORDER BY event_id",
                         (table,)).fetchall()
        assert got == sorted([(table, e, ts) for e, ts, _ in first] + [(table, f"{t}-9", T0)], key=lambda r: r[1])
        assert identities(db, "sales", [first[0][0]]) == {first[0][0]: same_id.ts}
        n = db.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
        assert n == 6
    finally:
        db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        db.execute("DELETE FROM event_ids WHERE kind = %s", (table,))


def _alert(alert_id: str, ts: datetime, collection: str, severity: str = "medium") -> tuple:
    return (alert_id, ts, "sale_outlier", severity, "item", collection, psycopg.types.json.Jsonb({}), False)


def test_an_alert_id_is_stored_once_whatever_its_ts(db):
    """alerts is keyed (alert_id, ts) for the hypertable; its trigger keeps the id unique by itself."""
    t = tag()
    ins = ("INSERT INTO alerts (alert_id, ts, kind, severity, subject, collection, evidence, synthetic)"
           " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING")
    db.execute(ins, _alert(f"{t}-a", T0, t))
    db.execute(ins, _alert(f"{t}-a", T0 + timedelta(hours=1), t, "high"))  # another ts: skipped
    db.execute(ins, _alert(f"{t}-a", T0, t, "high"))  # the same key again: skipped
    with db.cursor() as cur:  # several in one statement
        cur.executemany(ins, [_alert(f"{t}-b", T0 + timedelta(days=i), t) for i in range(3)])
    got = db.execute("SELECT alert_id, ts, severity FROM alerts WHERE collection = %s ORDER BY 1", (t,)).fetchall()
    assert got == [(f"{t}-a", T0, "medium"), (f"{t}-b", T0, "medium")]
    assert identities(db, "alerts", [f"{t}-a", f"{t}-b"]) == {f"{t}-a": T0, f"{t}-b": T0}
    n = db.execute("SELECT count(*) FROM event_ids_alerts WHERE event_id = ANY(%s)", ([f"{t}-a", f"{t}-b"],))
    assert n.fetchone()[0] == 2  # the alerts' own partition
    db.execute("UPDATE alerts SET published_at = now() WHERE collection = %s", (t,))  # not for other tests' outbox


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

    async def add_deadletters(conn, new_keys, conflicts):
        assert conflicts == ()
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

    async def fail(conn, new_keys, conflicts):
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
        metrics.sink_retries.labels(table="sales", reason=classify(exc).reason).inc()

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
    reason = classify(retries[0]).reason
    assert reason in RETRY_REASONS
    assert metrics.registry.get_sample_value(
        "artwatch_infra_db_retries_total", {"table": "sales", "reason": reason}) == 1
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

    async def kill_first_time(conn, new_keys, conflicts):
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


# --- migration 002 on a database that already holds duplicates ----------------------------


def _migrated_to_001(name: str, timescale: bool) -> str:
    """A fresh database at schema 001 as an older artwatch left it (hypertables when ``timescale``)."""
    from importlib import resources

    from infra.db.migrate import HYPERTABLES
    from tests.conftest import _fresh_database, unavailable

    dsn = _fresh_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if timescale:
            if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone() is None:
                unavailable("the timescaledb extension is not installed")
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        conn.execute("CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL"
                     " DEFAULT now())")
        conn.execute((resources.files("infra.db") / "migrations" / "001_market_events.sql").read_text())
        conn.execute("INSERT INTO schema_migrations (version) VALUES ('001_market_events')")
        for table, (column, interval) in HYPERTABLES.items() if timescale else ():
            conn.execute("SELECT create_hypertable(%s::regclass, %s, chunk_time_interval => %s::interval)",
                         (table, column, interval))
    return dsn


@pytest.mark.parametrize("timescale", [True, False], ids=["timescale", "plain"])
async def test_migration_002_keeps_the_first_version_and_rebuilds_rollups(timescale):
    from infra.db.migrate import migrate

    dsn = _migrated_to_001(f"artwatch_test_m002_{'ts' if timescale else 'plain'}_{os.getpid()}", timescale)
    t = tag()
    sales = make_sales(t, 40, seed=31)
    twice, changed = sales[0], sales[1]
    later_twice = msgspec_replace(twice, ts=twice.ts + timedelta(days=2))  # the old key let it in again
    spec = TABLE_SPECS["sales"]
    cols = sql.SQL(", ").join(map(sql.Identifier, spec.columns))
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO sales ({c}, stored_at) VALUES ({v}, %s)").format(
                c=cols, v=sql.SQL(", ").join(sql.Placeholder() * len(spec.columns))),
                [(*SALE_ROW(s), T0) for s in sales] + [(*SALE_ROW(later_twice), T0 + timedelta(days=9))])
            # rollups as 001 kept them: real and synthetic mixed, one row per (collection, currency, minute)
            conn.execute("INSERT INTO rollup_1m SELECT date_bin('1 minute', ts, 'epoch'), collection, 'sales',"
                         " currency, count(*), count(*) FILTER (WHERE synthetic), sum(price), min(price), max(price)"
                         " FROM sales GROUP BY 1, 2, 4")
            for ts, sev in ((T0, "medium"), (T0 + timedelta(hours=1), "high")):  # one alert id twice
                conn.execute("INSERT INTO alerts (alert_id, ts, kind, severity, subject, collection, evidence,"
                             " synthetic) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", _alert(f"{t}-al", ts, t, sev))

        report = migrate(dsn, timescale="on" if timescale else "off")
        assert report.applied[0] == "002_event_identity"
        if timescale:
            assert {"rollup_1m", "rollup_1h", "sales", "alerts"} <= set(report.hypertables)
        # the first stored version of the id kept, the later one in deadletters
        assert versions(conn, "sales", [twice.event_id]) == {twice.event_id: 1}
        assert set(stored(conn, "sales", collections(sales))) == keys(sales)
        (dl,) = conn.execute("SELECT topic, \"partition\", reason, error, value FROM deadletters"
                             " WHERE key = %s", (twice.event_id.encode(),)).fetchall()
        assert dl[:3] == ("sales", -1, "conflicting_duplicate") and "migration 002" in dl[3]
        assert msgspec.json.decode(dl[4])["ts"].startswith(later_twice.ts.strftime("%Y-%m-%dT%H:%M"))
        # every id backfilled, with the ts of its kept version, in its kind's partition
        ids = {s.event_id for s in sales}
        assert identities(conn, "sales", ids) == {s.event_id: s.ts for s in sales}
        assert conn.execute("SELECT count(*) FROM event_ids_sales WHERE event_id = ANY(%s)",
                            (sorted(ids),)).fetchone()[0] == len(ids)
        alerts = conn.execute("SELECT ts, severity FROM alerts WHERE collection = %s", (t,)).fetchall()
        assert alerts == [(T0, "medium")]
        # rollups rebuilt from the raw table, real and synthetic apart, minute and hour
        assert_rollups_match(conn, collections(sales))
        assert any(k[3] for k in rollups(conn, "rollup_1m", collections(sales))), "no synthetic rows to split"
        # the trigger holds on an existing (hyper)table too
        conn.execute("INSERT INTO alerts (alert_id, ts, kind, severity, subject, collection, evidence, synthetic)"
                     " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", _alert(f"{t}-al", T0 + timedelta(days=1), t))
        assert conn.execute("SELECT count(*) FROM alerts WHERE collection = %s", (t,)).fetchone()[0] == 1

        # The sink on backfilled ids: each version is compared with the stored row.
        async with open_sink(dsn) as sink:
            res = await sink.write("sales", rows([sales[2], msgspec_replace(changed, price=changed.price + 1),
                                                  later_twice]))
        assert res.new_keys == frozenset() and res.duplicates == 1
        assert [(c.index, c.differs, c.kept) for c in res.conflicts] == [
            (1, ("price",), SALE_ROW(changed)), (2, ("ts",), SALE_ROW(twice)),
        ]
        assert identities(conn, "sales", [changed.event_id, twice.event_id]) == {
            changed.event_id: changed.ts, twice.event_id: twice.ts}
        assert_rollups_match(conn, collections(sales))

        # a second run changes nothing
        assert migrate(dsn, timescale="on" if timescale else "off").applied == ()
        assert set(stored(conn, "sales", collections(sales))) == keys(sales)


# --- the pipeline's side: conflicting duplicates become dead letters ------------------------


async def test_the_pipeline_dead_letters_a_conflicting_duplicate_and_drops_its_alert(broker, any_dsn, db):
    """A re-sent sale with another ts and price would alert (its stored
    version did not): it must end as a ``conflicting_duplicate`` dead letter,
    with no alert stored, its rule window untouched."""
    from aiokafka import AIOKafkaProducer

    from alerts.kinds.sale_outlier import SaleOutlierRule
    from infra.settings import Settings, TopicNames
    from streams.pipeline import BatchPipeline, IncomingMessage
    from streams.replay.publisher import ensure_topics

    dsn = any_dsn[0]
    run = uuid.uuid4().hex[:8]
    settings = Settings(broker_url=broker, database_url=dsn, topics=TopicNames(
        **{k: f"test-sink-{k}-{run}" for k in ("listings", "bids", "sales", "images", "alerts", "deadletter")}))
    ensure_topics(broker, settings.topics, 1, include_outputs=True)
    t = tag()
    sale = lambda i, hours, price: Sale(  # noqa: E731
        event_id=f"{t}-{i}", ts=T0 + timedelta(hours=hours), collection=t, item_id=str(i), buyer="b", seller="s",
        price=Decimal(price), currency="ETH")
    history = [sale(i, i, "1") for i in range(6)] + [sale(9, 10, "2")]  # sale 9: no alert (2 < 3 x 1)
    resend = sale(9, 8, "20")  # same id, other ts and price: would alert at 20x
    metrics = build_metrics(CollectorRegistry())
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()

    async def publish(topic, key, value, headers):
        return await producer.send(topic, value, key=key, headers=list(headers))

    def messages(sales, first):
        return [IncomingMessage(settings.topics.sales, 0, first + i, s.ts.timestamp(), s.item_id.encode(),
                                msgspec.json.encode(s)) for i, s in enumerate(sales)]

    try:
        async with open_sink(dsn) as sink:
            first = BatchPipeline("sales", settings, sink, metrics, publish,
                                  rule=SaleOutlierRule(multiple=3.0, window=timedelta(days=7), min_history=5))
            out = await first.process(messages(history, 0))
            assert (out.stored, out.alerts) == (7, [])
            # a fresh worker (cold rule): its window is warmed up to the resend's ts, so without
            # the sink's identity the resend would be scored, alerted and stored a second time
            rule = SaleOutlierRule(multiple=3.0, window=timedelta(days=7), min_history=5)
            second = BatchPipeline("sales", settings, sink, metrics, publish, rule=rule)
            # with a plain repeat of sale 5, the window is warmed from the 5 before it: 6 sales then
            batch = await second.prepare(messages([resend, history[5]], 7))
            assert [a.evidence["event_id"] for a in batch.alerts] == [resend.event_id]  # scored: 20x
            out = await second.store(batch)
    finally:
        await producer.stop()
    assert (out.received, out.stored, out.duplicates, out.deadlettered) == (2, 0, 1, 1)
    assert [a for a in out.alerts if a.collection == t] == []  # (the outbox sends any test's pending alerts)
    (dl,) = db.execute("SELECT \"offset\", reason, error FROM deadletters WHERE topic = %s",
                       (settings.topics.sales,)).fetchall()
    assert dl[:2] == (7, "conflicting_duplicate") and "price, ts" in dl[2] and resend.event_id in dl[2]
    assert db.execute("SELECT count(*) FROM alerts WHERE collection = %s", (t,)).fetchone()[0] == 0
    assert metrics.registry.get_sample_value(
        "artwatch_streams_deadletter_total", {"topic": settings.topics.sales, "reason": "conflicting_duplicate"}) == 1
    assert_each_stored_once(db, history)
    assert_rollups_match(db, [t])
    # the resend's version left the cold rule's window again; the stored sales are in it
    probe = rule.observe(sale(99, 11, "1000"))
    assert probe is not None and probe.evidence["window_sales"] == 6 and probe.evidence["median"] == "1"

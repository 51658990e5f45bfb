"""The worker end to end: broker in, database out, no mocks.

Each test runs real worker child processes (``streams.worker.WorkerProcess``)
against the session's Tansu broker and PostgreSQL databases, in its own
topics and consumer group. Tables are shared per database within the session,
so every query is scoped to the ids or collections the test produced.

A worker spends several seconds joining its consumer group on Tansu (two
joins of about half the 6 s session each), so the first worker of every
selected test is launched at once by the ``fleet`` fixture (they wait in
parallel); only restarts, which are what those tests are about, start a
worker on their own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable, Optional

import msgspec
import psycopg
import pytest

from alerts.alert import Alert
from infra.db.migrate import HYPERTABLES, migrate
from infra.settings import Settings, TopicNames, ValidationSettings
from streams.bench import bench_sales
from streams.outbox import DeadLetterMessage
from streams.records import Sale
from streams.replay.publisher import ensure_topics, publish
from streams.replay.timeline import build_timeline
from streams.validation import REASONS
from streams.worker import WorkerProcess
from tests.conftest import ADMIN_DSN, _fresh_database, free_port

pytestmark = [pytest.mark.integration, pytest.mark.broker]

EVENT_TABLES = ("sales", "listings", "bids", "images")
ROLLUP_KINDS = ("sales", "listings", "bids")  # the tables with a price column
_encode = msgspec.json.Encoder().encode


# -- helpers ----------------------------------------------------------------


def _settings(broker: str, dsn: str, data_dir: Path, mode: str, validation: Optional[dict] = None,
              **worker) -> Settings:
    """Settings for one isolated worker (own topics, app id and ports), usable at
    session scope, with the storage mode the worker's own migration must keep."""
    run = uuid.uuid4().hex[:10]
    names = {k: f"t{run}-{k}" for k in ("listings", "bids", "sales", "images", "alerts", "deadletter")}
    return Settings(
        app_id=f"artwatch-test-{run}",
        broker_url=broker,
        database_url=dsn,
        data_dir=data_dir,
        timescale=mode,
        topics=TopicNames(**names),
        validation=ValidationSettings(**(validation or {})),
        worker={"web_port": free_port(), "metrics_port": free_port(), "batch_within_s": 0.1, **worker},
    )


def _launch(settings: Settings, log: Path) -> WorkerProcess:
    ensure_topics(settings.broker_url, settings.topics, settings.worker.partitions, include_outputs=True)
    return WorkerProcess(settings, log).start()


def _ready(worker: WorkerProcess, timeout: float = 90) -> WorkerProcess:
    try:
        worker.wait_ready(timeout=timeout)
    except Exception:
        worker.kill()
        pytest.fail(f"worker not ready:\n{_log_tail(worker)}")
    return worker


DL_LIMIT = 4096  # validation.max_message_bytes of the dead-letter test's worker
KILL_EVENTS = {"batch": 30_000, "agents": 6_000}  # the agents engine runs at ~4-5k events/s



@functools.lru_cache(maxsize=None)
def _once_timeline() -> list:
    return build_timeline(seed=3, limit=1500, start=datetime(2020, 12, 26, tzinfo=timezone.utc))


def _publish_twice(settings: Settings) -> None:
    """The exactly-once test's input, on the topics before its worker starts:
    every event, then the same events again, so the worker's fetches mix
    first copies and duplicates (also within one batch)."""
    timeline = _once_timeline()
    for _ in range(2):
        counts = publish(timeline, settings.broker_url, settings.topics)
        assert sum(counts.values()) == len(timeline)


# test (pytest item name) -> {role: (database, timescale mode, settings overrides[, before launch])}:
# the workers it needs launched before it runs. "fresh": a database of the worker's own.
ROLES: dict[str, dict[str, tuple]] = {
    "test_exactly_once_with_duplicates[timescale]": {"main": ("timescale", "on", {}, _publish_twice)},
    "test_exactly_once_with_duplicates[plain]": {"main": ("plain", "off", {}, _publish_twice)},
    "test_sigkill_mid_stream_loses_and_duplicates_nothing": {
        engine: ("fresh", "on", {"engine": engine}) for engine in KILL_EVENTS
    },
    "test_a_second_worker_joining_mid_stream_shares_the_work_exactly_once": {"first": ("fresh", "on", {})},
    "test_malformed_messages_are_deadlettered_and_the_stream_goes_on": {
        "main": ("timescale", "on", {"validation": {"max_message_bytes": DL_LIMIT}}),
    },
    "test_consumer_lag_grows_while_the_database_stalls": {"main": ("fresh", "on", {"batch_size": 500})},
    "test_sale_outlier_alert_once_end_to_end": {
        "main": ("timescale", "on", {}),
        "replay": ("timescale", "on", {}),
    },
}


class Fleet:
    """The workers of every selected test, launched together when the first is needed."""

    def __init__(self) -> None:
        self.workers: dict[tuple[str, str], WorkerProcess] = {}
        self.extra: list[WorkerProcess] = []
        self.fresh_dbs: list[str] = []

    def worker(self, request, role: str = "main") -> WorkerProcess:
        """This test's worker for ``role``, ready (it has been joining its group meanwhile)."""
        return _ready(self.workers[(request.node.name, role)])

    def launch(self, settings: Settings, log: Path) -> WorkerProcess:
        """A further worker (a restart), started now; ``_ready`` it."""
        w = _launch(settings, log)
        self.extra.append(w)
        return w

    def close(self) -> None:
        for w in [*self.workers.values(), *self.extra]:
            w.kill()
        if self.fresh_dbs:
            with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
                for name in self.fresh_dbs:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def fleet(request, broker, tmp_path_factory):
    # Session scope, not module: pytest groups the tests of all modules by the
    # session-parametrized any_dsn, leaving and re-entering this module, which
    # would tear a module fixture down and launch every worker again.
    fleet = Fleet()
    try:
        here = sys.modules[__name__]
        wanted = [item.name for item in request.session.items
                  if item.name in ROLES and getattr(item, "module", None) is here]
        for name in wanted:
            for role, (db, mode, overrides, *before) in ROLES[name].items():
                if db == "fresh":
                    dbname = f"artwatch_test_{uuid.uuid4().hex[:10]}"
                    dsn = _fresh_database(dbname)
                    fleet.fresh_dbs.append(dbname)
                else:
                    dsn = request.getfixturevalue(f"{db}_dsn")
                migrate(dsn, timescale=mode)
                data_dir = tmp_path_factory.mktemp("worker")
                settings = _settings(broker, dsn, data_dir, mode, **overrides)
                ensure_topics(broker, settings.topics, settings.worker.partitions, include_outputs=True)
                for prepare in before:
                    prepare(settings)
                fleet.workers[(name, role)] = _launch(settings, data_dir / f"{role}.log")
        yield fleet
    finally:
        fleet.close()


def _log_tail(worker: WorkerProcess, n: int = 40) -> str:
    try:
        return "\n".join(worker.log_path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait(worker: WorkerProcess, done: Callable[[dict], bool], timeout: float, what: str, poll: float = 0.1) -> dict:
    """Poll the worker's metrics until ``done(metrics)``; fail with its log otherwise."""
    deadline = time.monotonic() + timeout
    m: dict = {}
    while time.monotonic() < deadline:
        if not worker.alive():
            pytest.fail(f"worker died while waiting for {what}:\n{_log_tail(worker)}")
        try:
            m = worker.metrics()
        except OSError:
            m = {}
        if m and done(m):
            return m
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last metrics {m}\n{_log_tail(worker)}")


def _handled(m: dict) -> float:
    return m.get("events_stored_total", 0) + m.get("events_duplicate_total", 0) + m.get("deadletter_total", 0)


def _produce(bootstrap: str, topic: str, items: Iterable[tuple], partition: Optional[int] = None,
             sequential: bool = False) -> list:
    """Send ``(key, value)`` items with aiokafka, acks=all; returns their RecordMetadata in order."""
    from aiokafka import AIOKafkaProducer

    async def run() -> list:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                    max_batch_size=512 * 1024, max_request_size=2 * 1024 * 1024)
        await producer.start()
        try:
            if sequential:  # one at a time: offsets in exactly this order
                return [await producer.send_and_wait(topic, value=v, key=k, partition=partition) for k, v in items]
            pending = [await producer.send(topic, value=v, key=k, partition=partition) for k, v in items]
            return list(await asyncio.gather(*pending))
        finally:
            await producer.stop()

    return asyncio.run(run())


def _read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> dict[int, list]:
    """Every record now in ``topic``, per partition in offset order (no group: partitions assigned)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> dict[int, list]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024)
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            assert tps, f"topic {topic} has no partitions"
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: dict[int, list] = {tp.partition: [] for tp in tps}
            deadline = time.monotonic() + timeout
            # Tansu's ListOffsets answers the last record batch's base offset + 1
            # (short of the real end, on S3 storage by whole batches), so read on
            # past the reported ends until a fetch comes back empty.
            quiet = False
            while not quiet or [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not read {topic} to its end offsets {ends}")
                batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                quiet = not batch
                for tp, records in batch.items():
                    out[tp.partition].extend(records)
            return out
        finally:
            await consumer.stop()

    return asyncio.run(run())


def _sales(prefix: str, n: int, collections: int, seed: int) -> list[Sale]:
    """``n`` valid live-looking sales (streams.bench) renamed into this test's id space."""
    return [
        msgspec.structs.replace(s, event_id=f"{prefix}-{i}", collection=f"{prefix}-c{i % collections}")
        for i, s in enumerate(bench_sales(n, seed=seed))
    ]


def _encoded(sales: Iterable[Sale]) -> list[tuple[bytes, bytes]]:
    return [(s.item_id.encode(), _encode(s)) for s in sales]


def _rollup_totals(conn: psycopg.Connection, table: str, collections: list[str]) -> dict[str, tuple[int, Decimal]]:
    rows = conn.execute(
        f"SELECT kind, sum(n)::bigint, sum(volume) FROM {table} WHERE collection = ANY(%s) GROUP BY kind",
        (collections,),
    ).fetchall()
    return {kind: (n, vol) for kind, n, vol in rows}


def _send_sentinels(settings: Settings, run_id: str) -> tuple[str, int]:
    """One sale per partition behind everything else produced so far; once all
    are stored, every partition was read to its end. Returns their collection
    and count."""
    collection = f"sentinel-{run_id}"
    partitions = settings.worker.partitions
    for p, s in enumerate(bench_sales(partitions, seed=99)):
        sentinel = msgspec.structs.replace(s, event_id=f"sentinel-{run_id}-{p}", collection=collection)
        _produce(settings.broker_url, settings.topics.sales, _encoded([sentinel]), partition=p)
    return collection, partitions


def _wait_sentinels(dsn: str, workers: list[WorkerProcess], collection: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM sales WHERE collection = %s", (collection,)).fetchone()[0] < n:
            for w in workers:
                if not w.alive() or time.monotonic() > deadline:
                    pytest.fail(f"{w.log_path.stem} did not read every partition to its end:\n{_log_tail(w)}")
            time.sleep(0.2)


def _assert_stored_once(dsn: str, sales: list[Sale], what: str) -> None:
    """Every sale stored exactly once and the rollups equal to the stored rows."""
    ids = {s.event_id for s in sales}
    with psycopg.connect(dsn) as conn:
        counts = dict(conn.execute("SELECT event_id, count(*) FROM sales WHERE event_id = ANY(%s) GROUP BY event_id",
                                   (sorted(ids),)).fetchall())
        assert len(counts) == len(ids), f"{what}: missing {sorted(ids - set(counts))[:5]}"
        assert set(counts.values()) == {1}, f"{what}: stored twice"
        volume = conn.execute("SELECT sum(price) FROM sales WHERE event_id = ANY(%s)", (sorted(ids),)).fetchone()[0]
        colls = sorted({s.collection for s in sales})
        for table in ("rollup_1m", "rollup_1h"):
            totals = _rollup_totals(conn, table, colls)
            assert totals == {"sales": (len(ids), volume)}, f"{what} {table}: {totals} != {len(ids)} rows / {volume}"


# -- 1. exactly once on both storage paths ----------------------------------


def test_exactly_once_with_duplicates(any_dsn, fleet: Fleet, request) -> None:
    dsn, mode = any_dsn
    worker = fleet.worker(request)
    settings = worker.settings
    assert settings.dsn() == dsn
    timeline = _once_timeline()  # published twice by the fleet before the worker started (_publish_twice)
    expected: dict[str, set[str]] = defaultdict(set)
    for kind, _key, record in timeline:
        expected[kind].add(record.event_id)
    assert set(expected) == set(EVENT_TABLES), "the timeline should exercise every feed"
    assert sum(map(len, expected.values())) == len(timeline), "timeline event ids must be unique"

    published = 2 * len(timeline)

    try:
        m = _wait(worker, lambda m: _handled(m) >= published, 120, f"{published} events handled")
    finally:
        worker.stop()
    assert m.get("deadletter_total", 0) == 0
    assert m["events_stored_total"] == len(timeline)
    assert m["events_duplicate_total"] == len(timeline)

    collections = sorted({r.collection for _k, _key, r in timeline})
    with psycopg.connect(dsn) as conn:
        stored: dict[str, int] = {}
        for kind in EVENT_TABLES:
            ids = sorted(expected[kind])
            rows = conn.execute(
                f"SELECT event_id, count(*) FROM {kind} WHERE event_id = ANY(%s) GROUP BY event_id", (ids,)
            ).fetchall()
            counts = dict(rows)
            assert set(counts) == expected[kind], f"{kind}: missing {len(expected[kind] - set(counts))} events"
            assert set(counts.values()) == {1}, f"{kind}: stored twice: {[i for i, c in counts.items() if c > 1][:5]}"
            stored[kind] = len(counts)
        # Rollups: n per kind equals the rows stored, volume equals their price sum (duplicates added nothing).
        prices = {
            kind: conn.execute(
                f"SELECT count(*), sum({col}) FROM {kind} WHERE event_id = ANY(%s)", (sorted(expected[kind]),)
            ).fetchone()
            for kind, col in (("sales", "price"), ("listings", "price"), ("bids", "amount"))
        }
        for table in ("rollup_1m", "rollup_1h"):
            totals = _rollup_totals(conn, table, collections)
            assert set(totals) == set(ROLLUP_KINDS), f"{table}: kinds {sorted(totals)}"
            for kind in ROLLUP_KINDS:
                assert totals[kind][0] == stored[kind], f"{table} n for {kind}: {totals[kind][0]} != {stored[kind]}"
                assert totals[kind][1] == prices[kind][1], f"{table} volume for {kind}"

        if mode == "on":
            hypertables = conn.execute("SELECT count(*) FROM timescaledb_information.hypertables").fetchone()[0]
            assert hypertables >= 7 and hypertables >= len(HYPERTABLES)
        else:
            # The plain path's database never loads the extension, so it can hold no hypertable.
            has_ext = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
            assert has_ext is None, "the plain path (timescale=off) must not load TimescaleDB"


# -- 2. SIGKILL mid-stream ----------------------------------------------------


def _client_sessions(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).fetchone()[0]


def test_sigkill_mid_stream_loses_and_duplicates_nothing(fleet: Fleet, request, run_id, tmp_path: Path) -> None:
    """Both engines, side by side: a worker restarted in the group of a SIGKILLed
    one waits out the dead member's session (~2 min on Tansu), so the two
    engines' restarts overlap instead of running one after the other."""
    first = {engine: fleet.worker(request, engine) for engine in KILL_EVENTS}
    settings = {engine: w.settings for engine, w in first.items()}
    for engine, s in settings.items():
        assert s.worker.engine == engine
    prefix = {engine: f"kill-{engine}-{run_id}" for engine in KILL_EVENTS}
    sales = {engine: _sales(prefix[engine], n, collections=40, seed=5) for engine, n in KILL_EVENTS.items()}
    items = {engine: _encoded(v) for engine, v in sales.items()}
    head = {engine: v[: len(v) * 2 // 3] for engine, v in items.items()}  # the rest comes while no worker runs

    # Each worker consumes while its backlog is produced and is killed at its first commit.
    producers = [
        threading.Thread(target=_produce, args=(settings[e].broker_url, settings[e].topics.sales, head[e]))
        for e in KILL_EVENTS
    ]
    for t in producers:
        t.start()
    try:
        deadline = time.monotonic() + 120
        alive = dict(first)
        while alive:
            for engine, w in list(alive.items()):
                if not w.alive():
                    pytest.fail(f"{engine} worker died before the kill:\n{_log_tail(w)}")
                try:
                    stored = w.metrics().get("events_stored_total", 0)
                except OSError:
                    stored = 0
                if stored > 0:
                    w.kill()
                    del alive[engine]
            if time.monotonic() > deadline:
                pytest.fail(f"no batch stored by {sorted(alive)} in 120 s")
            time.sleep(0.02)
    finally:
        for w in first.values():
            w.kill()
        for t in producers:
            t.join()

    at_kill = {}
    for engine, w in first.items():
        assert w.proc.returncode == -9
        with psycopg.connect(settings[engine].dsn(), autocommit=True) as conn:
            # The dead worker's sessions end server side (a COMMIT already sent may still land) before counting.
            deadline = time.monotonic() + 15
            while _client_sessions(conn) and time.monotonic() < deadline:
                time.sleep(0.1)
            at_kill[engine] = conn.execute("SELECT count(*) FROM sales").fetchone()[0]
        assert 0 < at_kill[engine] < KILL_EVENTS[engine], f"{engine}: kill not mid-stream ({at_kill[engine]} stored)"
        _produce(settings[engine].broker_url, settings[engine].topics.sales, items[engine][len(head[engine]):])

    # Same settings, so the same consumer group and its committed offsets.
    second = {engine: fleet.launch(s, tmp_path / f"{engine}-restart.log") for engine, s in settings.items()}
    try:
        for w in second.values():
            _ready(w, timeout=200)
        # Stored or dropped as duplicate, rollups folded: up to each partition's end.
        sentinels = {engine: _send_sentinels(s, run_id) for engine, s in settings.items()}
        for engine, w in second.items():
            _wait_sentinels(settings[engine].dsn(), [w], *sentinels[engine])
        # The rows are visible before the worker's counter moves (it counts after the commit returns).
        after = {engine: _wait(w, lambda m, e=engine: m.get("events_stored_total", 0)
                               >= KILL_EVENTS[e] - at_kill[e] + sentinels[e][1], 30, f"{engine} counters")
                 for engine, w in second.items()}
    finally:
        for w in second.values():
            w.stop()

    for engine, n in KILL_EVENTS.items():
        _assert_stored_once(settings[engine].dsn(), sales[engine], engine)
        m = after[engine]
        assert m.get("deadletter_total", 0) == 0
        # Whatever the dead worker had stored but not committed was re-read and dropped, not stored again.
        assert m["events_stored_total"] == n - at_kill[engine] + sentinels[engine][1], (engine, m, at_kill[engine])


# -- 2b. scaling out: a second worker joins mid-stream --------------------------

SCALE_EVENTS = 40_000


def test_a_second_worker_joining_mid_stream_shares_the_work_exactly_once(
    fleet: Fleet, request, run_id, tmp_path: Path
) -> None:
    """Users outgrow one worker by adding workers, not code: a second worker in
    the same group takes over partitions while the first is busy, offsets of
    revoked partitions are not committed past unstored rows, and every event is
    stored once."""
    first = fleet.worker(request, "first")
    settings = first.settings
    ports = {"metrics_port": free_port(), "web_port": free_port()}
    twin = settings.model_copy(update={"worker": settings.worker.model_copy(update=ports)})
    sales = _sales(f"scale-{run_id}", SCALE_EVENTS, collections=40, seed=8)
    items = _encoded(sales)
    chunks = [items[i:i + 500] for i in range(0, len(items), 500)]

    def trickle() -> None:  # ~20 s of traffic, so the rebalance happens mid-stream
        for chunk in chunks:
            _produce(settings.broker_url, settings.topics.sales, chunk)
            time.sleep(0.25)

    producer = threading.Thread(target=trickle)
    producer.start()
    second = fleet.launch(twin, tmp_path / "second.log")
    try:
        _ready(second, timeout=120)
        # Both hold input partitions (4 topics x 4 partitions between them) while events still flow.
        def both() -> list[float]:
            return [w.metrics().get("assigned_partitions", 0) for w in (first, second)]

        deadline = time.monotonic() + 90
        while not (all(both()) and sum(both()) == 4 * settings.worker.partitions):
            if time.monotonic() > deadline:
                pytest.fail(f"the group never split its partitions: {both()}\n{_log_tail(second)}")
            time.sleep(0.2)
        split_while_producing = producer.is_alive()
        producer.join()
        sentinels = _send_sentinels(settings, run_id)
        _wait_sentinels(settings.dsn(), [first, second], *sentinels)
        # The rows are visible before the workers' counters move (they count after the commit returns).
        expected = SCALE_EVENTS + sentinels[1]
        deadline = time.monotonic() + 30
        while True:
            m1, m2 = first.metrics(), second.metrics()
            if m1.get("events_stored_total", 0) + m2.get("events_stored_total", 0) >= expected:
                break
            if time.monotonic() > deadline:
                break  # the equality below reports the shortfall
            time.sleep(0.1)
    finally:
        producer.join()
        second.stop()
    assert split_while_producing, "the second worker joined only after the traffic ended; slow the trickle"
    _assert_stored_once(settings.dsn(), sales, "two workers")
    assert m1.get("events_stored_total", 0) > 0 and m2.get("events_stored_total", 0) > 0, (m1, m2)
    # Each row was counted new by exactly one of them; a rebalance may only add duplicates.
    assert m1["events_stored_total"] + m2["events_stored_total"] == SCALE_EVENTS + sentinels[1]
    assert m1.get("deadletter_total", 0) == m2.get("deadletter_total", 0) == 0


# -- 3. dead letters -----------------------------------------------------------


def test_malformed_messages_are_deadlettered_and_the_stream_goes_on(
    fleet: Fleet, request, run_id
) -> None:
    limit = DL_LIMIT
    worker = fleet.worker(request)
    settings = worker.settings
    assert settings.validation.max_message_bytes == limit
    dsn = settings.dsn()
    topic = settings.topics.sales
    prefix = f"dl-{run_id}"
    good = _sales(prefix, 20, collections=2, seed=7)
    before, after = good[:10], good[10:]

    def variant(**changes) -> bytes:
        d = json.loads(_encode(good[0]))
        d["event_id"] = f"{prefix}-bad-{uuid.uuid4().hex[:6]}"
        for k, v in changes.items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v
        return json.dumps(d).encode()

    future = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    bad = [
        ("malformed_json", b'{"event_id": "broken", "ts": '),
        ("missing_field", variant(price=None)),
        ("invalid_field", variant(price="-1.5")),
        ("invalid_field", variant(currency="XYZ")),
        ("future_timestamp", variant(ts=future)),
        ("oversized", variant(source="x" * 200, tx="y" * 200, pad="z" * (limit + 100))),
        ("empty", b""),
        ("invalid_field", variant(buyer="0x\u0000")),  # PostgreSQL text cannot hold NUL
        ("invalid_field", variant(price="1e200000")),  # beyond any market, and beyond numeric's wire format
        ("invalid_field", variant(ts="0001-01-03T00:00:00Z")),  # would overflow the rule's window start
        # Zero, so the edge lets it through, but it cannot be sent as numeric: the
        # database refuses the batch, the pipeline finds the row, the rest is stored.
        ("rejected_by_database", variant(price="0E-20000")),
    ]
    assert {reason for reason, _ in bad} <= set(REASONS)
    assert len(bad[5][1]) > limit
    items = _encoded(before) + [(b"bad", value) for _, value in bad] + _encoded(after)
    meta = _produce(settings.broker_url, topic, items, partition=0, sequential=True)
    offsets = [md.offset for md in meta]
    expected = {(0, offsets[len(before) + i]): reason for i, (reason, _) in enumerate(bad)}

    try:
        m = _wait(worker, lambda m: _handled(m) >= len(items), 90, f"{len(items)} messages handled")
    finally:
        worker.stop()

    assert m["deadletter_total"] == len(bad)
    assert m["events_stored_total"] == len(good)
    with psycopg.connect(dsn) as conn:
        stored = {r[0] for r in conn.execute("SELECT event_id FROM sales WHERE event_id LIKE %s", (f"{prefix}-%",))}
        assert stored == {s.event_id for s in good}, "valid events around the bad ones must all be stored"
        rows = conn.execute(
            'SELECT "partition", "offset", reason, error, value FROM deadletters WHERE topic = %s', (topic,)
        ).fetchall()
    assert {(p, o): reason for p, o, reason, _e, _v in rows} == expected
    assert len(rows) == len(bad)
    for p, o, reason, error, value in rows:
        assert error, f"deadletter at {o} has no error text"
        if reason == "oversized":  # kept whole in the table; the topic gets a bounded copy
            assert len(value) == len(bad[5][1]) > limit and str(len(bad[5][1])) in error

    out = [r for recs in _read_topic(settings.broker_url, settings.topics.deadletter).values() for r in recs]
    assert len(out) == len(bad)
    seen = {}
    for rec in out:
        headers = {k: v.decode() for k, v in rec.headers}
        assert headers["x-source-topic"] == topic
        letter = msgspec.json.decode(rec.value, type=DeadLetterMessage)
        assert (letter.topic, letter.partition, letter.offset) == (topic, int(headers["x-source-partition"]),
                                                                   int(headers["x-source-offset"]))
        assert headers["x-error-class"] == letter.reason
        seen[(letter.partition, letter.offset)] = letter.reason
    assert seen == expected


def test_consumer_lag_grows_while_the_database_stalls(fleet: Fleet, request, run_id) -> None:
    """Lag must count what is fetched but not stored while the database stalls
    (an alarm can fire) and fall back once it answers. It is measured from the
    committed offset: the old highwater-minus-position stayed near one batch.

    On real Kafka the lag reaches the whole backlog (ListOffsets); on Tansu,
    whose ListOffsets answer falls short, it reaches at least what the worker
    fetched: two batches in flight and the next one prepared (3 x 500)."""
    worker = fleet.worker(request)
    settings = worker.settings
    dsn, topic = settings.dsn(), settings.topics.sales

    def lag(m: dict) -> float:
        return m.get("consumer_lag_messages", 0)

    sales = _sales(f"lag-{run_id}", 3100, collections=4, seed=5)
    _produce(settings.broker_url, topic, _encoded(sales[:100]))
    _wait(worker, lambda m: m.get("events_stored_total", 0) >= 100, 60, "the first 100 stored")
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE sales IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
        _produce(settings.broker_url, topic, _encoded(sales[100:]))
        m = _wait(worker, lambda m: lag(m) >= 1500, 30, "lag to count the fetched, unstored events")
        assert m["events_stored_total"] == 100 and 1500 <= lag(m) <= 3000, m
        blocker.rollback()
    m = _wait(worker, lambda m: m.get("events_stored_total", 0) >= 3100 and lag(m) == 0, 60, "catch-up")
    worker.stop()
    assert m["events_stored_total"] == 3100


# -- 4. alerts end to end ------------------------------------------------------


def test_sale_outlier_alert_once_end_to_end(fleet: Fleet, request, run_id) -> None:
    worker = fleet.worker(request)
    settings = worker.settings
    dsn = settings.dsn()
    collection = f"alerts-{run_id}"
    t0 = datetime.now(timezone.utc) - timedelta(hours=1)

    def sale(i: int, price: str, item: str) -> Sale:
        return Sale(event_id=f"{collection}-{i}", ts=t0 + timedelta(minutes=i), collection=collection,
                    item_id=item, buyer=f"b{i}", seller=f"s{i}", price=Decimal(price), currency="ETH",
                    synthetic=True, source="test")

    history = [sale(i, "1", f"item-{i}") for i in range(6)]
    outlier = sale(6, "10", "item-outlier")
    later = [sale(i, "1.1", f"item-{i}") for i in range(7, 9)]
    events = history + [outlier] + later
    items = [(collection.encode(), _encode(s)) for s in events]  # one key: one partition, order kept
    _produce(settings.broker_url, settings.topics.sales, items, sequential=True)

    def handled(worker: WorkerProcess, expect: int) -> dict:
        try:
            return _wait(worker, lambda m: _handled(m) >= expect, 90, f"{expect} sales handled")
        finally:
            worker.stop()

    def alerts_now(topic: str = settings.topics.alerts) -> tuple[list, list[Alert]]:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "SELECT alert_id, kind, subject, published_at, evidence FROM alerts WHERE collection = %s",
                (collection,),
            ).fetchall()
        on_topic = [msgspec.json.decode(r.value, type=Alert)
                    for recs in _read_topic(settings.broker_url, topic).values() for r in recs]
        return rows, on_topic

    m = handled(worker, len(events))
    assert m["events_stored_total"] == len(events)
    assert m.get("alerts_emitted_total") == 1
    rows, on_topic = alerts_now()
    assert len(rows) == 1, rows
    alert_id, kind, subject, published_at, evidence = rows[0]
    assert (kind, subject) == ("sale_outlier", outlier.item_id)
    assert evidence["event_id"] == outlier.event_id and Decimal(evidence["median"]) == 1
    assert published_at is not None
    assert [(a.alert_id, a.kind, a.subject, a.collection) for a in on_topic] == [
        (alert_id, "sale_outlier", outlier.item_id, collection)
    ]

    # A replay after the restart: another worker process (fresh memory, same
    # database; launched with the fleet to save a ~30 s group join) gets the
    # same events twice. Its rule sees the outlier again (warmed from the
    # database), but the alert exists and is published: no second row, no resend.
    replay = fleet.worker(request, "replay")
    r = replay.settings
    assert r.dsn() == dsn and r.app_id != settings.app_id
    _produce(r.broker_url, r.topics.sales, items + items, sequential=True)
    m = handled(replay, 2 * len(events))
    assert m.get("events_stored_total", 0) == 0
    assert m["events_duplicate_total"] == 2 * len(events)
    assert m.get("alerts_emitted_total", 0) == 0
    rows2, on_topic2 = alerts_now()
    assert [r[0] for r in rows2] == [alert_id]
    assert rows2[0][3] == published_at, "a replay must not re-publish the alert"
    assert [a.alert_id for a in on_topic2] == [alert_id]
    assert alerts_now(r.topics.alerts)[1] == [], "the replaying worker published an alert"


# -- 5. migrations are idempotent ---------------------------------------------


def _row_counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def test_migrations_twice(any_dsn) -> None:
    dsn, mode = any_dsn
    before = _row_counts(dsn)
    assert "schema_migrations" in before and before["schema_migrations"] >= 1
    first = migrate(dsn, timescale=mode)
    second = migrate(dsn, timescale=mode)
    assert first.applied == () and second.applied == ()
    assert first.timescale is second.timescale is (mode == "on")
    assert first.hypertables == second.hypertables
    assert set(second.hypertables) == (set(HYPERTABLES) if mode == "on" else set())
    assert _row_counts(dsn) == before

    # From nothing: the first run applies every version, the second none, data untouched.
    fresh = _fresh_database(f"artwatch_test_mig_{mode}_{uuid.uuid4().hex[:8]}")
    try:
        r1 = migrate(fresh, timescale=mode)
        assert r1.applied and r1.applied[0].startswith("001")
        with psycopg.connect(fresh) as conn:
            conn.execute(
                "INSERT INTO sales (event_id, ts, collection, item_id, buyer, seller, price, currency,"
                " synthetic, source) VALUES ('m1', now(), 'c', 'i', 'b', 's', 1, 'ETH', true, 'test')"
            )
        counts = _row_counts(fresh)
        r2 = migrate(fresh, timescale=mode)
        assert r2.applied == ()
        assert _row_counts(fresh) == counts and counts["sales"] == 1
        assert set(r2.hypertables) == (set(HYPERTABLES) if mode == "on" else set())
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{psycopg.conninfo.conninfo_to_dict(fresh)["dbname"]}" WITH (FORCE)')


# -- 6. replay determinism through the broker ---------------------------------


def test_replay_is_deterministic_through_the_broker(broker: str) -> None:
    def through_broker(seed: int) -> dict[tuple[str, int], list[tuple[bytes, bytes]]]:
        run = uuid.uuid4().hex[:10]
        topics = TopicNames(**{k: f"replay-{run}-{k}" for k in TopicNames.model_fields})
        ensure_topics(broker, topics, partitions=3)
        timeline = build_timeline(seed=seed, limit=500)
        counts = publish(timeline, broker, topics)
        assert sum(counts.values()) == len(timeline) == 500
        out = {}
        for kind, name in topics.inputs().items():
            for partition, records in _read_topic(broker, name).items():
                out[(kind, partition)] = [(r.key, r.value) for r in records]
        assert sum(map(len, out.values())) == 500
        # What went in is what the timeline encodes, in timeline order per partition.
        encoded = [_encode(r) for _, _, r in timeline]
        assert Counter(v for recs in out.values() for _k, v in recs) == Counter(encoded)
        position = {v: i for i, v in enumerate(encoded)}
        for (kind, partition), recs in out.items():
            order = [position[v] for _k, v in recs]
            assert order == sorted(order), f"{kind}[{partition}] is not in timeline order"
        return out

    a, b, c = through_broker(11), through_broker(11), through_broker(12)
    assert a == b
    assert a != c

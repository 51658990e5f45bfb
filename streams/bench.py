"""``artwatch bench ingest``: the worker end to end against same-run baselines.

pipeline_eps     first produce -> last row committed, through worker child
                 processes (validate, store, roll up, alert rule), after one
                 warm-up event has gone through. One worker by default;
                 ``workers=N`` runs N in one consumer group.
raw_consume_eps  a plain aiokafka consumer reading the same topic, no work.
sink_rows_per_s  the idempotent sink alone on the same rows and batch size.
raw_copy_rows_per_s  plain COPY of the same rows into the same table.

Events are synthetic sales timestamped like a live feed at ~20,000/s (a
market that busy fills minute buckets; spreading them over years would make
every rollup row unique). Everything runs in a throwaway schema and topics,
on a broker of the bench's own: ``broker_storage`` s3 (the durable default),
memory, or both, which runs the pipeline on each and reports ``s3_vs_memory``,
what durability costs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import random
import shutil
import socket
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Optional

import msgspec
import psycopg
from pydantic import SecretStr

from infra.db.migrate import migrate
from infra.db.sink import EventSink, column_types
from infra.errors import ArtwatchError
from infra.settings import Settings, TopicNames
from infra.stack import Stack
from streams.records import Sale
from streams.storage import TABLE_SPECS, row_builder
from streams.worker import WorkerProcess, with_free_ports

__all__ = ["bench_ingest"]

log = logging.getLogger(__name__)

_LIVE_RATE = 20_000.0  # events per second of event time


def _with_schema(dsn: str, schema: str) -> str:
    """``dsn`` (URL or key=value form) with ``schema`` first on the search path."""
    return psycopg.conninfo.make_conninfo(dsn, options=f"-csearch_path={schema},public")


def bench_sales(n: int, seed: int = 1) -> list[Sale]:
    """``n`` synthetic sales over 200 collections, ending 5 s before now."""
    rng = random.Random(seed)
    start = datetime.now(timezone.utc) - timedelta(seconds=n / _LIVE_RATE + 5)
    step = timedelta(seconds=1 / _LIVE_RATE)
    return [
        Sale(
            event_id=f"bench-{seed}-{i}", ts=start + i * step, collection=f"bench-{i % 200}",
            item_id=str(rng.randrange(100_000)), buyer=f"0x{rng.getrandbits(160):040x}",
            seller=f"0x{rng.getrandbits(160):040x}",
            price=Decimal(str(round(rng.lognormvariate(0, 0.5), 6))), currency="ETH",
            tx=f"0x{rng.getrandbits(256):064x}", synthetic=True, source="bench-synthetic",
        )
        for i in range(n)
    ]


def _produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    """Publish as the load generator: aiokafka record batches built directly,
    keyed to partitions with Kafka's default (murmur2) partitioner. The
    producer shares the 2 cores with the worker, broker and database, so the
    cheaper it is per message, the more of the machine the pipeline gets."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1024 * 1024)
        await producer.start()
        try:
            parts = sorted(await producer.partitions_for(topic))
            partition = DefaultPartitioner()
            batches = {p: producer.create_batch() for p in parts}
            pending = []
            for key, value in items:
                p = partition(key, parts, parts)
                if batches[p].append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batches[p], topic, partition=p))
                    batches[p] = producer.create_batch()
                    batches[p].append(key=key, value=value, timestamp=None)
            for p, batch in batches.items():
                if batch.record_count():
                    pending.append(await producer.send_batch(batch, topic, partition=p))
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    asyncio.run(run())


async def _raw_consume(bootstrap: str, topic: str, expect: int) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=4 * 1024 * 1024
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not parts:
            await consumer.force_metadata_update()
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        # From the first fetch request, so a topic that arrives in one fetch
        # still yields a rate (not the gap between two records of one batch).
        got, first = 0, time.perf_counter()
        while got < expect:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            got += sum(len(v) for v in batch.values())
        return got / (time.perf_counter() - first)
    finally:
        await consumer.stop()


async def _sink_vs_copy(dsn: str, rows: list[tuple], batch: int, rounds: int) -> tuple[float, float]:
    spec = TABLE_SPECS["sales"]
    sink = EventSink(dsn, [spec])
    conn = await psycopg.AsyncConnection.connect(dsn)
    best_sink = best_copy = 0.0
    try:
        # The baseline uses the sink's own COPY format (binary), so the ratio
        # measures idempotence and rollups, not a format choice.
        types = await column_types(conn, "sales", spec.columns)
        copy_sql = spec.copy_sql
        for _ in range(rounds):
            await conn.execute("TRUNCATE sales, event_ids, rollup_1m, rollup_1h")  # event_ids: the ids are new again
            await conn.commit()
            t = time.perf_counter()
            for i in range(0, len(rows), batch):
                await sink.write("sales", rows[i : i + batch])
            best_sink = max(best_sink, len(rows) / (time.perf_counter() - t))
            await conn.execute("TRUNCATE sales")
            await conn.commit()
            t = time.perf_counter()
            for i in range(0, len(rows), batch):
                async with conn.transaction():
                    async with conn.cursor().copy(copy_sql) as copy:
                        copy.set_types(types)
                        for row in rows[i : i + batch]:
                            await copy.write_row(row)
            best_copy = max(best_copy, len(rows) / (time.perf_counter() - t))
    finally:
        await sink.close()
        await conn.close()
    return best_sink, best_copy


def bench_ingest(settings: Settings, events: int = 100_000, rounds: int = 2, workers: int = 1,
                 broker_storage: Optional[str] = None) -> dict:
    """Run the ingest benchmark; returns the figures (see module docstring).

    ``broker_storage``: ``"s3"``, ``"memory"``, ``"both"`` (one pipeline run on
    each, s3 first, and their ratios in ``s3_vs_memory``) or None (the
    configured ``settings.broker_storage``). Each run has its own broker.
    """
    if events < 1:
        raise ArtwatchError("--events must be >= 1")
    if workers < 1:
        raise ArtwatchError("--workers must be >= 1")
    if broker_storage not in (None, "s3", "memory", "both"):
        raise ArtwatchError(f"--broker-storage must be s3, memory or both, got {broker_storage!r}")
    modes = ["s3", "memory"] if broker_storage == "both" else [broker_storage or settings.broker_storage]

    stack = Stack(settings)
    mine = Stack.started(stack.up(services=("database",)))  # the configured database; stopped at the end
    run = f"{int(time.time())}{os.getpid()}"
    schema = f"bench_{run}"
    base_dsn = settings.dsn()
    dsn = _with_schema(base_dsn, schema)
    root = Path(tempfile.mkdtemp(prefix="artwatch-bench-"))  # brokers, worker logs and data; kept only on failure
    by_mode: dict[str, dict] = {}
    try:
        with psycopg.connect(base_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        timescale = migrate(dsn, timescale=settings.timescale).timescale
        sales = bench_sales(events + 1)
        items = [(s.item_id.encode(), msgspec.json.encode(s)) for s in sales]
        for mode in modes:
            if by_mode:  # the same events again, into empty tables
                _empty_tables(dsn, schema)
            by_mode[mode] = _bench_pipeline(settings, mode, dsn, f"{run}-{mode}", items, workers, root / mode)
        rows = [row_builder("sales")(s) for s in sales]
        sink_rps, copy_rps = asyncio.run(_sink_vs_copy(dsn, rows, settings.worker.batch_size, rounds))
    finally:
        _drop_schema(base_dsn, schema)
        if mine:
            stack.down(services=mine)
    shutil.rmtree(root, ignore_errors=True)
    first = by_mode[modes[0]]
    result = {
        "events": events,
        "broker_storage": broker_storage or settings.broker_storage,
        **{k: first[k] for k in ("pipeline_eps", "raw_consume_eps", "ratio", "produce_eps")},
        "sink_rows_per_s": round(sink_rps),
        "raw_copy_rows_per_s": round(copy_rps),
        "sink_ratio": round(sink_rps / copy_rps, 3),
        "storage": by_mode,
        "engine": settings.worker.engine,
        "workers": workers,
        "stored_per_worker": first["stored_per_worker"],
        "batch_size": settings.worker.batch_size,
        "partitions": settings.worker.partitions,
        "timescale": timescale,
        "rows_verified": events + 1,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
    }
    if len(by_mode) == 2:  # what durability costs, measured in the same run
        s3, memory = by_mode["s3"], by_mode["memory"]
        result["s3_vs_memory"] = {k: round(s3[k] / memory[k], 3)
                                  for k in ("pipeline_eps", "raw_consume_eps", "produce_eps")}
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _empty_tables(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> 'schema_migrations'", (schema,))]
        conn.execute("TRUNCATE " + ", ".join(f'"{schema}"."{t}"' for t in tables))


def _bench_pipeline(settings: Settings, storage: str, dsn: str, run: str, items: list[tuple[bytes, bytes]],
                    workers: int, workdir: Path) -> dict:
    """One pipeline run on a fresh broker of its own with ``storage``, into
    ``dsn``'s empty tables: the timed end-to-end figure and the raw-consume baseline."""
    events = len(items) - 1
    # A broker of its own (free port, data under workdir): the same start for
    # each storage, and nothing left in the user's durable broker.
    own = settings.model_copy(update={"broker_url": f"127.0.0.1:{_free_port()}", "broker_storage": storage,
                                      "data_dir": workdir})
    names = {k: f"bench-{k}-{run}" for k in ("listings", "bids", "sales", "images", "alerts", "deadletter")}
    bench = own.model_copy(update={
        "app_id": f"artwatch-bench-{run}", "database_url": SecretStr(dsn), "topics": TopicNames(**names),
    })
    fleet = [WorkerProcess(with_free_ports(bench), workdir / f"worker-{i}.log") for i in range(workers)]
    from streams.replay.publisher import ensure_topics

    with Stack(own).running(services=("broker",)):
        try:
            ensure_topics(own.broker_url, bench.topics, settings.worker.partitions, include_outputs=True)
            log.info("bench: %d events, %d worker(s), %s storage, logs in %s", events, workers, storage, workdir)
            for w in fleet:
                w.start()
            for w in fleet:  # the last to own partitions closes the group's rebalance
                w.wait_ready()
            _produce(own.broker_url, names["sales"], items[:1])  # warm-up: connection, chunk, caches
            _wait_stored(fleet, 1, timeout=60)  # warm-up

            produced: dict[str, float] = {}

            def produce_timed() -> None:
                _produce(own.broker_url, names["sales"], items[1:])
                produced["s"] = time.perf_counter() - t0

            producer = threading.Thread(target=produce_timed)
            t0, wall0 = time.perf_counter(), time.time()
            producer.start()
            # The end mark is the worker's own last-commit time, so polling can be
            # slow (scrapes cost the worker CPU) without blurring the figure.
            last_commit, per_worker = _wait_stored(fleet, events + 1, timeout=max(120, events / 1000))
            pipeline_s = last_commit - wall0
            producer.join()
            with psycopg.connect(dsn) as conn:
                stored = conn.execute("SELECT count(*) FROM sales").fetchone()[0]
            if stored != events + 1:
                raise ArtwatchError(f"bench: {stored} rows stored for {events + 1} events")
            for w in fleet:
                w.stop()
            raw_eps = asyncio.run(_raw_consume(own.broker_url, names["sales"], events + 1))
        finally:
            for w in fleet:
                w.kill()
    pipeline_eps = events / pipeline_s
    return {"pipeline_eps": round(pipeline_eps), "raw_consume_eps": round(raw_eps),
            "ratio": round(pipeline_eps / raw_eps, 4), "produce_eps": round(events / produced["s"]),
            "stored_per_worker": per_worker}


def _wait_stored(fleet: list[WorkerProcess], n: int, timeout: float) -> tuple[float, list[int]]:
    """Wait until the workers stored ``n`` events between them; return their
    latest commit time and what each stored."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in fleet:
            if not w.alive():
                raise ArtwatchError(f"bench worker died; see {w.log_path}")
        try:
            ms = [w.metrics() for w in fleet]
            stored = [int(m.get("events_stored_total", 0)) for m in ms]
            if sum(stored) >= n:
                return max(m.get("last_commit_timestamp_seconds", 0.0) for m in ms), stored
        except OSError:
            pass
        time.sleep(0.5)
    raise ArtwatchError(f"bench: {n} events not stored within {timeout:.0f}s; see {fleet[0].log_path.parent}")


def _drop_schema(dsn: str, schema: str) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except psycopg.Error as exc:
        log.warning("bench cleanup: could not drop schema %s: %s", schema, exc)

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
every rollup row unique). Everything runs in a throwaway schema and topics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import random
import shutil
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

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
            await conn.execute("TRUNCATE sales, rollup_1m, rollup_1h")
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


def bench_ingest(settings: Settings, events: int = 100_000, rounds: int = 2, workers: int = 1) -> dict:
    """Run the ingest benchmark; returns the figures (see module docstring)."""
    if events < 1:
        raise ArtwatchError("--events must be >= 1")
    if workers < 1:
        raise ArtwatchError("--workers must be >= 1")
    from streams.replay.publisher import ensure_topics

    stack = Stack(settings)
    mine = Stack.started(stack.up())  # stopped at the end
    run = f"{int(time.time())}{os.getpid()}"
    schema = f"bench_{run}"
    base_dsn = settings.dsn()
    dsn = _with_schema(base_dsn, schema)
    names = {k: f"bench-{k}-{run}" for k in ("listings", "bids", "sales", "images", "alerts", "deadletter")}
    logdir = Path(tempfile.mkdtemp(prefix="artwatch-bench-"))  # worker logs and data; kept only on failure
    bench = settings.model_copy(update={
        "app_id": f"artwatch-bench-{run}", "database_url": SecretStr(dsn), "topics": TopicNames(**names),
        "data_dir": logdir,
    })
    fleet = [
        WorkerProcess(with_free_ports(bench), logdir / f"worker-{i}.log")
        for i in range(workers)
    ]
    try:
        with psycopg.connect(base_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        timescale = migrate(dsn, timescale=settings.timescale).timescale
        ensure_topics(settings.broker_url, bench.topics, settings.worker.partitions, include_outputs=True)
        sales = bench_sales(events + 1)
        items = [(s.item_id.encode(), msgspec.json.encode(s)) for s in sales]
        log.info("bench: %d events, %d worker(s), logs in %s", events, workers, logdir)
        for w in fleet:
            w.start()
        for w in fleet:  # the last to own partitions closes the group's rebalance
            w.wait_ready()
        _produce(settings.broker_url, names["sales"], items[:1])  # warm-up: connection, chunk, caches
        _wait_stored(fleet, 1, timeout=60)  # warm-up

        produced: dict[str, float] = {}

        def produce_timed() -> None:
            _produce(settings.broker_url, names["sales"], items[1:])
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

        raw_eps = asyncio.run(_raw_consume(settings.broker_url, names["sales"], events + 1))
        rows = [row_builder("sales")(s) for s in sales]
        sink_rps, copy_rps = asyncio.run(_sink_vs_copy(dsn, rows, settings.worker.batch_size, rounds))
    finally:
        for w in fleet:
            w.kill()
        _cleanup(base_dsn, schema, settings.broker_url, list(names.values()))
        if mine:
            stack.down(services=mine)
    shutil.rmtree(logdir, ignore_errors=True)
    pipeline_eps = events / pipeline_s
    return {
        "events": events,
        "pipeline_eps": round(pipeline_eps),
        "raw_consume_eps": round(raw_eps),
        "ratio": round(pipeline_eps / raw_eps, 4),
        "produce_eps": round(events / produced["s"]),
        "sink_rows_per_s": round(sink_rps),
        "raw_copy_rows_per_s": round(copy_rps),
        "sink_ratio": round(sink_rps / copy_rps, 3),
        "engine": settings.worker.engine,
        "workers": workers,
        "stored_per_worker": per_worker,
        "batch_size": settings.worker.batch_size,
        "partitions": settings.worker.partitions,
        "timescale": timescale,
        "rows_verified": events + 1,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
    }


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


def _cleanup(dsn: str, schema: str, bootstrap: str, topics: list[str]) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except psycopg.Error as exc:
        log.warning("bench cleanup: could not drop schema %s: %s", schema, exc)
    try:
        from kafka.admin import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.delete_topics(topics)
        admin.close()
    except Exception as exc:  # noqa: BLE001 - best effort; the embedded broker forgets topics anyway
        log.warning("bench cleanup: could not delete topics: %s", exc)

"""The outbox (streams/outbox.py) on the real database and real brokers: dead
letters always fit on their topic, a broker that does not answer parks the
messages instead of failing or hanging the batch, no lock is held while the
broker is awaited, and concurrent flushes do not send a row twice."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from datetime import timedelta

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from alerts.alert import Alert
from alerts.kinds.sale_outlier import SaleOutlierRule
from infra.db.sink import EventSink
from infra.metrics import build_metrics
from infra.settings import Settings, TopicNames, WorkerSettings
from infra.stack import Stack
from streams.outbox import DEADLETTER_VALUE_MAX, DeadLetterMessage, Outbox
from streams.pipeline import BatchPipeline, IncomingMessage
from streams.replay.publisher import ensure_topics
from streams.storage import TABLE_SPECS
from tests.conftest import ADMIN_DSN, free_port
from tests.integration.test_ingest import _read_topic
from tests.integration.test_pipeline import _messages, _sale

pytestmark = pytest.mark.integration

PRODUCER_LIMIT = 1_000_000  # Kafka's default max.request.size


def _settings(broker: str, dsn: str, publish_timeout_s: float = 30.0) -> Settings:
    run = uuid.uuid4().hex[:8]
    names = {k: f"test-outbox-{k}-{run}" for k in ("listings", "bids", "sales", "images", "alerts", "deadletter")}
    return Settings(broker_url=broker, database_url=dsn, topics=TopicNames(**names),
                    worker=WorkerSettings(publish_timeout_s=publish_timeout_s))


@asynccontextmanager
async def _pipeline(settings: Settings, dsn: str):
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker_url, acks="all", max_request_size=PRODUCER_LIMIT,
                                request_timeout_ms=5000)
    await producer.start()

    async def publish(topic, key, value, headers):
        return await producer.send(topic, value, key=key, headers=list(headers))

    sink = EventSink(dsn, [TABLE_SPECS["sales"]], retry_max_s=10)
    rule = SaleOutlierRule(multiple=3.0, window=timedelta(days=7), min_history=5)
    try:
        yield BatchPipeline("sales", settings, sink, build_metrics(CollectorRegistry()), publish, rule=rule)
    finally:
        await sink.close()
        await producer.stop()


def _pending(dsn: str, table: str, where: str, arg) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM {table} WHERE published_at IS NULL AND {where}", (arg,)).fetchone()[0]


async def test_a_dead_letter_over_the_producer_limit_is_kept_whole_and_sent_bounded(broker, any_dsn) -> None:
    """A 1.2 MB message (refused as oversized) became a >1 MB dead letter that
    the producer refused after the commit: a crash loop. Now the table keeps
    all of it and the topic a bounded copy that names its full size."""
    dsn = any_dsn[0]
    settings = _settings(broker, dsn)
    ensure_topics(broker, settings.topics, 1, include_outputs=True)
    big = b'{"event_id": "' + b"x" * 1_200_000 + b'"}'
    ok = _sale(f"outbox-big-{uuid.uuid4().hex[:8]}", 0, "1")
    messages = [IncomingMessage(settings.topics.sales, 0, 0, 0.0, b"k", big)] + _messages(
        settings.topics.sales, [ok], first_offset=1)
    async with _pipeline(settings, dsn) as pipeline:
        out = await pipeline.process(messages)
    assert (out.stored, out.deadlettered) == (1, 1)
    with psycopg.connect(dsn) as conn:
        value, published = conn.execute(
            "SELECT value, published_at IS NOT NULL FROM deadletters WHERE topic = %s", (settings.topics.sales,)
        ).fetchone()
    assert bytes(value) == big and published
    (rec,), = (await asyncio.to_thread(_read_topic, broker, settings.topics.deadletter)).values()
    assert len(rec.value) < PRODUCER_LIMIT
    letter = msgspec.json.decode(rec.value, type=DeadLetterMessage)
    assert (letter.reason, letter.offset, letter.value_bytes, letter.value_truncated) == ("oversized", 0, len(big), True)
    assert letter.value == big[:DEADLETTER_VALUE_MAX]
    assert dict(rec.headers)["x-source-offset"] == b"0"


async def test_a_broker_that_does_not_answer_parks_the_outbox_without_holding_locks(tmp_path, any_dsn) -> None:
    """With the broker gone, the batch is stored and returns within the
    publish limit; its alert and dead letter stay pending (parked, counted)
    and no row lock is held meanwhile; once the broker is back a flush sends
    them, the alert keyed by its id."""
    dsn = any_dsn[0]
    stack = Stack(Settings(broker_url=f"127.0.0.1:{free_port()}", database_url=ADMIN_DSN, data_dir=tmp_path))
    stack.up(timeout=60)
    try:
        settings = _settings(stack.settings.broker_url, dsn, publish_timeout_s=1.0)
        ensure_topics(settings.broker_url, settings.topics, 1, include_outputs=True)
        collection = f"outbox-park-{uuid.uuid4().hex[:8]}"
        sales = [_sale(collection, i, "1") for i in range(6)] + [_sale(collection, 6, "10")]
        messages = _messages(settings.topics.sales, sales) + [
            IncomingMessage(settings.topics.sales, 0, 7, 0.0, None, b"not json")]
        async with _pipeline(settings, dsn) as pipeline:
            stack.down(services=("broker",))
            locks_seen: list[int] = []

            async def watch_locks() -> None:
                while True:
                    await asyncio.sleep(0.2)
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        # NOWAIT fails at once if anyone holds a row lock on them.
                        conn.execute("SELECT 1 FROM alerts WHERE collection = %s FOR UPDATE NOWAIT", (collection,))
                        conn.execute("SELECT 1 FROM deadletters WHERE topic = %s FOR UPDATE NOWAIT",
                                     (settings.topics.sales,))
                        locks_seen.append(1)

            watcher = asyncio.ensure_future(watch_locks())
            started = time.monotonic()
            out = await pipeline.process(messages)
            took = time.monotonic() - started
            watcher.cancel()
            assert not watcher.done() or watcher.cancelled(), watcher.exception()
            parked = pipeline.metrics.registry.get_sample_value("artwatch_streams_outbox_parked_total",
                                                                {"table": "alerts"})
            assert (out.stored, out.deadlettered, out.alerts) == (7, 1, [])
            assert took < 30, f"the batch waited {took:.0f}s on a broker that is gone"
            assert locks_seen, "the lock watcher never ran while the outbox waited"
            assert parked == 1
            assert _pending(dsn, "alerts", "collection = %s", collection) == 1
            assert _pending(dsn, "deadletters", "topic = %s", settings.topics.sales) == 1

            stack.up(timeout=60)
            ensure_topics(settings.broker_url, settings.topics, 1, include_outputs=True)
            with psycopg.connect(dsn, autocommit=True) as conn:  # let the lease run out instead of waiting 60 s
                conn.execute("UPDATE alerts SET claimed_until = now() WHERE collection = %s", (collection,))
                conn.execute("UPDATE deadletters SET claimed_until = now() WHERE topic = %s", (settings.topics.sales,))
            more = [_sale(collection, 7, "10")]  # an alert right after the park does not wait on the broker again
            started = time.monotonic()
            out = await pipeline.process(_messages(settings.topics.sales, more, first_offset=8))
            assert time.monotonic() - started < 1.0 and out.alerts == []
            sent = await pipeline.outbox.flush(force=True)
        assert [a.collection for a in sent.alerts] == [collection] * 2 and sent.deadletters >= 1
        assert _pending(dsn, "alerts", "collection = %s", collection) == 0
        assert _pending(dsn, "deadletters", "topic = %s", settings.topics.sales) == 0
        (recs,) = (await asyncio.to_thread(_read_topic, settings.broker_url, settings.topics.alerts)).values()
        assert [r.key for r in recs] == [a.alert_id.encode() for a in sent.alerts]
    finally:
        stack.down()


async def test_concurrent_flushes_send_each_pending_alert_once(broker, any_dsn) -> None:
    """Workers flush the same tables (after a batch, at start, on a timer):
    claims keep two flushes from sending the same row."""
    dsn = any_dsn[0]
    settings = _settings(broker, dsn)
    ensure_topics(broker, settings.topics, 1, include_outputs=True)
    collection = f"outbox-race-{uuid.uuid4().hex[:8]}"
    alerts = [Alert(alert_id=f"{collection}-{i}", ts=_sale(collection, i, "1").ts, kind="sale_outlier",
                    severity="warning", subject=str(i), collection=collection, evidence={"i": i}, synthetic=True)
              for i in range(2500)]  # more than one claim round
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO alerts (alert_id, ts, kind, severity, subject, collection, evidence, synthetic)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [(a.alert_id, a.ts, a.kind, a.severity, a.subject, a.collection,
                  psycopg.types.json.Jsonb(a.evidence), a.synthetic) for a in alerts])
    async with _pipeline(settings, dsn) as one, _pipeline(settings, dsn) as two:
        first, second = await asyncio.gather(one.outbox.flush(), two.outbox.flush())
    mine = [a for a in first.alerts + second.alerts if a.collection == collection]
    assert sorted(a.alert_id for a in mine) == sorted(a.alert_id for a in alerts)
    on_topic = [r for recs in (await asyncio.to_thread(_read_topic, broker, settings.topics.alerts)).values()
                for r in recs]
    ids = [r.key.decode() for r in on_topic if r.key.decode().startswith(collection)]
    assert len(ids) == len(set(ids)) == len(alerts)
    assert _pending(dsn, "alerts", "collection = %s", collection) == 0


def test_outbox_refuses_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        Outbox(None, None, TopicNames(), build_metrics(CollectorRegistry()), timeout_s=0)  # type: ignore[arg-type]

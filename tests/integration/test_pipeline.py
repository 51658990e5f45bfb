"""streams.pipeline.BatchPipeline driven directly, on the real database and broker.

The worker tests (test_ingest) cover the pipeline through Faust; these reach
the paths a worker run cannot force on cue: a connection lost inside the
transaction after the alerts were written, and a rule that starts cold and
must learn its window from the database.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from alerts.alert import Alert
from alerts.kinds.sale_outlier import SaleOutlierRule
from infra.db.sink import EventSink
from infra.metrics import build_metrics
from infra.settings import Settings, TopicNames
from streams.pipeline import BatchPipeline, IncomingMessage
from streams.records import Sale
from streams.replay.publisher import ensure_topics
from streams.storage import TABLE_SPECS
from tests.integration.test_ingest import _read_topic

pytestmark = pytest.mark.integration

T0 = datetime(2021, 3, 1, 12, 0, tzinfo=timezone.utc)


def _sale(collection: str, i: int, price: str) -> Sale:
    return Sale(event_id=f"{collection}-{i}", ts=T0 + timedelta(hours=i), collection=collection,
                item_id=str(i), buyer="0xb", seller="0xs", price=Decimal(price), currency="ETH",
                synthetic=True, source="test-pipeline")


def _messages(topic: str, sales: list[Sale], first_offset: int = 0) -> list[IncomingMessage]:
    return [IncomingMessage(topic, 0, first_offset + i, s.ts.timestamp(), s.item_id.encode(), msgspec.json.encode(s))
            for i, s in enumerate(sales)]


@asynccontextmanager
async def _pipeline(settings: Settings, dsn: str):
    """A sales pipeline with its own sink, rule, metrics and a real producer."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker_url, acks="all")
    await producer.start()

    async def publish(topic, key, value, headers):
        return await producer.send(topic, value, key=key, headers=list(headers))

    metrics = build_metrics(CollectorRegistry())
    retries: list[BaseException] = []
    sink = EventSink(dsn, [TABLE_SPECS["sales"]], retry_max_s=10, on_retry=retries.append)
    rule = SaleOutlierRule(multiple=3.0, window=timedelta(days=7), min_history=5)
    try:
        yield BatchPipeline("sales", settings, sink, metrics, publish, rule=rule), retries
    finally:
        await sink.close()
        await producer.stop()


@pytest.fixture
def settings(broker, any_dsn) -> Settings:
    run = uuid.uuid4().hex[:8]
    names = {k: f"test-pipe-{k}-{run}" for k in ("listings", "bids", "sales", "images", "alerts", "deadletter")}
    s = Settings(broker_url=broker, database_url=any_dsn[0], topics=TopicNames(**names))
    ensure_topics(broker, s.topics, 1, include_outputs=True)
    return s


def _alert_rows(dsn: str, collection: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT alert_id, published_at IS NOT NULL, evidence FROM alerts WHERE collection = %s", (collection,)
        ).fetchall()


async def test_a_connection_lost_after_the_alerts_were_written_keeps_them(settings, any_dsn) -> None:
    """The backend dies inside the batch's transaction, right after its alert
    row went in: the retried transaction must store the events and the alert
    once, and the alert must reach the topic once."""
    dsn = any_dsn[0]
    collection = f"pipe-kill-{uuid.uuid4().hex[:8]}"
    sales = [_sale(collection, i, "1") for i in range(6)] + [_sale(collection, 6, "10")]
    seq, fn = f"kill_{collection}".replace("-", "_"), f"kill_fn_{collection}".replace("-", "_")
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A sequence, not a table: nextval survives the rollback, so only the first attempt dies.
        conn.execute(f"CREATE SEQUENCE {seq}")
        conn.execute(
            f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF NEW.collection = '{collection}' AND nextval('{seq}') = 1 THEN"
            "   PERFORM pg_terminate_backend(pg_backend_pid()); END IF; RETURN NULL; END $$"
        )
        conn.execute(f"CREATE TRIGGER {fn} AFTER INSERT ON alerts FOR EACH ROW EXECUTE FUNCTION {fn}()")
    try:
        async with _pipeline(settings, dsn) as (pipeline, retries):
            out = await pipeline.process(_messages(settings.topics.sales, sales))
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TRIGGER {fn} ON alerts")
            conn.execute(f"DROP FUNCTION {fn}()")
            conn.execute(f"DROP SEQUENCE {seq}")

    assert len(retries) == 1 and isinstance(retries[0], psycopg.OperationalError), retries
    assert (out.received, out.stored, out.duplicates) == (7, 7, 0)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM sales WHERE collection = %s", (collection,)).fetchone()[0] == 7
        assert conn.execute(
            "SELECT sum(n) FROM rollup_1h WHERE collection = %s", (collection,)
        ).fetchone()[0] == 7
    rows = _alert_rows(dsn, collection)
    assert len(rows) == 1 and rows[0][1], rows
    assert rows[0][2]["event_id"] == f"{collection}-6"
    assert [a.alert_id for a in out.alerts] == [rows[0][0]]
    read = await asyncio.to_thread(_read_topic, settings.broker_url, settings.topics.alerts)
    on_topic = [msgspec.json.decode(r.value, type=Alert) for recs in read.values() for r in recs]
    assert [a.alert_id for a in on_topic] == [rows[0][0]]


async def test_a_cold_rule_learns_its_window_from_the_database(settings, any_dsn) -> None:
    """A restarted worker (fresh rule memory) judges a sale against the history
    the previous one stored."""
    dsn = any_dsn[0]
    collection = f"pipe-warm-{uuid.uuid4().hex[:8]}"
    history = [_sale(collection, i, "2") for i in range(6)]
    async with _pipeline(settings, dsn) as (first, _):
        out = await first.process(_messages(settings.topics.sales, history))
    assert (out.stored, out.alerts) == (6, [])

    async with _pipeline(settings, dsn) as (second, _):
        assert not second.rule.knows(collection, "ETH")
        out = await second.process(_messages(settings.topics.sales, [_sale(collection, 6, "7")], first_offset=6))
        assert second.rule.knows(collection, "ETH")
    assert out.stored == 1 and len(out.alerts) == 1
    evidence = out.alerts[0].evidence
    assert (Decimal(evidence["median"]), evidence["window_sales"], evidence["ratio"]) == (2, 6, "3.5")
    assert [r[0] for r in _alert_rows(dsn, collection)] == [out.alerts[0].alert_id]


async def test_a_sale_older_than_one_already_scored_is_counted_late(settings, any_dsn, caplog) -> None:
    caplog.set_level(logging.INFO, logger="streams.pipeline")
    collection = f"pipe-late-{uuid.uuid4().hex[:8]}"
    topic = settings.topics.sales
    async with _pipeline(settings, any_dsn[0]) as (pipeline, _):
        await pipeline.process(_messages(topic, [_sale(collection, i, "1") for i in (0, 1, 2, 3, 4, 9)]))
        # hour 6 arrives after hour 9 was learnt (another partition lagging)
        out = await pipeline.process(_messages(topic, [_sale(collection, 6, "5")], first_offset=6))
        late = pipeline.metrics.registry.get_sample_value("artwatch_alerts_late_sales_total", {"kind": "sale_outlier"})
    assert late == 1
    assert "1 of 1 sales arrived later than the rule's grace period" in caplog.text
    assert out.stored == 1 and len(out.alerts) == 1
    assert out.alerts[0].evidence["late_by_s"] == 3 * 3600


async def test_extreme_prices_alert_instead_of_failing_the_batch(settings, any_dsn) -> None:
    """1 wei against 1e20 ETH (both valid at the edge): a ratio of 1e38 needs ~40 digits."""
    collection = f"pipe-extreme-{uuid.uuid4().hex[:8]}"
    sales = [_sale(collection, i, "0.000000000000000001") for i in range(5)] + [_sale(collection, 5, "1e20")]
    async with _pipeline(settings, any_dsn[0]) as (pipeline, _):
        out = await pipeline.process(_messages(settings.topics.sales, sales))
    assert out.stored == 6 and len(out.alerts) == 1
    assert out.alerts[0].evidence["ratio"] == "1" + "0" * 38


class _FaultyRule(SaleOutlierRule):
    """The real rule, failing on one sale (a bug the stream must survive)."""

    def observe(self, sale):
        if sale.event_id.endswith("-3"):
            raise RuntimeError("rule bug")
        return super().observe(sale)


async def test_a_rule_failure_stores_the_sale_unscored_and_the_batch_goes_on(settings, any_dsn, caplog) -> None:
    collection = f"pipe-faulty-{uuid.uuid4().hex[:8]}"
    sales = [_sale(collection, i, "1") for i in range(7)] + [_sale(collection, 7, "9")]
    async with _pipeline(settings, any_dsn[0]) as (pipeline, _):
        pipeline.rule = _FaultyRule(multiple=3.0, window=timedelta(days=7), min_history=5)
        out = await pipeline.process(_messages(settings.topics.sales, sales))
        errors = pipeline.metrics.registry.get_sample_value("artwatch_alerts_rule_errors_total", {"kind": "sale_outlier"})
    assert errors == 1 and f"could not score sale {collection}-3" in caplog.text
    assert out.stored == 8 and [a.evidence["event_id"] for a in out.alerts] == [f"{collection}-7"]
    with psycopg.connect(any_dsn[0]) as conn:
        assert conn.execute("SELECT count(*) FROM sales WHERE collection = %s", (collection,)).fetchone()[0] == 8


async def test_a_sale_the_database_refuses_is_dead_lettered_and_forgotten_by_the_rule(settings, any_dsn) -> None:
    """0E-20000 passes the edge (it is zero) but cannot be sent as numeric: the
    rest of the batch is stored, and the rule's window holds only stored sales."""
    collection = f"pipe-refused-{uuid.uuid4().hex[:8]}"
    sales = [_sale(collection, i, "1") for i in range(6)]
    sales[2] = msgspec.structs.replace(sales[2], price=Decimal("0E-20000"))
    async with _pipeline(settings, any_dsn[0]) as (pipeline, _):
        out = await pipeline.process(_messages(settings.topics.sales, sales))
        window = pipeline.rule._windows[(collection, "ETH", True)]  # the synthetic window (test sales are synthetic)
    assert (out.stored, out.deadlettered) == (5, 1)
    assert window.ids == {s.event_id for s in sales} - {sales[2].event_id}
    with psycopg.connect(any_dsn[0]) as conn:
        (reason, offset), = conn.execute(
            'SELECT reason, "offset" FROM deadletters WHERE topic = %s', (settings.topics.sales,)).fetchall()
    assert (reason, offset) == ("rejected_by_database", 2)


async def test_an_error_text_quoting_a_nul_or_a_newline_is_stored_escaped(settings, any_dsn) -> None:
    """msgspec quotes an unknown field's name in its error: a name holding NUL
    made the dead letter itself unstorable (text cannot hold NUL), which
    failed the batch on every retry (a crash loop of all four topics)."""
    collection = f"pipe-nul-{uuid.uuid4().hex[:8]}"
    good = _sale(collection, 0, "1")
    poisoned = msgspec.json.encode(good)[:-1] + b',"\\u0000\\nforged log line":1}'
    messages = [IncomingMessage(settings.topics.sales, 0, 0, 0.0, None, poisoned)] + _messages(
        settings.topics.sales, [_sale(collection, 1, "1")], first_offset=1)
    async with _pipeline(settings, any_dsn[0]) as (pipeline, _):
        out = await pipeline.process(messages)
    assert (out.stored, out.deadlettered) == (1, 1)
    with psycopg.connect(any_dsn[0]) as conn:
        (reason, error), = conn.execute(
            'SELECT reason, error FROM deadletters WHERE topic = %s', (settings.topics.sales,)).fetchall()
    assert reason == "unknown_field"
    assert "\\u0000\\u000aforged log line" in error and "\x00" not in error and "\n" not in error

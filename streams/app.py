"""The Faust app, built from settings: the ingest of the four market topics
(the batch engine service, or one Faust agent per topic), the output topics
and the alert outbox.

``create_app(settings)`` has no import-time side effects (no module-level app,
no loop pinned at import). Topics carry raw bytes; the pipeline decodes whole
batches itself (see ``streams.records``).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Callable, Optional

import faust

from alerts.kinds.sale_outlier import SaleOutlierRule
from infra.db.failures import classify, describe
from infra.db.sink import EventSink
from infra.health import DEGRADED, FAILING, Health
from infra.metrics import Metrics, build_metrics
from infra.settings import Settings
from streams.batch_ingest import BatchIngest, wait_out
from streams.outbox import Outbox
from streams.pipeline import BatchPipeline, IncomingMessage
from streams.storage import TABLE_SPECS

__all__ = ["create_app", "AGENT_KINDS"]

log = logging.getLogger(__name__)

AGENT_KINDS = ("sales", "listings", "bids", "images")


def _die(reason: str, exc: BaseException) -> None:
    """Stop the process without committing offsets.

    Only for what waiting cannot fix (transient failures are waited out, see
    ``streams.batch_ingest.wait_out``): a deterministic database error (disk
    full, a missing table or privilege) is reported in one line, anything
    else (a bug) with its traceback. faust's ``take()`` acks its buffered
    events in a ``finally`` when the agent generator is closed, so letting a
    failed batch propagate could commit offsets of rows that were never
    stored. Exiting here keeps the last committed offset before the failed
    batch; the restarted worker replays it.
    """
    failure = classify(exc)
    if failure.sqlstate is not None:
        log.critical("stopping: %s: database error %s; exiting without committing offsets", reason, describe(exc))
    else:
        log.critical("stopping: %s: %r; exiting without committing offsets", reason, exc, exc_info=exc)
    logging.shutdown()
    os._exit(70)


def create_app(settings: Settings, metrics: Optional[Metrics] = None, health: Optional[Health] = None) -> faust.App:
    """Build the worker's Faust app.

    Parameters
    ----------
    settings
        The run's settings.
    metrics
        Where to count; a fresh registry when None.
    health
        What /health reports (``infra.health``); a fresh one when None.
    """
    metrics = metrics or build_metrics()
    health = health if health is not None else Health(metrics.health)

    def fatal(reason: str, exc: BaseException) -> None:
        health.set("fatal", FAILING, f"{reason}: {describe(exc)}")  # seen by a scrape in the last moment
        _die(reason, exc)

    def on_retry(kind: str, exc: BaseException) -> None:
        failure = classify(exc)
        metrics.sink_retries.labels(table=kind, reason=failure.reason).inc()
        # Each sink speaks for itself: one recovering must not clear another still retrying.
        health.set("database", DEGRADED, f"{kind}: retrying ({describe(exc)})", source=kind)

    def on_recovered(kind: str) -> None:
        health.clear("database", source=kind)

    dsn = settings.dsn()
    w = settings.worker
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.broker_url}",
        store="memory://",
        datadir=str(settings.data_dir / "faust" / settings.app_id),  # not {app_id}-data in the working directory
        autodiscover=False,
        topic_partitions=w.partitions,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_port=w.web_port,
        web_bind="127.0.0.1",
        stream_buffer_maxsize=max(4096, 2 * w.batch_size),
        broker_commit_interval=1.0,
        broker_session_timeout=w.session_timeout_s,
        broker_heartbeat_interval=w.session_timeout_s / 3,
        broker_max_poll_records=max(500, w.batch_size),
    )

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    topics = settings.topics
    outputs = [raw_topic(name) for name in (topics.alerts, topics.deadletter)]

    async def publish(topic: str, key, value: bytes, headers):
        # The app's producer directly: Topic.send adds Faust's per-message
        # bookkeeping (FutureMessage, callbacks), measurable at alert rates.
        return await app.producer.send(topic, key, value, partition=None, timestamp=None, headers=list(headers))

    rule = SaleOutlierRule(
        multiple=settings.rules.outlier_multiple,
        window=timedelta(days=settings.rules.outlier_window_days),
        min_history=settings.rules.outlier_min_history,
        late_grace=timedelta(seconds=settings.rules.outlier_late_grace_s),
    )

    def pipeline(kind: str, outbox: Optional[Outbox] = None) -> BatchPipeline:
        sink = EventSink(
            dsn,
            [TABLE_SPECS[kind]],
            retry_max_s=w.sink_retry_max_s,
            on_retry=lambda exc: on_retry(kind, exc),
            # One more than the batches in flight: the rule's warm-up reads too.
            connections=w.max_in_flight + 1,
            connect_timeout_s=w.db_connect_timeout_s,
            statement_timeout_s=w.db_statement_timeout_s,
            lock_timeout_s=w.db_lock_timeout_s,
            backoff_max_s=w.sink_retry_backoff_max_s,
            on_recovered=lambda: on_recovered(kind),
        )
        return BatchPipeline(kind, settings, sink, metrics, publish, rule=rule, outbox=outbox)

    sales = pipeline("sales")  # its outbox serves all: one park state, flushes in turn
    pipelines = {topics.sales: sales}
    pipelines.update({getattr(topics, kind): pipeline(kind, sales.outbox) for kind in AGENT_KINDS if kind != "sales"})

    @app.task
    async def declare_outputs_and_resend_alerts() -> None:
        try:
            for topic in outputs:  # brokers may not auto-create topics
                await topic.maybe_declare()
            flushed = await wait_out("publishing pending alerts", lambda: sales.outbox.flush(force=True), health,
                                     w.sink_retry_backoff_max_s)
            resent = flushed.alerts
        except Exception as exc:  # noqa: BLE001 - see _die
            fatal("declaring output topics or publishing pending alerts failed", exc)
        if w.engine == "agents":  # the batch engine says so itself, once it fetches
            health.clear("start")
        for a in resent:
            metrics.alerts_emitted.labels(kind=a.kind).inc()
        if resent:
            log.info("re-sent %d alerts left unpublished by an earlier run", len(resent))

    @app.timer(interval=30.0)
    async def resend_parked() -> None:
        """Alerts and dead letters the broker did not acknowledge are parked in
        their tables; once their lease runs out, this sends them again."""
        try:
            resent = await sales.outbox.flush(force=True)
        except Exception as exc:  # noqa: BLE001 - the next tick tries again; ingest is not affected
            # A traceback only for what is not an outage (every 30 s through a long one would be noise).
            log.warning("re-sending parked outbox rows failed (%s); trying again in 30 s", describe(exc),
                        exc_info=not classify(exc).transient)
            return
        for a in resent.alerts:
            metrics.alerts_emitted.labels(kind=a.kind).inc()

    if w.engine == "batch":
        ingest = BatchIngest(settings, pipelines, metrics, fatal, health, loop=app.loop, beacon=app.beacon)
        app._extra_services.append(ingest)  # faust's @app.service, for an instance
    else:
        for name, p in pipelines.items():
            _add_ingest_agent(app, raw_topic(name), p, settings, health, fatal)
        _add_lag_timer(app, metrics, set(pipelines))
    return app


def _add_lag_timer(app: faust.App, metrics: Metrics, topics: set[str]) -> None:
    @app.timer(interval=5.0)
    async def report_lag() -> None:
        consumer = app.consumer
        read = getattr(consumer, "_read_offset", {})  # faust keeps no public read position
        assigned = {tp for tp in consumer.assignment() if tp.topic in topics}  # not faust's own (assignor) topic
        metrics.assigned_partitions.set(len(assigned))
        for tp in assigned:
            high = consumer.highwater(tp)
            if high is None:
                continue
            pos = read.get(tp)
            lag = high - (pos + 1 if pos is not None else 0)
            metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, lag))


async def _prepare_once_store_waiting(pipeline: BatchPipeline, batch: list[IncomingMessage], health: Health,
                                      backoff_max_s: float) -> None:
    """``prepare`` the batch once, then wait out ``store`` (as the batch engine
    does). ``prepare`` teaches the alert rule the batch's sales: run again
    after a store outlasting the sink's retries, it would find them seen and
    score none, and they would be stored without their alerts. Its own
    database read (the rule's warm-up) fails before the rule learns anything,
    so that part is waited out on its own."""
    prepared = await wait_out(f"preparing a batch of {pipeline.kind}", lambda: pipeline.prepare(batch), health,
                              backoff_max_s)
    await wait_out(f"storing a batch of {pipeline.kind}", lambda: pipeline.store(prepared), health, backoff_max_s)


def _add_ingest_agent(app: faust.App, topic, pipeline: BatchPipeline, settings: Settings, health: Health,
                      fatal: Callable[[str, BaseException], None]) -> None:
    """The Faust agent engine: same pipeline, batches from ``take_events``;
    outages are waited out in the agent (Faust's flow control stops fetching
    once its buffers are full; no partition pausing here)."""
    w = settings.worker

    async def ingest(stream) -> None:
        async for events in stream.take_events(w.batch_size, within=w.batch_within_s):
            batch = [
                IncomingMessage(m.topic, m.partition, m.offset, m.timestamp, m.key, m.value)
                for m in (e.message for e in events)
            ]
            try:
                await _prepare_once_store_waiting(pipeline, batch, health, w.sink_retry_backoff_max_s)
            except Exception as exc:  # noqa: BLE001 - see _die
                fatal(f"{pipeline.kind} batch at {batch[0].topic}[{batch[0].partition}]@{batch[0].offset} failed", exc)

    ingest.__name__ = ingest.__qualname__ = f"ingest_{pipeline.kind}"
    app.agent(topic, name=f"artwatch.ingest_{pipeline.kind}")(ingest)

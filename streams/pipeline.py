"""One batch of one input topic: validate, store, roll up, alert, dead-letter.

Kept free of Faust so it can be driven by the agent, a test or a benchmark.
Order per batch (the quix order): one database transaction (events, rollups,
alerts, dead letters) -> the outbox publishes the new alerts and dead letters
(streams/outbox.py; a broker that does not acknowledge in time parks them for
later, it never fails the batch) -> return, after which the engine commits the
offsets. A crash anywhere before the return replays the batch, which the
idempotent writes absorb.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple, Callable, Optional, Sequence

import numpy as np
import psycopg

from alerts.alert import Alert
from alerts.kinds.sale_outlier import KIND, SaleOutlierRule
from infra.db.sink import ROW_REJECTED, EventSink
from infra.metrics import Metrics
from infra.settings import Settings
from streams.outbox import Outbox, Publish
from streams.records import DeadLetter, Event, Sale
from streams.storage import row_builder
from streams.validation import Rejected, Validator

__all__ = ["IncomingMessage", "BatchPipeline", "BatchOutcome", "PreparedBatch", "Publish"]

log = logging.getLogger(__name__)


class IncomingMessage(NamedTuple):
    """One consumed message (a NamedTuple: built per event, so it must be cheap)."""

    topic: str
    partition: int
    offset: int
    timestamp: float  # Kafka record timestamp, seconds since epoch
    key: Optional[bytes]
    value: Optional[bytes]


@dataclass
class BatchOutcome:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    deadlettered: int = 0
    alerts: list[Alert] = field(default_factory=list)


@dataclass
class PreparedBatch:
    topic: str
    received: int
    records: list[Event]
    rows: list[tuple]
    sources: list  # the message each record came from (same order)
    dead: list[DeadLetter]
    alerts: list[Alert]
    ts_scale: float = 1.0  # message timestamp * ts_scale = seconds


class BatchPipeline:
    """Process batches of one record kind (``sales``, ``listings``, ...)."""

    def __init__(
        self,
        kind: str,
        settings: Settings,
        sink: EventSink,
        metrics: Metrics,
        publish: Publish,
        rule: Optional[SaleOutlierRule] = None,
        clock: Callable[[], float] = time.time,
        outbox: Optional[Outbox] = None,
    ) -> None:
        self.kind = kind
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.publish = publish
        self.rule = rule if kind == "sales" else None
        self.clock = clock
        self.validator = Validator(kind, settings.validation, clock)
        # Shared by a worker's pipelines (their flushes then take turns and a
        # park makes them all stand aside); one of its own otherwise.
        self.outbox = outbox or Outbox(sink, publish, settings.topics, metrics,
                                       timeout_s=settings.worker.publish_timeout_s)
        self._row = row_builder(kind)

    async def process(self, messages: Sequence[IncomingMessage]) -> BatchOutcome:
        """Validate and store one batch (``prepare`` then ``store``)."""
        return await self.store(await self.prepare(messages))

    async def prepare(self, messages: Sequence[IncomingMessage], ts_scale: float = 1.0) -> "PreparedBatch":
        """Decode, validate and score the alert rule, in batch order.

        The batch engine runs this for the next fetch while the previous
        batch's transaction is still running; scoring here (not inside the
        transaction) also means a retried transaction keeps its alerts.

        ``messages`` may be anything shaped like IncomingMessage (aiokafka's
        records are passed as they are, with ``ts_scale=0.001`` for their
        millisecond timestamps)."""
        topic = messages[0].topic if messages else self.kind
        self.metrics.events_in.labels(topic=topic).inc(len(messages))
        records, sources, dead = [], [], []
        decode = self.validator.decode
        not_after = self.validator.not_after()
        for m in messages:
            try:
                records.append(decode(m.value, not_after))
                sources.append(m)
            except Rejected as exc:
                dead.append(self._deadletter(m, exc))
                log.warning("deadletter %s[%s]@%s: %s", m.topic, m.partition, m.offset, exc)
        rows = list(map(self._row, records))
        alerts = await self._score(records) if self.rule is not None and records else []
        return PreparedBatch(topic, len(messages), records, rows, sources, dead, alerts, ts_scale)

    async def store(self, batch: "PreparedBatch") -> BatchOutcome:
        """The I/O half: one transaction, then dead letters and alerts out."""
        try:
            result = await self._write(batch)
        except ROW_REJECTED as exc:
            # A record the edge let through but the database refuses would
            # fail this batch forever (a poison message): find it, dead-letter
            # it, store the rest.
            refused = self._set_aside_rejected(batch, await self.sink.rejected_rows(self.kind, batch.rows))
            if not refused:
                raise
            log.warning("%s: the database refused %d record(s) of a batch (%s); dead-lettered, storing the rest",
                        batch.topic, refused, exc)
            result = await self._write(batch)
        committed = self.clock()
        records, dead, new_alerts = batch.records, batch.dead, batch.alerts
        out = BatchOutcome(
            received=batch.received, stored=len(result.new_keys),
            duplicates=len(records) - len(result.new_keys), deadlettered=len(dead),
        )
        for d in dead:
            self.metrics.deadletters.labels(topic=d.topic, reason=d.reason).inc()
        if dead or new_alerts:
            try:
                sent = await self.outbox.flush()
            except Exception:  # noqa: BLE001 - the batch is committed: failing it now would only replay it
                # forever; its rows stay pending and the worker's timer sends them.
                self.metrics.outbox_errors.labels(topic=batch.topic).inc()
                log.exception("%s: publishing the batch's alerts and dead letters failed; they stay pending",
                              batch.topic)
            else:
                out.alerts = sent.alerts
                for a in out.alerts:
                    self.metrics.alerts_emitted.labels(kind=a.kind).inc()

        m, topic = self.metrics, batch.topic
        m.events_stored.labels(topic=topic).inc(out.stored)
        m.events_duplicate.labels(topic=topic).inc(out.duplicates)
        m.sink_batch_rows.labels(table=self.kind).observe(len(records))
        m.sink_batch_seconds.labels(table=self.kind).observe(result.seconds)
        stamps = np.fromiter((s.timestamp for s in batch.sources), float, len(batch.sources))
        m.event_to_stored.labels(topic=topic).observe_many(committed - stamps * batch.ts_scale)
        m.last_commit.set(committed)
        m.event_time_to_stored.labels(topic=topic).observe_many([committed - r.ts.timestamp() for r in records])
        return out

    async def _write(self, batch: "PreparedBatch"):
        dead, new_alerts = batch.dead, batch.alerts
        aside: list = [(), [], new_alerts]  # the last attempt's conflicts, their dead letters, the alerts kept

        async def before_commit(conn: psycopg.AsyncConnection, new_keys: frozenset, conflicts: tuple) -> None:
            # Conflicting duplicates (an event_id kept with another ts or
            # content; infra.db.sink.Conflict) are dead letters of this batch,
            # in its transaction; alerts scored from them are dropped.
            more = [self._deadletter(batch.sources[c.index], Rejected("conflicting_duplicate", c.describe()))
                    for c in conflicts]
            alerts = _alerts_of_kept_versions(new_alerts, batch.records, conflicts) if conflicts else new_alerts
            aside[:] = [conflicts, more, alerts]
            if dead or more:
                await _insert_deadletters(conn, dead + more)
            if alerts:
                await _insert_alerts(conn, alerts)

        result = await self.sink.write(self.kind, batch.rows, before_commit)
        conflicts, more, batch.alerts = aside
        if conflicts:
            batch.dead.extend(more)
            if self.rule is not None:  # its windows must hold the kept versions only
                for c in conflicts:
                    if not c.differs or _WINDOW_FACTS & set(c.differs):
                        self.rule.forget(batch.records[c.index])  # only this version's own entry
                    if c.kept_index is not None:
                        # scored in time order, the kept version may have been skipped as already seen
                        self.rule.learn(batch.records[c.kept_index])
            bad = {c.index for c in conflicts}
            keep = [i for i in range(len(batch.records)) if i not in bad]
            batch.records = [batch.records[i] for i in keep]
            batch.rows = [batch.rows[i] for i in keep]
            batch.sources = [batch.sources[i] for i in keep]
        return result

    def _set_aside_rejected(self, batch: "PreparedBatch", rejected: list[tuple[int, str]]) -> int:
        """Move the rows the database refused (and their alerts) to the batch's
        dead letters; returns how many."""
        bad = {i for i, _ in rejected}
        for i, error in rejected:
            batch.dead.append(self._deadletter(batch.sources[i], Rejected("rejected_by_database", error)))
        bad_ids = {batch.records[i].event_id for i in bad}
        batch.alerts = [a for a in batch.alerts if a.evidence.get("event_id") not in bad_ids]
        if self.rule is not None:  # its window must hold only what is stored
            for i in bad:
                self.rule.forget(batch.records[i])
        keep = [i for i in range(len(batch.records)) if i not in bad]
        batch.records = [batch.records[i] for i in keep]
        batch.rows = [batch.rows[i] for i in keep]
        batch.sources = [batch.sources[i] for i in keep]
        return len(bad)

    def _deadletter(self, m: IncomingMessage, exc: Rejected) -> DeadLetter:
        return DeadLetter(
            ts=datetime.fromtimestamp(self.clock(), timezone.utc),
            topic=m.topic,
            partition=m.partition,
            offset=m.offset,
            reason=exc.reason,
            error=exc.error[:1000],
            key=m.key,
            value=m.value,  # whole in the table; the topic gets a bounded copy (streams.outbox)
        )

    async def _score(self, sales: list[Sale]) -> list[Alert]:
        """Run the alert rule over the batch in event-time order."""
        rule = self.rule
        assert rule is not None
        ordered = sorted(sales, key=lambda s: (s.ts, s.event_id))
        firsts: dict[tuple[str, str], datetime] = {}
        for s in ordered:
            firsts.setdefault((s.collection, s.currency), s.ts)
        unseen = {key: first for key, first in firsts.items() if not rule.knows(*key)}
        if unseen:  # only after a start or for a new collection: most batches skip the round trip
            # Retried like a write; warming twice is harmless (windows are keyed by event id).
            await self.sink.read("warming the sale-outlier rule", lambda conn: _warm_rule(conn, rule, unseen))
        late_before = rule.late_sales
        alerts = []
        for s in ordered:
            try:
                if a := rule.observe(s):
                    alerts.append(a)
            except Exception:  # noqa: BLE001 - a rule's fault must not stop storing: the sale is kept, unscored
                self.metrics.rule_errors.labels(kind=KIND).inc()
                log.exception("%s could not score sale %s; stored without an alert check", KIND, s.event_id)
        if late := rule.late_sales - late_before:
            self.metrics.late_sales.labels(kind=KIND).inc(late)
            log.info("%d of %d sales arrived later than the rule's grace period; scored against the window as it"
                     " stands (see late_by_s in their alerts)", late, len(ordered))
        return alerts


# What a sale-outlier window / alert says of a sale (column names).
_WINDOW_FACTS = frozenset({"ts", "price", "collection", "currency", "synthetic"})
_ALERT_FACTS = _WINDOW_FACTS | {"item_id"}


def _alerts_of_kept_versions(alerts: list[Alert], records: list, conflicts: tuple) -> list[Alert]:
    """``alerts`` less those scored from a conflicting version of a sale (one
    that differs from the kept version in what its alert would say)."""
    if not alerts:
        return alerts
    gone = {
        (s.event_id, s.ts, str(s.price), s.item_id, s.collection, s.currency, s.synthetic)
        for c in conflicts if not c.differs or _ALERT_FACTS & set(c.differs)
        for s in [records[c.index]]
    }
    return [a for a in alerts if (a.evidence.get("event_id"), a.ts, a.evidence.get("price"), a.subject, a.collection,
                                  a.evidence.get("currency"), a.synthetic) not in gone]


async def _insert_alerts(conn: psycopg.AsyncConnection, alerts: list[Alert]) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO alerts (alert_id, ts, kind, severity, subject, collection, evidence, model_versions, synthetic)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [
                (a.alert_id, a.ts, a.kind, a.severity, a.subject, a.collection,
                 psycopg.types.json.Jsonb(a.evidence), psycopg.types.json.Jsonb(a.model_versions), a.synthetic)
                for a in alerts
            ],
        )


async def _warm_rule(
    conn: psycopg.AsyncConnection, rule: SaleOutlierRule, firsts: dict[tuple[str, str], datetime]
) -> None:
    """Load each (collection, currency) window from the database, up to the batch's first sale of it."""
    for (collection, currency), first in firsts.items():
        cur = await conn.execute(
            "SELECT ts, event_id, price, synthetic FROM sales WHERE collection = %s AND currency = %s"
            " AND ts >= %s AND ts < %s ORDER BY ts",
            (collection, currency, first - rule.window, first),
        )
        rule.warm(collection, currency, await cur.fetchall())


async def _insert_deadletters(conn: psycopg.AsyncConnection, dead: list[DeadLetter]) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            'INSERT INTO deadletters (topic, "partition", "offset", ts, reason, error, key, value)'
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [(d.topic, d.partition, d.offset, d.ts, d.reason, d.error, d.key, d.value) for d in dead],
        )

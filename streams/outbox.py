"""The outbox: rows a batch's transaction stored for the topics (alerts, dead
letters) are published after the commit, and marked published after the
broker acknowledged them.

Nothing here holds a database lock while it waits on the broker: a short
transaction *claims* pending rows with a lease (``claimed_until``), the
messages are sent with a time limit, and another short transaction marks them
published. A publish that fails or times out is retried a few times, then
*parked*: the row stays unpublished and is claimed again when its lease runs
out (the next flush after that: after a batch, at start, or on the worker's
timer), so a broker outage never stops ingest and nothing is dropped. After a
park the flushes that follow each batch stand aside until the lease runs out
(only the timer's forced flush tries), so a broker that times out costs one
batch its wait, not every batch. A crash
between the send and the mark re-sends the row: the topics are at-least-once,
so messages are keyed for dedupe (an alert by its id, a dead letter by its
source position in a header).

Dead letters keep their whole value in the table; the topic gets a bounded
copy (``DEADLETTER_VALUE_MAX`` bytes) with the full size and a reference to
the row, so a dead letter always fits under the producer's request limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Awaitable, Callable, Optional, Sequence

import msgspec
import psycopg

from alerts.alert import Alert
from infra.db.sink import EventSink
from infra.metrics import Metrics
from infra.settings import TopicNames

__all__ = ["Outbox", "FlushResult", "Publish", "DEADLETTER_VALUE_MAX", "DEADLETTER_KEY_MAX", "deadletter_message"]

log = logging.getLogger(__name__)

# await publish(topic, key, value, headers) hands the message to the producer and
# returns its delivery: awaiting that waits for the broker's acknowledgement.
# Split in two so a batch of messages is sent at once and acknowledged together.
Publish = Callable[[str, Optional[bytes], bytes, Sequence[tuple[str, bytes]]], Awaitable[Awaitable[object]]]

# Kafka's default producer request limit is 1,000,000 bytes; base64 grows the
# value by 4/3 and the JSON around it is small (error text <= 1,000 chars).
DEADLETTER_VALUE_MAX = 256 * 1024
DEADLETTER_KEY_MAX = 1024  # a longer original key is replaced by its sha256
_CLAIM_ROWS = 1000  # alerts per claim round trip
# Dead letters per claim: only their first DEADLETTER_VALUE_MAX bytes are read,
# so a claim holds at most ~25 MiB of values however big the stored ones are.
_CLAIM_DEADLETTERS = 100


class DeadLetterMessage(msgspec.Struct, kw_only=True, frozen=True):
    """What the dead-letter topic carries; the ``deadletters`` row (its
    ``topic``, ``partition``, ``offset``) holds the whole value."""

    ts: datetime
    topic: str
    partition: int
    offset: int
    reason: str
    error: str
    key: Optional[bytes]
    value: Optional[bytes]
    value_bytes: int
    value_truncated: bool


def deadletter_message(row: Sequence) -> tuple[Optional[bytes], bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) for the dead-letter topic from a ``deadletters`` row
    ``(topic, partition, offset, ts, reason, error, key, value[, value_bytes])``,
    bounded in size; ``value`` may be a prefix of the stored one when
    ``value_bytes`` gives the stored size.

    Examples
    --------
    >>> from datetime import timezone
    >>> row = ("sales", 0, 7, datetime(2021, 1, 1, tzinfo=timezone.utc), "oversized", "too big", b"k", b"x" * 2_000_000)
    >>> key, value, headers = deadletter_message(row)
    >>> len(value) < 1_000_000, msgspec.json.decode(value)["value_bytes"], dict(headers)["x-source-offset"]
    (True, 2000000, b'7')
    """
    topic, partition, offset, ts, reason, error, key, value = row[:8]
    key = bytes(key) if key is not None else None
    value = bytes(value) if value is not None else None
    # row[8] is octet_length(value), NULL for a message without a value (a
    # tombstone, reason "empty"): then the size is 0, not None (None > int
    # raised TypeError after the commit and crash-looped the worker).
    size = row[8] if len(row) > 8 and row[8] is not None else len(value) if value is not None else 0
    msg = DeadLetterMessage(
        ts=ts, topic=topic, partition=partition, offset=offset, reason=reason, error=error[:1000],
        key=key if key is None or len(key) <= DEADLETTER_KEY_MAX else None,
        value=value[:DEADLETTER_VALUE_MAX] if value is not None else None,
        value_bytes=size, value_truncated=size > DEADLETTER_VALUE_MAX,
    )
    if key is not None and len(key) > DEADLETTER_KEY_MAX:
        key = hashlib.sha256(key).digest()
    headers = [
        ("x-error-class", reason.encode()),
        ("x-source-topic", topic.encode()),
        ("x-source-partition", str(partition).encode()),
        ("x-source-offset", str(offset).encode()),
    ]
    return key, msgspec.json.encode(msg), headers


def _alert_message(a: Alert) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    # Keyed by the alert id: a re-sent alert (crash between send and mark) has
    # the same key, so a consumer or log compaction can drop the repeat.
    return a.alert_id.encode(), msgspec.json.encode(a), [("x-alert-kind", a.kind.encode()),
                                                         ("x-alert-subject", a.subject.encode()[:1024])]


def _backoff(attempt: int) -> float:
    return min(0.5 * 2 ** attempt, 5.0)


@dataclass
class FlushResult:
    alerts: list[Alert] = field(default_factory=list)  # published by this flush
    deadletters: int = 0  # published by this flush
    parked: int = 0  # could not be published; left for a later flush


class Outbox:
    """Publish pending alerts and dead letters; see the module's docstring.

    Parameters
    ----------
    sink
        Database access (its connections, retried reads).
    publish
        Hands a message to the producer (see :data:`Publish`).
    topics
        Where alerts and dead letters go.
    metrics
        Where parked messages are counted.
    timeout_s
        Limit for one send and its acknowledgement.
    attempts
        Sends tried per flush before a message is parked.
    lease_s
        How long a claim keeps other flushes off a row (at least all tries of
        a send and their backoffs, plus 30 s); a parked row is retried once
        it has run out.
    """

    def __init__(
        self, sink: EventSink, publish: Publish, topics: TopicNames, metrics: Metrics,
        timeout_s: float = 30.0, attempts: int = 3, lease_s: float = 60.0,
    ) -> None:
        if timeout_s <= 0 or attempts < 1 or lease_s <= 0:
            raise ValueError("timeout_s and lease_s must be > 0 and attempts >= 1")
        self.sink = sink
        self.publish = publish
        self.topics = topics
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.attempts = attempts
        # A claim must outlast every try of its sends (timeouts and backoffs),
        # or another flush would claim and send the rows still being tried.
        self.lease_s = max(lease_s, attempts * timeout_s + sum(_backoff(a) for a in range(1, attempts)) + 30.0)
        self._lock = asyncio.Lock()  # one flush at a time: the outbox is shared by the pipelines
        self._resume_at = 0.0  # monotonic time before which unforced flushes stand aside

    async def flush(self, force: bool = False) -> FlushResult:
        """Publish every claimable pending row of both tables; unless ``force``,
        nothing while an earlier flush's park is recent (see the module's docstring)."""
        if not force and time.monotonic() < self._resume_at:
            return FlushResult()
        async with self._lock:
            if not force and time.monotonic() < self._resume_at:  # parked while this one waited
                return FlushResult()
            return await self._flush()

    async def _flush(self) -> FlushResult:
        result = FlushResult()
        while True:
            rows = await self.sink.read("claiming pending alerts", self._claim_alerts)
            alerts = [Alert(alert_id=r[0], ts=r[1], kind=r[2], severity=r[3], subject=r[4], collection=r[5],
                            evidence=r[6], model_versions=r[7], synthetic=r[8]) for r in rows]
            sent = await self._send(self.topics.alerts, [_alert_message(a) for a in alerts], "alerts")
            done = [a for a, ok in zip(alerts, sent) if ok]
            if done:
                await self.sink.read("marking alerts published", lambda conn: conn.execute(
                    "UPDATE alerts SET published_at = now(), claimed_until = NULL"
                    " WHERE alert_id = ANY(%s) AND published_at IS NULL", ([a.alert_id for a in done],)))
            result.alerts += done
            result.parked += len(alerts) - len(done)
            if len(rows) < _CLAIM_ROWS or len(done) < len(alerts):
                break
        while True:
            rows = await self.sink.read("claiming pending dead letters", self._claim_deadletters)
            sent = await self._send(self.topics.deadletter, [deadletter_message(r) for r in rows], "deadletters")
            done = [r[:3] for r, ok in zip(rows, sent) if ok]
            if done:
                await self.sink.read("marking dead letters published", lambda conn: conn.execute(
                    'UPDATE deadletters SET published_at = now(), claimed_until = NULL'
                    ' WHERE (topic, "partition", "offset") IN (SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[]))',
                    ([d[0] for d in done], [d[1] for d in done], [d[2] for d in done])))
            result.deadletters += len(done)
            result.parked += len(rows) - len(done)
            if len(rows) < _CLAIM_DEADLETTERS or len(done) < len(rows):
                break
        return result

    async def pending(self) -> dict[str, int]:
        """Unpublished rows per table (claimed or not), for status and tests."""
        async def count(conn: psycopg.AsyncConnection) -> dict[str, int]:
            out = {}
            for table in ("alerts", "deadletters"):
                cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE published_at IS NULL")
                out[table] = (await cur.fetchone())[0]
            return out
        return await self.sink.read("counting pending outbox rows", count)

    async def _claim_alerts(self, conn: psycopg.AsyncConnection) -> list:
        cur = await conn.execute(
            "UPDATE alerts SET claimed_until = now() + make_interval(secs => %s)"
            " WHERE (alert_id, ts) IN (SELECT alert_id, ts FROM alerts WHERE published_at IS NULL"
            "   AND (claimed_until IS NULL OR claimed_until < now()) ORDER BY ts LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING alert_id, ts, kind, severity, subject, collection, evidence, model_versions, synthetic",
            (self.lease_s, _CLAIM_ROWS),
        )
        return sorted(await cur.fetchall(), key=lambda r: (r[1], r[0]))

    async def _claim_deadletters(self, conn: psycopg.AsyncConnection) -> list:
        cur = await conn.execute(
            'UPDATE deadletters SET claimed_until = now() + make_interval(secs => %s)'
            ' WHERE (topic, "partition", "offset") IN (SELECT topic, "partition", "offset" FROM deadletters'
            '   WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())'
            '   ORDER BY ts LIMIT %s FOR UPDATE SKIP LOCKED)'
            ' RETURNING topic, "partition", "offset", ts, reason, error, key,'
            '   substring(value from 1 for %s), octet_length(value)',
            (self.lease_s, _CLAIM_DEADLETTERS, DEADLETTER_VALUE_MAX),
        )
        return sorted(await cur.fetchall(), key=lambda r: (r[0], r[1], r[2]))

    async def _send(self, topic: str, messages: list[tuple], table: str) -> list[bool]:
        """Send ``messages``, retrying the ones that failed; which were acknowledged."""
        ok = [False] * len(messages)
        todo = list(range(len(messages)))
        error: Optional[BaseException] = None
        for attempt in range(self.attempts):
            if not todo:
                break
            if attempt:
                await asyncio.sleep(_backoff(attempt))
            outcomes = await asyncio.gather(*[self._send_one(topic, *messages[i]) for i in todo],
                                            return_exceptions=True)
            failed = []
            for i, outcome in zip(todo, outcomes):
                if isinstance(outcome, BaseException):
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    error = outcome
                    failed.append(i)
                else:
                    ok[i] = True
            todo = failed
        if todo:
            self._resume_at = time.monotonic() + self.lease_s
            self.metrics.outbox_parked.labels(table=table).inc(len(todo))
            log.warning("%d message(s) for %s not acknowledged after %d attempts (%r); parked, re-sent in %.0fs",
                        len(todo), topic, self.attempts, error, self.lease_s)
        return ok

    async def _send_one(self, topic: str, key: Optional[bytes], value: bytes, headers) -> None:
        async def send() -> None:
            delivery = await self.publish(topic, key, value, headers)
            await delivery

        await asyncio.wait_for(send(), self.timeout_s)

"""The batch ingest engine: a service inside the Faust worker that reads the
market topics with aiokafka ``getmany`` and commits offsets by hand.

Why not a Faust agent for this path: stock Faust spends ~200 µs of CPU per
message on this machine (its per-message ``wait_first`` hand-off and stream
bookkeeping; BENCHMARKS.md), capping one worker at ~4,600 events/s before any
work is done, and ``Stream.take()`` acks its buffer in a ``finally`` when the
agent fails. Here a whole fetch is one unit: validate, one transaction per
topic, produce, then commit exactly the offsets that were stored. The Faust
worker still owns the process, producer, web server, timers and the
agent engine (``ARTWATCH_WORKER__ENGINE=agents``), which shares the same
``BatchPipeline``.

Outages are waited out, however long. A transient database failure
(``infra.db.failures``) keeps the batch in hand and retries it with backoff;
while it waits, every assigned partition is paused and the consumer is still
polled (aiokafka leaves the group after ``max_poll_interval_ms`` without a
poll), /health says ``degraded`` with the reason, and when the database
answers the partitions resume. Offsets still commit only after their batch
(and every batch before it) committed. A deterministic failure (disk full, a
missing table, a bug) stops the worker through ``on_fatal``.

A record batch that cannot be read (bad CRC, unknown codec, garbage) makes
aiokafka's ``getmany`` raise on every call, and it may already have moved
other partitions past records it never returned. So after a failed fetch
every partition goes back to the first offset not received, the partitions
are read raw to find the unreadable batch, the records before it go through
as usual, and the batch's offsets become one dead letter
(``corrupt_batch``) committed past like any other. A batch that never comes
whole (a corrupt length field: aiokafka's RecordTooLargeError) is stepped
over one offset at a time the same way: its real extent is unknown.

A batch held longer than ``_HOLD_AFTER_S`` with no error to show (a frozen
server, a dead route, a long lock wait; or a broker that does not
acknowledge its alerts) marks the part it waits on degraded until it goes
through; every database attempt also has a client-side limit
(``infra.db.sink.EventSink.attempt_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable, Mapping, Optional, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CommitFailedError, CorruptRecordException, IllegalStateError, KafkaConnectionError, KafkaError,
    KafkaTimeoutError, for_code,
)
from mode import Service

from infra.db.failures import classify, describe
from infra.health import DEGRADED, READY, Health
from infra.metrics import Metrics
from infra.retry import Backoff, Throttle
from infra.settings import Settings
from streams.pipeline import BatchPipeline, IncomingMessage, PreparedBatch
from streams.records import DeadLetter

__all__ = ["BatchIngest", "wait_out", "CORRUPT_BATCH"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CORRUPT_BATCH = "corrupt_batch"  # the dead-letter reason of a record batch that cannot be read
# A batch waiting this long pauses the partitions even when no failure was
# seen yet (a stall without an error: a long lock wait, a slow disk).
_HOLD_AFTER_S = 5.0
_POLL_WHILE_PAUSED_MS = 500
_MAX_PARTITION_FETCH_BYTES = 4 * 1024 * 1024


def _failing_part(exc: BaseException) -> Optional[str]:
    """``database`` or ``broker`` when ``exc`` is worth waiting out, else None (stop)."""
    if isinstance(exc, KafkaError):
        return "broker" if exc.retriable or isinstance(exc, (KafkaConnectionError, KafkaTimeoutError)) else None
    if isinstance(exc, asyncio.TimeoutError):  # a send or a broker request past its limit
        return "broker"
    return "database" if classify(exc).transient else None


def _one_line(exc: BaseException) -> str:
    return describe(exc) if _failing_part(exc) != "broker" else f"{type(exc).__name__}: {exc}"


_waits = itertools.count(1)  # each wait's own source in /health


async def wait_out(what: str, attempt: Callable[[], Awaitable[T]], health: Health, backoff_max_s: float) -> T:
    """``attempt()`` until it succeeds, waiting out transient database and broker
    failures (backoff capped at ``backoff_max_s``, one log line per ~10 s,
    /health degraded meanwhile); anything else is raised. ``attempt`` must be
    safe to run again (the stores are idempotent).

    Each call reports in /health as a source of its own: batches in flight
    wait at once, and one getting through leaves the others' state standing
    (the sinks report theirs apart too, see ``streams.app``)."""
    backoff, say = Backoff(0.5, max(0.5, backoff_max_s)), Throttle(10.0)
    failing: Optional[str] = None
    source = f"wait-{next(_waits)}"
    started = time.monotonic()
    try:
        while True:
            try:
                result = await attempt()
            except Exception as exc:  # noqa: BLE001 - sorted below: wait it out, or raise
                part = _failing_part(exc)
                if part is None:
                    raise
                if failing is not None and failing != part:
                    health.clear(failing, source)
                failing = part
                health.set(part, DEGRADED, f"{what} waits: {_one_line(exc)}", source)
                delay = backoff.next()
                if say.ready():
                    log.warning("%s waits for the %s (%.0fs so far): %s; next try in %.1fs",
                                what, part, time.monotonic() - started, _one_line(exc), delay)
                await asyncio.sleep(delay)
                continue
            if failing is not None:
                log.info("%s went through after waiting %.0fs for the %s", what, time.monotonic() - started,
                         failing)
            return result
    finally:
        if failing is not None:
            health.clear(failing, source)


def _cut_short(raw) -> Optional[str]:
    """What is wrong with the first record batch in ``raw`` that does not come
    whole (its length field reaches past the bytes fetched), or None.

    Examples
    --------
    >>> _cut_short(struct.pack(">qi", 0, 4) + b"abcd") is None
    True
    >>> _cut_short(struct.pack(">qi", 0, 4) + b"abcd" + struct.pack(">qi", 4, 1000) + b"xy")
    'it declares 1000 bytes after its 12-byte header, 2 came'
    >>> _cut_short(b"abc")
    'a 3-byte fragment, shorter than a batch header'
    """
    pos, n = 0, len(raw)
    while pos < n:
        if n - pos < 12:
            return f"a {n - pos}-byte fragment, shorter than a batch header"
        length = struct.unpack_from(">i", raw, pos + 8)[0]
        if length < 0 or pos + 12 + length > n:
            return f"it declares {length} bytes after its 12-byte header, {n - pos - 12} came"
        pos += 12 + length
    return None


@dataclass(frozen=True)
class _Unreadable:
    """Offsets ``start`` to ``end - 1`` of a partition hold a batch that cannot be read."""

    start: int
    end: int
    error: str


class BatchIngest(Service):
    """Consume ``pipelines``' topics in fetch-sized batches.

    Parameters
    ----------
    settings
        Broker, group and batch settings.
    pipelines
        Topic name -> the pipeline that processes that topic.
    metrics
        Where the consumer lag, paused partitions and health go.
    on_fatal
        Called with the exception when a batch cannot be processed and
        waiting will not help; the worker exits there without committing
        (see ``streams.app._die``).
    health
        What /health reports; the engine sets its ``start``, ``database``
        and ``broker`` parts.
    """

    def __init__(
        self,
        settings: Settings,
        pipelines: Mapping[str, BatchPipeline],
        metrics: Metrics,
        on_fatal: Callable[[str, BaseException], None],
        health: Optional[Health] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.pipelines = dict(pipelines)
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.health = health if health is not None else Health()
        self.consumer: AIOKafkaConsumer | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._committed: dict[TopicPartition, int] = {}  # last offset committed per assigned partition
        self._uncommitted: dict[TopicPartition, int] = {}  # stored, commit failed or timed out: sent with the next
        self._received: dict[TopicPartition, int] = {}  # next offset not yet received, per partition
        self._lag_series: set[TopicPartition] = set()
        self._say_broker = Throttle(10.0)
        self._say_commit = Throttle(10.0)

    async def on_start(self) -> None:
        w = self.settings.worker
        self.consumer = AIOKafkaConsumer(
            *self.pipelines,
            bootstrap_servers=self.settings.broker_url,
            group_id=f"{self.settings.app_id}-ingest",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=w.batch_size,
            # Short by default: the join takes about half of it on Tansu (see WorkerSettings).
            session_timeout_ms=int(w.session_timeout_s * 1000),
            heartbeat_interval_ms=int(w.session_timeout_s * 1000 / 3),
            fetch_max_wait_ms=int(w.batch_within_s * 1000),
            max_partition_fetch_bytes=_MAX_PARTITION_FETCH_BYTES,
            fetch_max_bytes=32 * 1024 * 1024,
        )
        await self.consumer.start()
        log.info("batch ingest consuming %s", ", ".join(self.pipelines))

    async def on_stop(self) -> None:
        # Let the batch in hand finish (store, produce, commit) before mode
        # cancels the consume task; a cancel mid-batch would only roll back.
        # Not while the database is away: that batch is re-read on restart.
        deadline = time.monotonic() + self.settings.worker.sink_retry_max_s
        while not self._idle.is_set() and self.health.of("database") == READY:
            if time.monotonic() > deadline:
                log.warning("stopping mid-batch; its events will be re-read on restart")
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=0.5)

    async def on_shutdown(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        for p in self.pipelines.values():
            await p.sink.close()

    # -- the loop ---------------------------------------------------------

    @Service.task
    async def _consume(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        w = self.settings.worker
        # Up to max_in_flight batches committing at once (on separate
        # connections) while the next fetch is decoded and scored: the worker's
        # CPU then overlaps the database's. Offsets still commit strictly in
        # fetch order, each only after its own batch (and all before it) committed.
        in_flight: deque[tuple[asyncio.Task, dict[TopicPartition, int]]] = deque()
        while not self.should_stop:
            unreadable: dict[TopicPartition, _Unreadable] = {}
            try:
                fetched = await consumer.getmany(timeout_ms=int(w.batch_within_s * 1000), max_records=w.batch_size)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a batch it cannot read, or a fetch error: never a crash loop
                fetched, unreadable = await self._after_failed_fetch(exc)
            self.health.clear("start")  # joined and fetching
            self.metrics.assigned_partitions.set(len(consumer.assignment()))
            if not fetched and not unreadable:
                while in_flight:
                    await self._finish(*in_flight.popleft())
                if self._uncommitted:
                    await self._commit({})
                self._idle.set()
                continue
            self._idle.clear()
            offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items()}
            offsets.update({tp: u.end for tp, u in unreadable.items()})
            self._received.update(offsets)
            by_topic: dict[str, list] = defaultdict(list)
            for tp, records in fetched.items():
                by_topic[tp.topic].extend(records)
            try:  # aiokafka records go in as they are (timestamps in ms)
                prepared = [
                    await self._holding(self._wait_out(f"preparing a batch of {t}",
                                                       lambda t=t, batch=batch: self.pipelines[t].prepare(
                                                           batch, ts_scale=0.001)))
                    for t, batch in by_topic.items()
                ]
            except Exception as exc:  # noqa: BLE001 - crash without committing, like a failed store
                self.on_fatal(f"preparing a batch of {', '.join(by_topic)} failed", exc)
                raise
            prepared += [self._deadletters(tp, u) for tp, u in sorted(unreadable.items())]
            while len(in_flight) >= w.max_in_flight:
                await self._finish(*in_flight.popleft())
            in_flight.append((asyncio.ensure_future(self._store(prepared)), offsets))
        while in_flight:
            await self._finish(*in_flight.popleft())
        self._idle.set()

    def _wait_out(self, what: str, attempt: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return wait_out(what, attempt, self.health, self.settings.worker.sink_retry_backoff_max_s)

    async def _store(self, prepared: list[PreparedBatch]) -> None:
        for batch in prepared:
            pipeline = self.pipelines[batch.topic]
            await self._wait_out(f"storing a batch of {batch.topic}", lambda b=batch: pipeline.store(b))

    async def _finish(self, task: asyncio.Task, offsets: dict[TopicPartition, int]) -> None:
        try:
            await self._holding(task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - crash without committing
            first = min(offsets, key=lambda tp: (tp.topic, tp.partition))
            self.on_fatal(f"batch from {first.topic}[{first.partition}] failed", exc)
            raise
        await self._commit(offsets)

    # -- waiting with the partitions paused ---------------------------------

    async def _holding(self, aw: Awaitable[T]) -> T:
        """``await aw``; once it waits on a database that fails (or longer than
        ``_HOLD_AFTER_S``), pause every partition and keep polling, so the
        group keeps this member and nothing new is fetched; resume after."""
        task = asyncio.ensure_future(aw)
        started = time.monotonic()
        source = f"hold-{id(task)}"
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                held = time.monotonic() - started
                if held >= _HOLD_AFTER_S:
                    self._mark_stall(source, held)
                    await self._poll_paused()
                elif self.health.of("database") != READY:
                    await self._poll_paused()
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            for part in ("database", "broker"):
                self.health.clear(part, source)
            self._resume()

    def _mark_stall(self, source: str, held: float) -> None:
        """The batch in hand has been held ``held`` s with no error to show
        for it: not "ready" either. The database when one of its attempts is
        what waits (a frozen server, a dead route, a long lock wait); else the
        broker (the batch's alerts and dead letters go out after its commit),
        unless a wait between database retries reports the database already."""
        waiting, what = max((p.sink.waiting() for p in self.pipelines.values()), default=(0.0, ""))
        if waiting >= _HOLD_AFTER_S:
            self.health.clear("broker", source)
            self.health.set("database", DEGRADED,
                            f"{what} has waited {waiting:.0f}s for an answer; partitions paused", source)
            return
        self.health.clear("database", source)
        if self.health.of("database") != READY:
            self.health.clear("broker", source)
            return
        self.health.set("broker", DEGRADED, f"the batch in hand has not gone through for {held:.0f}s, waiting on no"
                                            " database attempt (its alerts or dead letters to publish); partitions"
                                            " paused", source)

    async def _poll_paused(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        assigned = consumer.assignment()
        self.metrics.assigned_partitions.set(len(assigned))  # a rebalance may come while it waits
        if assigned - consumer.paused():  # first time, or a rebalance handed over unpaused partitions
            consumer.pause(*assigned)
            self.metrics.paused_partitions.set(len(consumer.paused()))
            log.info("paused %d partition(s) until the batch in hand is stored", len(assigned))
        try:
            got = await consumer.getmany(timeout_ms=_POLL_WHILE_PAUSED_MS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handled by the next regular fetch
            log.debug("poll while paused failed: %r", exc)
            await self._rewind()
            return
        for tp, records in got.items():  # assigned by a rebalance during the poll: read them again later
            consumer.seek(tp, records[0].offset)

    def _resume(self) -> None:
        consumer = self.consumer
        if consumer is None or not consumer.paused():
            return
        paused = consumer.paused() & consumer.assignment()
        consumer.resume(*paused)
        self.metrics.paused_partitions.set(0)
        log.info("resumed %d partition(s)", len(paused))

    # -- offsets ------------------------------------------------------------

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit what was stored, for the partitions this worker still owns.

        aiokafka refuses a whole commit when one partition in it was revoked
        (IllegalStateError), or when the group rebalanced since the fetch
        (CommitFailedError): the partitions still owned would lose their
        commit too. So only owned partitions are sent, and after a refusal
        the commit is tried once more with those still owned then. A moved
        partition's new owner re-reads from its last commit and the
        idempotent sink drops the repeats. A commit that fails or times out
        (broker away) is kept and sent with the next one."""
        consumer = self.consumer
        assert consumer is not None
        for tp, offset in offsets.items():
            self._uncommitted[tp] = max(offset, self._uncommitted.get(tp, 0))
        moved = 0
        for attempt in (1, 2):
            owned = consumer.assignment()
            for tp in self._uncommitted.keys() - owned:
                del self._uncommitted[tp]
                moved += 1
            mine = dict(self._uncommitted)
            if not mine:
                return
            try:
                await asyncio.wait_for(consumer.commit(mine), timeout=self.settings.worker.broker_timeout_s)
            except (CommitFailedError, IllegalStateError) as exc:
                if attempt == 1:
                    log.info("offset commit refused after a rebalance (%s); again with the partitions still owned",
                             exc)
                    continue
                log.warning("offset commit refused twice (%s); kept for the next commit", exc)
                return
            except (KafkaError, asyncio.TimeoutError) as exc:
                if self._say_commit.ready():
                    log.warning("offset commit failed (%r); kept for the next commit, events may be re-read", exc)
                return
            for tp, offset in mine.items():
                if self._uncommitted.get(tp) == offset:
                    del self._uncommitted[tp]
            self._committed.update(mine)
            if moved:
                log.info("committed offsets of %d partition(s) still owned; %d moved to another worker,"
                         " which re-reads them from their last commit", len(mine), moved)
            return

    # -- batches that cannot be read ----------------------------------------

    async def _after_failed_fetch(self, exc: BaseException) -> tuple[dict, dict[TopicPartition, _Unreadable]]:
        """After ``getmany`` raised: rewind, then find unreadable batches.

        Returns ``(records, unreadable)``: per partition with an unreadable
        batch, the records before it and the batch's offsets (the consumer is
        moved past it). Nothing found: the fetch failed for another reason
        (the broker); reported, waited for, and the next fetch tries again."""
        await self._rewind()
        try:
            found = await self._find_unreadable()
        except asyncio.CancelledError:
            raise
        except Exception as probe:  # noqa: BLE001 - the broker is away: wait like for any fetch error
            log.debug("looking for an unreadable batch failed: %r", probe)
            found = {}
        if not found:
            self.health.set("broker", DEGRADED, f"fetch failed: {type(exc).__name__}: {exc}")
            if self._say_broker.ready():
                log.warning("fetch failed (%s: %s); trying again", type(exc).__name__, exc)
            await asyncio.sleep(1.0)
            return {}, {}
        self.health.clear("broker")
        records = {tp: good for tp, (good, _u) in found.items() if good}
        unreadable = {tp: u for tp, (_g, u) in found.items()}
        for tp, u in unreadable.items():
            self.consumer.seek(tp, u.end)
            log.error("%s[%d]: %s; dead-lettered as %s, consuming on from offset %d",
                      tp.topic, tp.partition, u.error, CORRUPT_BATCH, u.end)
        return records, unreadable

    async def _rewind(self) -> None:
        """Every assigned partition back to the first offset not received.

        A ``getmany`` that raises may have drained other partitions into the
        result it then dropped, with their positions already moved on; no
        fetch may follow before this succeeded (so it is waited for)."""
        consumer = self.consumer
        assert consumer is not None
        say = Throttle(10.0)
        while True:
            try:
                for tp in consumer.assignment():
                    if tp in self._received:
                        consumer.seek(tp, self._received[tp])
                        continue
                    committed = await asyncio.wait_for(consumer.committed(tp), self.settings.worker.broker_timeout_s)
                    if committed is not None:
                        consumer.seek(tp, committed)
                    else:
                        await consumer.seek_to_beginning(tp)  # as auto_offset_reset="earliest" would
                return
            except (KafkaError, IllegalStateError, asyncio.TimeoutError) as exc:
                self.health.set("broker", DEGRADED, f"no answer to offset queries: {type(exc).__name__}: {exc}")
                if say.ready():
                    log.warning("cannot rewind after a failed fetch (%r); trying again", exc)
                await asyncio.sleep(1.0)

    async def _find_unreadable(self) -> dict[TopicPartition, tuple[list, _Unreadable]]:
        consumer = self.consumer
        assert consumer is not None
        candidates = sorted(consumer.assignment() - consumer.paused())
        if not candidates:
            return {}
        ends = await asyncio.wait_for(consumer.end_offsets(candidates), self.settings.worker.broker_timeout_s)
        found = {}
        limit = self.settings.worker.broker_timeout_s
        for tp in candidates:
            # position() waits for as long as the position is being reset (a broker that does not answer)
            position = await asyncio.wait_for(consumer.position(tp), limit)
            if position >= max(ends.get(tp, 0), consumer.highwater(tp) or 0):
                continue
            good, unreadable = await self._read_raw(tp, position)
            if unreadable is not None:
                found[tp] = (good, unreadable)
        return found

    async def _read_raw(self, tp: TopicPartition, offset: int) -> tuple[list[IncomingMessage], Optional[_Unreadable]]:
        """Fetch ``tp`` from ``offset`` and decode it batch by batch: the records
        up to the first batch that cannot be read, and that batch (or None)."""
        from aiokafka.protocol.fetch import FetchRequest
        from aiokafka.record.memory_records import MemoryRecords

        consumer = self.consumer
        assert consumer is not None
        # aiokafka has no public raw fetch; its own fetcher sends this request through this client.
        client = consumer._client
        node = client.cluster.leader_for_partition(tp)
        if node is None or node < 0:
            raise KafkaError(f"no leader known for {tp}")
        # max_wait 100 ms, not 0: Tansu answers a zero wait with no data at all.
        request = FetchRequest(100, 1, _MAX_PARTITION_FETCH_BYTES, 0,
                               [(tp.topic, [(tp.partition, offset, _MAX_PARTITION_FETCH_BYTES)])])
        response = await asyncio.wait_for(client.send(node, request), self.settings.worker.broker_timeout_s)
        raw = None
        for topic, partitions in response.topics:
            for partition, error_code, _highwater, *rest in partitions:
                if (topic, partition) == (tp.topic, tp.partition):
                    if error_code:
                        raise for_code(error_code)(f"raw fetch of {tp}")
                    raw = rest[-1]
        if raw is None:
            raise KafkaError(f"the raw fetch of {tp} at offset {offset} returned nothing")
        records = MemoryRecords(raw)
        good: list[IncomingMessage] = []
        covered = False  # a whole batch reaching past ``offset`` was read
        while records.has_next():
            try:
                batch = records.next_batch()
            except Exception as exc:  # noqa: BLE001 - not even its header parses: step over one offset
                start = good[-1].offset + 1 if good else offset
                return good, _Unreadable(start, start + 1, f"record batch header at offset {start} cannot be"
                                                           f" read ({type(exc).__name__}: {exc})")
            if batch is None:  # cut off by the fetch size; the next fetch starts there
                break
            if batch.next_offset <= offset:
                continue
            covered = True
            start = max(getattr(batch, "base_offset", offset), offset)
            try:
                if not batch.validate_crc():
                    raise CorruptRecordException("invalid CRC")
                decoded = [r for r in batch if r.offset >= offset]
            except Exception as exc:  # noqa: BLE001 - any decoding failure makes the batch unreadable
                return good, _Unreadable(start, batch.next_offset,
                                         f"record batch at offsets {start}-{batch.next_offset - 1} cannot be read"
                                         f" ({type(exc).__name__}: {exc})")
            if batch.is_control_batch:
                continue
            good.extend(IncomingMessage(tp.topic, tp.partition, r.offset, r.timestamp, r.key, r.value)
                        for r in decoded)
        if not covered and (short := _cut_short(raw)) is not None:
            # Bytes came, but not one whole batch at the offset: aiokafka says
            # RecordTooLargeError, steps one offset, is rewound, and would meet
            # it again forever. A broker that follows KIP-74 (Kafka, Tansu)
            # sends a whole first batch whatever its size, so its length field
            # is corrupt; where it really ends is unknown: one offset at a time.
            return good, _Unreadable(offset, offset + 1, f"record batch at offset {offset} never comes whole ({short})")
        return good, None

    def _deadletters(self, tp: TopicPartition, u: _Unreadable) -> PreparedBatch:
        """The unreadable batch as one dead letter (its first offset; the range is
        in the error), stored in a transaction of its own by the pipeline."""
        letter = DeadLetter(ts=datetime.now(timezone.utc), topic=tp.topic, partition=tp.partition, offset=u.start,
                            reason=CORRUPT_BATCH, error=u.error[:1000], key=None, value=None)
        return PreparedBatch(topic=tp.topic, received=0, records=[], rows=[], sources=[], dead=[letter], alerts=[],
                             ts_scale=0.001)

    # -- lag and the broker's health ---------------------------------------

    @Service.timer(5.0)
    async def _report_lag(self) -> None:
        """Lag = the log's end minus the committed offset, per assigned partition.

        Measured from the committed offset, not the read position: events
        fetched but not yet stored (a stalled database) are lag. The log end
        is asked for (ListOffsets), because the highwater of fetch responses
        stops moving when a stall stops the fetching; the highwater is kept as
        a floor, since Tansu 0.6 answers ListOffsets with the last record
        batch's base offset + 1 (observed here), short of the real end.
        Committed offsets are our own commits, or asked for once for a
        partition new to this worker. The answer (or its absence, within
        broker_timeout_s) is also the broker's health."""
        consumer, gauge = self.consumer, self.metrics.consumer_lag
        if consumer is None:
            return
        assigned = consumer.assignment()
        self.metrics.assigned_partitions.set(len(assigned))
        for tp in self._lag_series - assigned:  # moved to another worker: its series would go stale
            with contextlib.suppress(KeyError):
                gauge.remove(tp.topic, str(tp.partition))
        self._lag_series = set(assigned)
        self._committed = {tp: o for tp, o in self._committed.items() if tp in assigned}
        self._received = {tp: o for tp, o in self._received.items() if tp in assigned}
        if not assigned:
            return
        limit = self.settings.worker.broker_timeout_s
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(list(assigned)), limit)
            for tp in assigned - self._committed.keys():
                self._committed[tp] = await asyncio.wait_for(consumer.committed(tp), limit) or 0
        except (KafkaError, IllegalStateError, asyncio.TimeoutError) as exc:
            log.debug("consumer lag not measured this time: %r", exc)
            if isinstance(exc, (KafkaError, asyncio.TimeoutError)):
                self.health.set("broker", DEGRADED, f"no answer to offset queries: {type(exc).__name__}: {exc}")
            return
        if self.health.of("broker") != READY:
            self.health.clear("broker")
        for tp, end in ends.items():
            end = max(end, consumer.highwater(tp) or 0)
            gauge.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, end - self._committed[tp]))

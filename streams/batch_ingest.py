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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from typing import Callable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from mode import Service

from infra.metrics import Metrics
from infra.settings import Settings
from streams.pipeline import BatchPipeline, PreparedBatch

__all__ = ["BatchIngest"]

log = logging.getLogger(__name__)


class BatchIngest(Service):
    """Consume ``pipelines``' topics in fetch-sized batches.

    Parameters
    ----------
    settings
        Broker, group and batch settings.
    pipelines
        Topic name -> the pipeline that processes that topic.
    metrics
        Where the consumer lag goes.
    on_fatal
        Called with the exception when a batch cannot be processed; the
        worker exits there without committing (see ``streams.app._die``).
    """

    def __init__(
        self,
        settings: Settings,
        pipelines: Mapping[str, BatchPipeline],
        metrics: Metrics,
        on_fatal: Callable[[str, BaseException], None],
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.pipelines = dict(pipelines)
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.consumer: AIOKafkaConsumer | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._committed: dict[TopicPartition, int] = {}  # last offset committed per assigned partition
        self._lag_series: set[TopicPartition] = set()

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
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )
        await self.consumer.start()
        log.info("batch ingest consuming %s", ", ".join(self.pipelines))

    async def on_stop(self) -> None:
        # Let the batch in hand finish (store, produce, commit) before mode
        # cancels the consume task; a cancel mid-batch would only roll back.
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.settings.worker.sink_retry_max_s)
        except asyncio.TimeoutError:
            log.warning("stopping mid-batch; its events will be re-read on restart")

    async def on_shutdown(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        for p in self.pipelines.values():
            await p.sink.close()

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
            fetched = await consumer.getmany(timeout_ms=int(w.batch_within_s * 1000), max_records=w.batch_size)
            self.metrics.assigned_partitions.set(len(consumer.assignment()))
            if not fetched:
                while in_flight:
                    await self._finish(*in_flight.popleft())
                self._idle.set()
                continue
            self._idle.clear()
            by_topic: dict[str, list] = defaultdict(list)
            for tp, records in fetched.items():
                by_topic[tp.topic].extend(records)
            try:  # aiokafka records go in as they are (timestamps in ms)
                prepared = [await self.pipelines[t].prepare(batch, ts_scale=0.001) for t, batch in by_topic.items()]
            except Exception as exc:  # noqa: BLE001 - crash without committing, like a failed store
                self.on_fatal(f"preparing a batch of {', '.join(by_topic)} failed", exc)
                raise
            while len(in_flight) >= w.max_in_flight:
                await self._finish(*in_flight.popleft())
            offsets = {tp: records[-1].offset + 1 for tp, records in fetched.items()}
            in_flight.append((asyncio.ensure_future(self._store(prepared)), offsets))
        while in_flight:
            await self._finish(*in_flight.popleft())
        self._idle.set()

    async def _store(self, prepared: list[PreparedBatch]) -> None:
        for batch in prepared:
            await self.pipelines[batch.topic].store(batch)

    async def _finish(self, task: asyncio.Task, offsets: dict[TopicPartition, int]) -> None:
        try:
            await task
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - crash without committing
            first = min(offsets, key=lambda tp: (tp.topic, tp.partition))
            self.on_fatal(f"batch from {first.topic}[{first.partition}] failed", exc)
            raise
        await self._commit(offsets)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit what was stored. A rebalance may have moved a partition away;
        its new owner re-reads those events and the idempotent sink drops them."""
        consumer = self.consumer
        assert consumer is not None
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("offset commit skipped after rebalance (%s); events will be re-read idempotently", exc)
            return
        self._committed.update(offsets)

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
        partition new to this worker."""
        consumer, gauge = self.consumer, self.metrics.consumer_lag
        if consumer is None:
            return
        assigned = consumer.assignment()
        for tp in self._lag_series - assigned:  # moved to another worker: its series would go stale
            with contextlib.suppress(KeyError):
                gauge.remove(tp.topic, str(tp.partition))
        self._lag_series = set(assigned)
        self._committed = {tp: o for tp, o in self._committed.items() if tp in assigned}
        if not assigned:
            return
        try:
            ends = await consumer.end_offsets(list(assigned))
            for tp in assigned - self._committed.keys():
                self._committed[tp] = await consumer.committed(tp) or 0
        except (KafkaError, IllegalStateError) as exc:
            log.debug("consumer lag not measured this time: %s", exc)
            return
        for tp, end in ends.items():
            end = max(end, consumer.highwater(tp) or 0)
            gauge.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, end - self._committed[tp]))

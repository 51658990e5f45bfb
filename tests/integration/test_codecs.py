"""Every Kafka compression codec is read, and a batch that cannot be read is
dead-lettered, not crash-looped on (issue 8, point 1, the consumer's side).

A foreign producer (confluent-kafka, i.e. librdkafka, as most services use)
writes each codec; the worker stores everything. A record batch with a bad
CRC is written with a hand-made produce request (Tansu stores it as sent;
it refuses an unknown codec id, so that case cannot be put on the topic).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from infra.db.migrate import migrate
from streams.replay.publisher import ensure_topics
from tests.conftest import _fresh_database
from tests.integration.test_ingest import (
    _assert_stored_once, _encoded, _launch, _log_tail, _produce, _ready, _sales, _settings,
)

pytestmark = [pytest.mark.integration, pytest.mark.broker]

CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # Kafka's codec ids (record batch attributes)


def _stored(dsn: str, prefix: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM sales WHERE event_id LIKE %s", (f"{prefix}-%",)).fetchone()[0]


def _wait(what: str, check, timeout: float, worker) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not worker.alive():
            pytest.fail(f"worker exited (code {worker.proc.returncode}) waiting for {what}:\n{_log_tail(worker)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{_log_tail(worker)}")
        time.sleep(0.25)


def _batch_codecs(bootstrap: str, topic: str, partition: int) -> list[int]:
    """The compression codec of every record batch now in ``topic[partition]``, read raw."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.record.memory_records import MemoryRecords

    async def run() -> list[int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            await consumer.position(tp)
            client = consumer._client  # the raw batches, as the broker keeps them
            node = client.cluster.leader_for_partition(tp)
            response = await client.send(node, FetchRequest(100, 1, 8 << 20, 0, [(topic, [(partition, 0, 8 << 20)])]))
            raw = [rest[-1] for _t, parts in response.topics for p, _e, _h, *rest in parts if p == partition][0]
            records, codecs = MemoryRecords(raw), []
            while records.has_next():
                batch = records.next_batch()
                if batch is None:
                    break
                codecs.append(batch.compression_type)
            return codecs
        finally:
            await consumer.stop()

    return asyncio.run(run())


def test_every_codec_from_librdkafka_is_stored(broker, tmp_path: Path, run_id: str) -> None:
    import confluent_kafka  # a test dependency: librdkafka, the foreign producer
    dsn = _fresh_database(f"artwatch_test_codecs_{uuid.uuid4().hex[:8]}")
    migrate(dsn, timescale="off")
    settings = _settings(broker, dsn, tmp_path, "off")
    worker = _ready(_launch(settings, tmp_path / "worker.log"))
    topic = settings.topics.sales
    batches = {codec: _sales(f"{codec}-{run_id}", 300, collections=3, seed=40 + i)
               for i, codec in enumerate(CODECS)}
    try:
        for partition, (codec, sales) in enumerate(batches.items()):
            producer = confluent_kafka.Producer({
                "bootstrap.servers": broker, "compression.type": codec, "linger.ms": 20, "acks": "all",
            })
            failed: list = []
            for key, value in _encoded(sales):
                producer.produce(topic, value=value, key=key, partition=partition,
                                 on_delivery=lambda err, _msg: err and failed.append(err))
            assert producer.flush(30) == 0 and not failed, f"{codec}: {failed[:3]}"
            codecs = _batch_codecs(broker, topic, partition)
            assert codecs and set(codecs) == {CODECS[codec]}, f"{codec}: the topic holds batches with codecs {codecs}"
        for codec, sales in batches.items():
            _wait(f"{codec} events stored", lambda: _stored(dsn, f"{codec}-{run_id}") == len(sales), 60, worker)
        m = worker.metrics()
        assert m.get("deadletter_total", 0) == 0
    finally:
        code = worker.stop()
    assert code == 0
    for codec, sales in batches.items():
        _assert_stored_once(dsn, sales, codec)


# -- a record batch that cannot be read -------------------------------------------


def _record_batch(values: list[bytes], bad_crc: bool = False) -> bytes:
    """A v2 record batch (what producers send), its CRC spoilt on request."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=None, key=b"corrupt", value=value, headers=[])
    raw = bytearray(builder.build())
    if bad_crc:
        raw[-3] ^= 0xFF  # a flipped byte in the last record, after the CRC was computed
    return bytes(raw)


def _produce_raw(bootstrap: str, topic: str, partition: int, batch: bytes) -> tuple[int, int]:
    """A Produce v3 request carrying ``batch`` as it is; returns (error code, base offset)."""

    def string(s: str) -> bytes:
        return struct.pack(">h", len(s)) + s.encode()

    body = (struct.pack(">hhi", -1, -1, 10_000)  # no transactional id, acks=all, timeout
            + struct.pack(">i", 1) + string(topic) + struct.pack(">i", 1)
            + struct.pack(">ii", partition, len(batch)) + batch)
    message = struct.pack(">hhi", 0, 3, 1) + string("artwatch-test") + body
    host, _, port = bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(struct.pack(">i", len(message)) + message)
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        data = s.recv(size, socket.MSG_WAITALL)
    offset = 4 + 4  # correlation id, topic count
    offset += 2 + struct.unpack_from(">h", data, offset)[0] + 4  # topic name, partition count
    _partition, error, base = struct.unpack_from(">ihq", data, offset)
    return error, base


def test_a_corrupt_batch_is_dead_lettered_by_its_offsets(broker, tmp_path: Path, run_id: str) -> None:
    """Partition 0 holds good records, a batch with a bad CRC, good records;
    the other partitions good records. All of it is on the topic before the
    worker starts, so its first fetch meets the bad batch together with the
    rest (aiokafka's getmany then raises on every call, after moving the other
    partitions past records it never returned). Every good record is stored,
    the bad batch is one dead letter naming its offsets, the committed offset
    moves past it, and the worker keeps going."""
    dsn = _fresh_database(f"artwatch_test_corrupt_{uuid.uuid4().hex[:8]}")
    migrate(dsn, timescale="off")
    settings = _settings(broker, dsn, tmp_path, "off")
    ensure_topics(broker, settings.topics, settings.worker.partitions, include_outputs=True)
    topic = settings.topics.sales
    before, after = _sales(f"before-{run_id}", 20, 2, seed=51), _sales(f"after-{run_id}", 20, 2, seed=52)
    others = _sales(f"others-{run_id}", 300, 3, seed=53)
    _produce(broker, topic, _encoded(before), partition=0, sequential=True)
    error, bad_offset = _produce_raw(broker, topic, 0, _record_batch([b"x" * 50, b"y" * 50, b"z" * 50], bad_crc=True))
    if error:
        pytest.fail(f"the broker refused the corrupt batch (error {error}); this test needs one stored")
    assert bad_offset == len(before)
    _produce(broker, topic, _encoded(after), partition=0, sequential=True)
    for p in (1, 2, 3):
        _produce(broker, topic, _encoded(others[(p - 1) * 100:p * 100]), partition=p)

    worker = _ready(_launch(settings, tmp_path / "worker.log"))
    try:
        good = before + after + others
        _wait("every good event stored", lambda: sum(
            _stored(dsn, f"{k}-{run_id}") for k in ("before", "after", "others")) == len(good), 90, worker)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute('SELECT "partition", "offset", reason, error, value FROM deadletters'
                                " WHERE topic = %s", (topic,)).fetchall()
        assert [(p, o, r) for p, o, r, _e, _v in rows] == [(0, bad_offset, "corrupt_batch")], rows
        error_text = rows[0][3]
        assert f"offsets {bad_offset}-{bad_offset + 2}" in error_text and "CRC" in error_text, error_text

        from kafka.admin import KafkaAdminClient
        from kafka.structs import TopicPartition as KafkaTopicPartition

        admin = KafkaAdminClient(bootstrap_servers=broker)
        try:
            group = f"{settings.app_id}-ingest"

            def committed_past_the_batch() -> bool:
                got = admin.list_group_offsets({group: None})[group]
                entry = got.get(KafkaTopicPartition(topic, 0))
                return entry is not None and entry.offset == len(before) + 3 + len(after)

            _wait("partition 0 committed past the bad batch", committed_past_the_batch, 30, worker)
        finally:
            admin.close()
        m = worker.metrics()
        assert m.get("deadletter_total") == 1, m
        more = _sales(f"more-{run_id}", 10, 1, seed=54)  # still consuming partition 0
        _produce(broker, topic, _encoded(more), partition=0)
        _wait("events after the skip stored", lambda: _stored(dsn, f"more-{run_id}") == len(more), 30, worker)
    finally:
        code = worker.stop()
    assert code == 0
    _assert_stored_once(dsn, before + after + others + more, "around a corrupt batch")
    log_text = worker.log_path.read_text(errors="replace")
    assert log_text.count("dead-lettered as corrupt_batch") == 1, _log_tail(worker)


# -- a batch that never comes whole (aiokafka's RecordTooLargeError) --------------------
#
# Tansu cannot be made to serve one: it parses every batch it is sent (a
# produce request with a wrong length field is refused) and writes each
# batch's length field itself when it serves a fetch (a stored object with a
# wrong one is re-framed, or the connection is closed); and it sends a whole
# first batch whatever the fetch size (KIP-74). So the engine's probe is
# driven here by a stand-in for the consumer that answers the raw fetch with
# such bytes, as a broker with damaged storage would.


class _Consumer:
    """Just enough of AIOKafkaConsumer for the engine's unreadable-batch probe:
    one partition, whose raw fetch answers ``raw`` whatever the offset."""

    def __init__(self, tp, raw: bytes, end: int, position_hangs: bool = False) -> None:
        from types import SimpleNamespace

        self.tp, self.raw, self.end, self.position_hangs = tp, raw, end, position_hangs
        self.pos = 0
        self.fetched_at: list[int] = []
        self._client = SimpleNamespace(cluster=SimpleNamespace(leader_for_partition=lambda tp: 1), send=self._send)

    def assignment(self) -> set:
        return {self.tp}

    def paused(self) -> set:
        return set()

    def seek(self, tp, offset: int) -> None:
        self.pos = offset

    async def committed(self, tp):
        return None

    async def seek_to_beginning(self, tp) -> None:
        self.pos = 0

    async def end_offsets(self, tps) -> dict:
        return {self.tp: self.end}

    def highwater(self, tp) -> int:
        return self.end

    async def position(self, tp) -> int:
        if self.position_hangs:  # aiokafka's position() waits as long as the position is being reset
            await asyncio.Event().wait()
        return self.pos

    async def _send(self, node, request):
        from types import SimpleNamespace

        self.fetched_at.append(request.topics[0][1][0][1])
        return SimpleNamespace(topics=[(self.tp.topic, [(self.tp.partition, 0, self.end, self.raw)])])


def _engine(tmp_path: Path, consumer: _Consumer, received: int):
    from prometheus_client import CollectorRegistry

    from infra.metrics import build_metrics
    from infra.settings import Settings
    from streams.batch_ingest import BatchIngest

    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none", data_dir=tmp_path,
                        worker={"broker_timeout_s": 0.5})
    engine = BatchIngest(settings, {}, build_metrics(CollectorRegistry()),
                         on_fatal=lambda reason, exc: pytest.fail(f"{reason}: {exc}"))
    engine.consumer = consumer
    engine._received = {consumer.tp: received}
    return engine


async def test_a_batch_that_never_comes_whole_is_dead_lettered_one_offset_at_a_time(tmp_path: Path) -> None:
    """Offsets 2-3 are one batch whose length field reaches past the bytes a
    fetch brings: aiokafka raises RecordTooLargeError at offset 2 on every
    fetch. The probe dead-letters offset 2 (corrupt_batch, saying why) and
    moves on to 3, where the same batch is met again and 3 is dead-lettered;
    never "fetch failed; trying again" forever."""
    from aiokafka import TopicPartition
    from aiokafka.errors import RecordTooLargeError

    tp = TopicPartition("sales", 0)
    raw = bytearray(_record_batch([b"x" * 50, b"y" * 50]))
    struct.pack_into(">q", raw, 0, 2)  # base offset 2 (not under the CRC)
    struct.pack_into(">i", raw, 8, struct.unpack_from(">i", raw, 8)[0] + 1000)  # the corrupt length field
    consumer = _Consumer(tp, bytes(raw), end=4)
    engine = _engine(tmp_path, consumer, received=2)
    for offset in (2, 3):
        records, unreadable = await asyncio.wait_for(
            engine._after_failed_fetch(RecordTooLargeError(f"{tp}={offset}")), 10)
        assert not records.get(tp), records
        assert list(unreadable) == [tp], unreadable
        u = unreadable[tp]
        assert (u.start, u.end) == (offset, offset + 1), u
        assert f"record batch at offset {offset} never comes whole" in u.error and "declares" in u.error, u.error
        assert consumer.pos == offset + 1 and consumer.fetched_at[-1] == offset
        letter = engine._deadletters(tp, u).dead[0]
        assert (letter.topic, letter.partition, letter.offset, letter.reason) == ("sales", 0, offset, "corrupt_batch")
        engine._received[tp] = u.end  # as the consume loop records it
    assert engine.health.of("broker") == "ready"


async def test_a_position_query_without_an_answer_is_bounded(tmp_path: Path) -> None:
    """The probe's position() query is limited by broker_timeout_s: a broker
    that does not answer makes it a failed fetch (broker degraded, tried again
    later), not a hang of the consume loop."""
    from aiokafka import TopicPartition
    from aiokafka.errors import RecordTooLargeError

    tp = TopicPartition("sales", 0)
    engine = _engine(tmp_path, _Consumer(tp, b"", end=4, position_hangs=True), received=2)
    started = time.monotonic()
    records, unreadable = await asyncio.wait_for(engine._after_failed_fetch(RecordTooLargeError("x")), 10)
    assert (records, unreadable) == ({}, {})
    assert time.monotonic() - started < 5
    assert engine.health.of("broker") == "degraded"

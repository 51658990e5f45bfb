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

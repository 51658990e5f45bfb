"""Property: every message through the real pipeline ends as one stored row or one dead letter.

Issue 8, point 2, end to end: Hypothesis builds batches of arbitrary bytes,
the crashers of the issue and mutations of valid records of every kind;
``BatchPipeline.prepare`` and ``store`` run them against the real
PostgreSQL (both storage modes) and the real broker. Afterwards each message
is exactly one of: a row of its kind's table equal to the record it decoded
to, or one ``deadletters`` row at its offset with a reason from REASONS.

Also here: the worker's memory stays flat over 100,000 malformed messages.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import random
import re
import uuid
from datetime import datetime, timezone

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from infra.db.sink import EventSink
from infra.metrics import build_metrics
from infra.settings import Settings, TopicNames
from streams.pipeline import BatchPipeline, IncomingMessage
from streams.records import RECORD_TYPES
from streams.replay.publisher import ensure_topics
from streams.storage import TABLE_SPECS, row_builder
from streams.validation import REASONS
from tests.unit.streams.test_edge_fuzz import VALID, damaged_bytes, damaged_image, mutated_doc

pytestmark = pytest.mark.integration

KINDS = sorted(RECORD_TYPES)
_offsets = itertools.count()  # never reused, also not by Hypothesis' replays of an example

# The crashers of issue 8 (before the catch-all), as raw messages.
_SALE = (b'{"event_id":"%s","ts":"%s","collection":"c","item_id":"1","buyer":"b","seller":"s",'
         b'"price":"1","currency":"ETH"%s}')
CRASHERS = [
    _SALE % (b"x", b"2021-01-01T00:00:00Z", b',"source":"\xff\xfe"'),
    _SALE % (b"x", b"0001-01-01T00:00:00+01:00", b""),
    _SALE % (b"x", b"9999-12-31T23:59:59-01:00", b""),
    _SALE % (b"x", b"2021-01-01T00:00:00Z", b',"pad":' + b"[" * 1000 + b"]" * 1000),
]


class Harness:
    """One pipeline per kind on its own event loop (Hypothesis calls a plain
    function per example), a real sink and a real producer."""

    def __init__(self, settings: Settings, dsn: str) -> None:
        self.settings, self.dsn = settings, dsn
        self.loop = asyncio.new_event_loop()
        self.producer = self.run(self._start_producer())
        self.sinks = {k: EventSink(dsn, [TABLE_SPECS[k]], retry_max_s=10) for k in KINDS}
        metrics = build_metrics(CollectorRegistry())
        self.pipelines = {k: BatchPipeline(k, settings, self.sinks[k], metrics, self._publish) for k in KINDS}

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.broker_url, acks="all")  # binds to this loop
        await producer.start()
        return producer

    async def _publish(self, topic, key, value, headers):
        return await self.producer.send(topic, value, key=key, headers=list(headers))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        for sink in self.sinks.values():
            self.run(sink.close())
        self.run(self.producer.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(broker, any_dsn):
    run = uuid.uuid4().hex[:8]
    names = {k: f"test-poison-{k}-{run}" for k in ("listings", "bids", "sales", "images", "alerts", "deadletter")}
    s = Settings(broker_url=broker, database_url=any_dsn[0], topics=TopicNames(**names))
    ensure_topics(broker, s.topics, 1, include_outputs=True)
    h = Harness(s, any_dsn[0])
    yield h
    h.close()


_EVENT_ID = re.compile(rb'("event_id":\s*")')


def _with_fresh_id(raw: bytes) -> bytes:
    # Unique ids keep examples apart (a flipped byte cannot turn one into another's).
    return _EVENT_ID.sub(lambda m: m.group(1) + uuid.uuid4().hex.encode() + b"-", raw, count=1)


@st.composite
def batches(draw) -> tuple[str, list[bytes]]:
    """A topic's kind and a batch for it: valid records of that kind among
    arbitrary bytes, the crashers and mutations of records of every kind."""
    kind = draw(st.sampled_from(KINDS))
    message = st.one_of(
        st.sampled_from([doc for k, doc in VALID if k == kind]).map(msgspec.json.encode),
        st.binary(max_size=512),
        st.sampled_from(CRASHERS),
        mutated_doc().map(lambda kr: kr[1]),
        damaged_bytes().map(lambda kr: kr[1]),
        damaged_image(),
    )
    return kind, draw(st.lists(message.map(_with_fresh_id), min_size=1, max_size=12))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=batches())
def test_every_message_ends_stored_or_deadlettered(harness, case):
    kind, values = case
    topic = harness.settings.topics.inputs()[kind]
    batch_in = [IncomingMessage(topic, 0, next(_offsets), 1.7e9, b"k", v) for v in values]
    pipeline = harness.pipelines[kind]
    batch = harness.run(pipeline.prepare(batch_in))
    outcome = harness.run(pipeline.store(batch))

    # In the pipeline's own account: each message once, on one side.
    stored_offsets = [m.offset for m in batch.sources]
    dead = {d.offset: d.reason for d in batch.dead}
    assert len(dead) == len(batch.dead) and not set(stored_offsets) & set(dead)
    assert sorted(stored_offsets + list(dead)) == [m.offset for m in batch_in]
    assert set(dead.values()) <= set(REASONS)
    assert outcome.received == len(batch_in) and outcome.stored + outcome.duplicates == len(batch.records)
    event("some stored" if batch.records else "none stored")
    for reason in set(dead.values()):
        event(f"dead letter: {reason}")

    # In the database: one dead letter per refused offset, one equal row per record.
    spec = TABLE_SPECS[kind]
    with psycopg.connect(harness.dsn) as conn:
        rows = conn.execute('SELECT "offset", reason FROM deadletters WHERE topic = %s AND "offset" = ANY(%s)',
                            (topic, [m.offset for m in batch_in])).fetchall()
        assert dict(rows) == dead and len(rows) == len(dead)
        as_row = row_builder(kind)
        for record in batch.records:
            found = conn.execute(f"SELECT {', '.join(spec.columns)} FROM {spec.table} WHERE event_id = %s",
                                 (record.event_id,)).fetchall()
            assert found == [as_row(record)], record.event_id


# --- memory over a flood of malformed messages -----------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malformed(rng: random.Random, n: int) -> list[bytes]:
    """``n`` malformed messages of many shapes (each a little different)."""
    valid = [msgspec.json.encode(doc) for _kind, doc in VALID]
    out = []
    for i in range(n):
        base = valid[i % len(valid)]
        shape = i % 8
        if shape == 0:
            out.append(rng.randbytes(rng.randrange(1, 600)))
        elif shape == 1:
            out.append(base[: rng.randrange(1, len(base))])
        elif shape == 2:  # 0xff is invalid anywhere in JSON: a bad token or invalid UTF-8
            j = rng.randrange(len(base))
            out.append(base[:j] + b"\xff" + base[j + 1:])
        elif shape == 3:
            out.append(CRASHERS[i % len(CRASHERS)].replace(b'"x"', b'"x%d"' % i))
        elif shape == 4:
            out.append(base.replace(b'"ts":"', b'"synthetik":%d,"ts":"' % i, 1))
        elif shape == 5:
            out.append(base.replace(b'"event_id":"', b'"event_id":"\\u202e%d' % i, 1))
        elif shape == 6:
            out.append(base.replace(b'"ts":"', b'"ts":"9999-12-31T23:59:59-01:00","x":"', 1))
        else:
            out.append(b'{"event_id":"%d","ts":' % i + b"[" * rng.randrange(100, 3000))
    return out


def test_rss_stays_flat_over_100000_malformed_messages(harness, caplog):
    """prepare() of the batch engine (aiokafka records, ms timestamps) over
    100,000 malformed messages of every kind in batches of 4,000: memory
    after a warm-up must stay flat (a leak of ~100 bytes a message fails)."""
    caplog.set_level(logging.ERROR, logger="streams.pipeline")  # 100,000 warnings kept by the log capture would grow
    rng = random.Random(8)
    flood = _malformed(rng, 20_000)  # reused: the messages themselves are not what is measured
    ts = int(datetime.now(timezone.utc).timestamp() * 1000)

    def batches(total: int):
        for start in range(0, total, 4000):
            kind = KINDS[(start // 4000) % len(KINDS)]
            topic = harness.settings.topics.inputs()[kind]
            yield kind, [ConsumerRecord(topic, 0, start + i, ts, 0, None, flood[(start + i) % len(flood)], None,
                                        0, 0, ()) for i in range(4000)]

    def drive(total: int) -> int:
        deadlettered = 0
        for kind, records in batches(total):
            prepared = harness.run(harness.pipelines[kind].prepare(records, ts_scale=0.001))
            assert not prepared.records, "every message of the flood is malformed"
            deadlettered += len(prepared.dead)
        return deadlettered

    drive(20_000)  # warm-up: caches, metric label sets, allocator arenas
    gc.collect()
    before = _rss_bytes()
    assert drive(100_000) == 100_000
    gc.collect()
    grown = _rss_bytes() - before
    # ~1 MiB here; keeping each message's DeadLetter (~270 bytes) would add ~27 MiB.
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 100,000 malformed messages"

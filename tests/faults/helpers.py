"""What the fault tests share: sizes, events, workers, a TCP proxy and the checks.

Every check reads a database of the test's own (``fresh_db`` in conftest.py),
so "nothing else is stored" is checked over whole tables, not over a prefix.

Sizes are module constants read from the environment, so a developer can run
the suite small on a shared machine and CI runs it at full size (the
defaults): ``ARTWATCH_FAULTS_EVENTS`` (events replayed under SIGKILLs,
100,000), ``ARTWATCH_FAULTS_KILLS`` (20), ``ARTWATCH_FAULTS_OUTAGE_S`` (35),
``ARTWATCH_FAULTS_MALFORMED`` (20,000), ``ARTWATCH_FAULTS_VALID`` (valid events
of the outage, broker and flood tests, 20,000), ``ARTWATCH_FAULTS_SEED``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import msgspec
import psycopg
import pytest

from infra.settings import Settings, TopicNames
from streams.records import Event
from streams.replay.publisher import DEFAULT_PRODUCER_CONFIG, ensure_topics, kafka_client
from streams.replay.timeline import build_timeline
from streams.worker import WorkerProcess
from tests.conftest import free_port


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


EVENTS = _env_int("ARTWATCH_FAULTS_EVENTS", 100_000)
KILLS = _env_int("ARTWATCH_FAULTS_KILLS", 20)
OUTAGE_S = _env_int("ARTWATCH_FAULTS_OUTAGE_S", 35)
MALFORMED = _env_int("ARTWATCH_FAULTS_MALFORMED", 20_000)
VALID = _env_int("ARTWATCH_FAULTS_VALID", 20_000)
SEED = _env_int("ARTWATCH_FAULTS_SEED", 20261130)

EVENT_TABLES = ("sales", "listings", "bids", "images")
# Tables that feed the rollups, with their price column (streams/storage.py).
PRICE_COLUMNS = {"sales": "price", "listings": "price", "bids": "amount"}
ROLLUPS = {"rollup_1m": "1 minute", "rollup_1h": "1 hour"}

_encode = msgspec.json.Encoder().encode

Entry = tuple[str, str, Event]  # (kind, key, record), as the replay's timeline


# -- events -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _replay(seed: int) -> tuple[Entry, ...]:
    return tuple(build_timeline(seed=seed))


def replay_events(n: int, seed: int = 7) -> list[Entry]:
    """``n`` valid events of every kind from the project's replay: real
    CryptoPunks sales and art-auction bids plus its seeded synthetic listings,
    bids and images, in event-time order (62,487 events for seed 7). Beyond
    that the replay is repeated with fresh event ids (``<id>-copy<r>``),
    labelled ``synthetic`` (artwatch made them up) with source
    ``faults-copy``; keys and times stay those of the original."""
    base = _replay(seed)
    out: list[Entry] = list(base[:n])
    r = 0
    while len(out) < n:
        r += 1
        for kind, key, rec in base[: n - len(out)]:
            copy = msgspec.structs.replace(rec, event_id=f"{rec.event_id}-copy{r}", synthetic=True,
                                           source="faults-copy")
            out.append((kind, key, copy))
    ids = [rec.event_id for _, _, rec in out]
    assert len(set(ids)) == len(ids), "replay event ids must be unique"
    return out


def ids_by_kind(events: Iterable[Entry]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {k: set() for k in EVENT_TABLES}
    for kind, _key, rec in events:
        out[kind].add(rec.event_id)
    return out


# -- workers ------------------------------------------------------------------


def isolated_settings(broker: str, dsn: str, data_dir: Path, **worker) -> Settings:
    """Settings of one test's worker: its own topics, consumer group and ports."""
    run = uuid.uuid4().hex[:10]
    names = {k: f"f{run}-{k}" for k in TopicNames.model_fields}
    return Settings(
        app_id=f"artwatch-faults-{run}",
        broker_url=broker,
        database_url=dsn,
        data_dir=data_dir,
        timescale="on",
        topics=TopicNames(**names),
        worker={"web_port": free_port(), "metrics_port": free_port(), **worker},
    )


def log_tail(worker: WorkerProcess, n: int = 40) -> str:
    try:
        return "\n".join(worker.log_path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Workers:
    """The worker processes (and publisher threads) a test starts; at
    teardown every publisher is stopped and every worker still running is
    SIGKILLed."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[WorkerProcess] = []
        self.publishers: list[Publisher] = []

    def publish(self, publisher: "Publisher") -> "Publisher":
        """Start ``publisher``, stopped at teardown if still running."""
        self.publishers.append(publisher)
        publisher.start()
        return publisher

    def start(self, settings: Settings, name: str) -> WorkerProcess:
        ensure_topics(settings.broker_url, settings.topics, settings.worker.partitions, include_outputs=True)
        worker = WorkerProcess(settings, self.tmp / f"{name}.log").start()
        self.started.append(worker)
        return worker

    def close(self) -> None:
        for p in self.publishers:
            p.stop()
        for w in self.started:
            w.kill()


def ready(worker: WorkerProcess, timeout: float = 120) -> WorkerProcess:
    try:
        worker.wait_ready(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - reported with the log
        worker.kill()
        pytest.fail(f"worker not ready: {exc}\n{log_tail(worker)}")
    return worker


def metrics(worker: WorkerProcess) -> dict[str, float]:
    try:
        return worker.metrics()
    except OSError:
        return {}


def metric_by_label(worker: WorkerProcess, name: str, label: str) -> dict[str, float]:
    """One metric's samples by one label's value, e.g.
    ``metric_by_label(w, "artwatch_streams_events_in_total", "topic")``."""
    url = f"http://127.0.0.1:{worker.settings.worker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as resp:
        text = resp.read().decode()
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1:].rpartition("} ")
            for part in labels.split(","):
                k, _, v = part.partition("=")
                if k == label:
                    out[v.strip('"')] += float(value)
    return dict(out)


def rss_kib(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def health(worker: WorkerProcess) -> tuple[Optional[str], str]:
    """``(state, body)`` of ``/health`` on the worker's metrics port: state is
    ``ready``/``degraded``/``failing`` (lower case) as the worker says it,
    ``"unreachable"`` when nothing answers, and None when the port has no
    health endpoint (prometheus_client answers every path with metrics)."""
    url = f"http://127.0.0.1:{worker.settings.worker.metrics_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            code, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:  # 503 is how a degraded endpoint may answer
        code, body = exc.code, exc.read()
    except OSError:
        return "unreachable", ""
    text = body.decode(errors="replace")
    if code == 404 or "# HELP " in text or "# TYPE " in text:
        return None, text[:200]
    try:
        doc = json.loads(text)
        state = doc.get("status") or doc.get("state") if isinstance(doc, dict) else str(doc)
    except ValueError:
        state = text.split()[0] if text.split() else ""
    return str(state or "").strip().lower(), text[:300]


# -- publishing and reading ----------------------------------------------------


class Publisher(threading.Thread):
    """Publish ``events`` (kafka-python, acks=all, the replay's producer
    settings) to their input topics, paced evenly over about ``seconds``
    (0: as fast as possible), in a thread. ``sent`` counts acknowledged
    records; ``errors`` holds every failed send (the test fails on any)."""

    def __init__(self, bootstrap: str, topics: TopicNames, events: Sequence[Entry], seconds: float = 0,
                 chunk: int = 500) -> None:
        super().__init__(name="faults-publisher", daemon=True)
        self.bootstrap, self.names, self.events = bootstrap, topics.inputs(), events
        self.seconds, self.chunk = seconds, chunk
        self.sent = 0
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        from kafka import KafkaProducer

        try:
            producer = kafka_client(KafkaProducer, self.bootstrap, **DEFAULT_PRODUCER_CONFIG)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
            return
        per_chunk = self.seconds * self.chunk / max(len(self.events), 1)
        t0 = time.monotonic()

        def acked(_md) -> None:
            self.sent += 1

        try:
            for i in range(0, len(self.events), self.chunk):
                if self.stopping.is_set():
                    break
                for kind, key, rec in self.events[i:i + self.chunk]:
                    f = producer.send(self.names[kind], key=key.encode(), value=_encode(rec))
                    f.add_callback(acked)
                    f.add_errback(self.errors.append)
                wait = t0 + per_chunk * (i // self.chunk + 1) - time.monotonic()
                if wait > 0:
                    producer.flush()
                    time.sleep(wait)
            producer.flush()
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)
        finally:
            producer.close()

    def stop(self) -> None:
        """Stop publishing (a failed test's teardown)."""
        self.stopping.set()
        self.join(30)

    def finish(self, timeout: float = 300) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the publisher did not finish"
        assert not self.errors, f"{len(self.errors)} sends failed, first: {self.errors[0]!r}"
        assert self.sent == len(self.events), f"{self.sent} of {len(self.events)} acknowledged"


def produce(bootstrap: str, topic: str, items: Sequence[tuple[Optional[bytes], bytes]]) -> list:
    """Send ``(key, value)`` items with aiokafka (acks=all, up to 4 MiB a
    message); returns their RecordMetadata (partition, offset) in order."""
    from aiokafka import AIOKafkaProducer

    async def run() -> list:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                    max_batch_size=1024 * 1024, max_request_size=4 * 1024 * 1024,
                                    request_timeout_ms=60_000)
        await producer.start()
        try:
            pending = [await producer.send(topic, value=v, key=k) for k, v in items]
            return list(await asyncio.gather(*pending))
        finally:
            await producer.stop()

    return asyncio.run(run())


def read_topic(bootstrap: str, topic: str, at_least: int = 0, timeout: float = 60.0,
               settle_s: float = 2.0) -> list:
    """Every record now in ``topic`` (all partitions, no consumer group).

    Read past the end offsets the broker reports, until nothing new came for
    ``settle_s`` and at least ``at_least`` records are in (or ``timeout``):
    Tansu's ListOffsets answer can fall short of what a fetch returns."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> list:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024)
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            assert tps, f"topic {topic} has no partitions"
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: list = []
            deadline = time.monotonic() + timeout
            last_new = time.monotonic()
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=250, max_records=10_000)
                for records in batch.values():
                    out.extend(records)
                if batch:
                    last_new = time.monotonic()
                    continue
                behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
                if not behind and len(out) >= at_least and time.monotonic() - last_new >= settle_s:
                    break
            return out
        finally:
            await consumer.stop()

    return asyncio.run(run())


# -- waiting -------------------------------------------------------------------


def table_counts(conn: psycopg.Connection) -> dict[str, int]:
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in (*EVENT_TABLES, "deadletters")}


def wait_drained(dsn: str, worker: WorkerProcess, expected: dict[str, int], timeout: float,
                 deadletters: int = 0, alive: Optional[Callable[[], None]] = None,
                 stall_s: float = 120) -> dict[str, int]:
    """Until every event table holds at least ``expected[kind]`` rows, the
    dead letters at least ``deadletters`` and no stored alert is unpublished;
    fails if ``worker`` exits, nothing moves for ``stall_s`` or the time runs
    out."""
    deadline = time.monotonic() + timeout
    last, moved = None, time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            counts = table_counts(conn)
            unpublished = conn.execute("SELECT count(*) FROM alerts WHERE published_at IS NULL").fetchone()[0]
            if (all(counts[k] >= n for k, n in expected.items()) and counts["deadletters"] >= deadletters
                    and unpublished == 0):
                return counts
            if (counts, unpublished) != last:
                last, moved = (counts, unpublished), time.monotonic()
            elif time.monotonic() - moved > stall_s:
                short = {k: n - counts[k] for k, n in expected.items() if counts[k] < n}
                pytest.fail(f"no progress for {stall_s:.0f}s: stored {counts}, expected {expected} (short by "
                            f"{short}) and {deadletters} dead letters, {unpublished} alerts unpublished: events "
                            f"lost?\n{log_tail(worker)}")
            if not worker.alive():
                pytest.fail(f"worker exited (code {worker.proc.returncode}) before the stream drained; stored "
                            f"{counts}, expected {expected}, {unpublished} alerts unpublished\n{log_tail(worker)}")
            if time.monotonic() > deadline:
                pytest.fail(f"not drained after {timeout:.0f}s: stored {counts}, expected {expected} and "
                            f"{deadletters} dead letters, {unpublished} alerts unpublished\n{log_tail(worker)}")
            if alive is not None:
                alive()
            time.sleep(1.0)


# -- the checks ----------------------------------------------------------------


def assert_stored_exactly_once(dsn: str, published: dict[str, set[str]]) -> None:
    """Every published event id is in its kind's table exactly once, and no other id is."""
    problems = []
    with psycopg.connect(dsn) as conn:
        for kind in EVENT_TABLES:
            counts = dict(conn.execute(f"SELECT event_id, count(*) FROM {kind} GROUP BY event_id").fetchall())
            want = published.get(kind, set())
            missing = want - counts.keys()
            extra = counts.keys() - want
            twice = {i: n for i, n in counts.items() if n > 1}
            if missing or extra or twice:
                problems.append(f"{kind}: {len(want)} published, {len(counts)} distinct stored; "
                                f"{len(missing)} missing {sorted(missing)[:5]}, {len(extra)} never published "
                                f"{sorted(extra)[:5]}, {len(twice)} stored more than once {list(twice.items())[:5]}")
    assert not problems, "not exactly once:\n" + "\n".join(problems)


# rollup column -> how to compute it from a raw table's rows (p: its price column)
_ROLLUP_KEYS = {
    "bucket": "date_bin(interval '{width}', ts, timestamptz 'epoch')",
    "collection": "collection",
    "kind": "{kind_literal}",
    "currency": "currency",
    "synthetic": "synthetic",
}
_ROLLUP_VALUES = {
    "n": "count(*)::bigint",
    "n_synthetic": "(count(*) FILTER (WHERE synthetic))::bigint",
    "volume": "sum({p})",
    "min_price": "min({p})",
    "max_price": "max({p})",
}


def _rollup_columns(conn: psycopg.Connection, table: str) -> tuple[list[str], list[str]]:
    """(key columns, other columns) of a rollup table, read from the catalog:
    the key is its primary key (or, without one, its first unique index)."""
    cols = [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum", (table,))]
    key = [r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisunique"
        " AND i.indexrelid = (SELECT indexrelid FROM pg_index WHERE indrelid = %s::regclass AND indisunique"
        " ORDER BY indisprimary DESC, indexrelid LIMIT 1)", (table, table))]
    assert key, f"{table} has no unique key"
    return key, [c for c in cols if c not in key]


def rollup_mismatches(conn: psycopg.Connection, table: str) -> tuple[int, int, list]:
    """Compare ``table`` with the same rollup recomputed from sales, listings
    and bids: ``(rollup rows, recomputed rows, up to 10 differing rows)``.
    Keys are the table's own key columns (so a key that gains ``synthetic``
    is followed); values compare as numeric/bigint, exactly."""
    key, values = _rollup_columns(conn, table)
    unknown = [c for c in key if c not in _ROLLUP_KEYS] + [c for c in values if c not in _ROLLUP_VALUES]
    assert not unknown, (f"{table} has columns this check does not know how to recompute: {unknown}; "
                         "teach tests/faults/helpers.py (_ROLLUP_KEYS/_ROLLUP_VALUES) what they mean")
    width = ROLLUPS[table]
    parts = []
    for kind, p in PRICE_COLUMNS.items():
        literal = f"'{kind}'::text"
        keys = ", ".join(f"{_ROLLUP_KEYS[c].format(width=width, kind_literal=literal)} AS {c}" for c in key)
        aggs = ", ".join(f"{_ROLLUP_VALUES[c].format(p=p)} AS {c}" for c in values)
        group = ", ".join(str(i + 1) for i in range(len(key)))
        parts.append(f"SELECT {keys}, {aggs} FROM {kind} GROUP BY {group}")
    on = " AND ".join(f"raw.{c} = r.{c}" for c in key)
    differs = " OR ".join(f"raw.{c} IS DISTINCT FROM r.{c}" for c in values)
    query = (
        f"WITH raw AS ({' UNION ALL '.join(parts)}) "
        f"SELECT to_jsonb(raw) AS recomputed, to_jsonb(r) AS rollup FROM raw FULL JOIN {table} r ON {on} "
        f"WHERE raw.{key[0]} IS NULL OR r.{key[0]} IS NULL OR {differs}"
    )
    bad = conn.execute(query + " LIMIT 10").fetchall()
    n_roll = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    n_raw = conn.execute(f"WITH raw AS ({' UNION ALL '.join(parts)}) SELECT count(*) FROM raw").fetchone()[0]
    return n_roll, n_raw, bad


def assert_rollups_match(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for table in ROLLUPS:
            n_roll, n_raw, bad = rollup_mismatches(conn, table)
            assert n_raw > 0, f"nothing to roll up: the check of {table} would be vacuous"
            assert not bad, (f"{table} ({n_roll} rows) differs from the aggregates recomputed from the raw "
                             f"tables ({n_raw} groups); first differences (recomputed, stored):\n"
                             + "\n".join(f"  {a} | {b}" for a, b in bad))


@dataclass
class AlertReport:
    stored: int = 0
    on_topic: int = 0
    repeats: int = 0  # messages beyond the first of each alert id
    repeated_ids: int = 0
    episodes: int = 0  # disruptions that explain at least one repeat
    keys: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        return (f"alerts: {self.stored} stored, {self.on_topic} messages on the topic, {self.repeats} repeats "
                f"of {self.repeated_ids} ids from {self.episodes} disruptions")


def check_alerts(dsn: str, bootstrap: str, topic: str, disruptions: Sequence[tuple[float, float]],
                 slack_s: float = 2.0) -> AlertReport:
    """No alert id stored twice; every stored alert published and on the
    topic, nothing else on it; every message keyed by its alert id; each
    repeat on the topic explained by a disruption (a wall-clock interval,
    epoch seconds, e.g. ``(t, t)`` for a SIGKILL): the copies of an alert
    straddle one. Returns the counts (repeats are printed by the tests)."""
    rep = AlertReport()
    with psycopg.connect(dsn) as conn:
        twice = conn.execute("SELECT alert_id, count(*) FROM alerts GROUP BY alert_id HAVING count(*) > 1"
                             " ORDER BY 1 LIMIT 10").fetchall()
        assert not twice, f"alert ids stored more than once: {twice}"
        rows = dict(conn.execute("SELECT alert_id, published_at FROM alerts").fetchall())
    rep.stored = len(rows)
    unpublished = [a for a, at in rows.items() if at is None]
    assert not unpublished, f"{len(unpublished)} stored alerts never marked published: {unpublished[:5]}"

    records = read_topic(bootstrap, topic, at_least=len(rows))
    rep.on_topic = len(records)
    copies: dict[str, list[float]] = defaultdict(list)
    badly_keyed = []
    for r in records:
        alert_id = json.loads(r.value)["alert_id"]
        copies[alert_id].append(r.timestamp / 1000)
        rep.keys["alert_id" if r.key == alert_id.encode() else "other"] += 1
        if r.key != alert_id.encode():
            badly_keyed.append((alert_id, r.key))
    assert copies.keys() == rows.keys(), (
        f"the alerts topic and table differ: {len(rows.keys() - copies.keys())} stored alerts never on the topic "
        f"{sorted(rows.keys() - copies.keys())[:3]}, {len(copies.keys() - rows.keys())} on the topic but not "
        f"stored {sorted(copies.keys() - rows.keys())[:3]}")
    assert not badly_keyed, (f"{len(badly_keyed)} of {len(records)} alert messages are not keyed by their alert id "
                             f"(so neither a consumer nor log compaction can drop a repeat), e.g. "
                             f"(alert_id, key) {badly_keyed[:3]}")
    for times in copies.values():
        if len(times) > 1:
            rep.repeated_ids += 1
            rep.repeats += len(times) - 1
    explained, unexplained = attribute_repeats(copies, disruptions, slack_s)
    rep.episodes = len(explained)
    assert not unexplained, (f"{len(unexplained)} repeats on the alerts topic that no crash or outage explains "
                             f"(alert id, first sent, sent again): {unexplained[:5]}")
    return rep


def attribute_repeats(copies: dict[str, list[float]], disruptions: Sequence[tuple[float, float]],
                      slack_s: float = 2.0) -> tuple[set[int], list[tuple[str, float, float]]]:
    """For each message sent again (``copies``: id -> send times, epoch s),
    the disruption (index into ``disruptions``, intervals in epoch s) its two
    sends straddle. Returns (the disruptions that explain some repeat, the
    repeats none explains as ``(id, first send, next send)``).

    Examples
    --------
    >>> attribute_repeats({"a": [10.0, 20.0], "b": [5.0], "c": [30.0, 31.0]}, [(15.0, 15.0)], slack_s=0.5)
    ({0}, [('c', 30.0, 31.0)])
    """
    explained: set[int] = set()
    unexplained = []
    for msg_id, times in copies.items():
        times = sorted(times)
        for t1, t2 in zip(times, times[1:]):
            hits = [i for i, (a, b) in enumerate(disruptions) if a - slack_s <= t2 and b + slack_s >= t1]
            if hits:
                explained.update(hits)
            else:
                unexplained.append((msg_id, t1, t2))
    return explained, unexplained


# -- a TCP proxy to cut the database off -----------------------------------------


class TcpProxy:
    """A TCP proxy on 127.0.0.1:``port`` to ``target``, in threads.

    :meth:`cut` resets every proxied connection and, until :meth:`restore`,
    closes each new one as soon as it is accepted: to its client the server
    is gone (connection reset / closed unexpectedly). The port stays bound
    throughout, so nothing else can take it meanwhile."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.down = False
        self.accepted = self.refused = 0
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="faults-proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            if self.down:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            self.accepted += 1
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair) -> None:
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.discard(pair)
        for s in pair:
            _reset(s)

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        self.down = True
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._drop(pair)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._thread.join(2)
        self._listener.close()


def _reset(s: socket.socket) -> None:
    """Close with RST (linger 0), waking any thread blocked in recv on it."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


SUMMARIES: list[tuple[str, str]] = []  # (test, what it saw), printed at the end of the run (conftest.py)


def summarize(test: str, text: str) -> None:
    """Print what a fault test saw and keep it for the run's terminal summary
    (so the alert repeats show in CI's output without ``-s``)."""
    print(text)
    SUMMARIES.append((test, text))


def rng(salt: str) -> random.Random:
    """The seeded RNG of one test (``ARTWATCH_FAULTS_SEED`` plus a name)."""
    return random.Random(f"{SEED}:{salt}")

"""Publish a replay timeline to Kafka, as fast as possible or paced.

kafka-python is imported inside the functions, so importing this module (or
the package) needs no broker and no kafka import.

Pacing: with ``speedup=s`` the gap between two consecutive events' ``ts`` is
replayed as ``gap / s`` seconds of wall time, but no single gap waits more
than ``max_sleep_s`` (2 s by default), so a quiet week in the 2017 punk
market does not stall a demo. Waits are scheduled on a virtual clock
(``time.monotonic``), so many small gaps do not drift.

Examples
--------
>>> from datetime import datetime, timedelta, timezone
>>> t0 = datetime(2021, 1, 1, tzinfo=timezone.utc)
>>> pace_delay(t0, t0 + timedelta(hours=1), speedup=3600.0), pace_delay(t0, t0 + timedelta(days=9), speedup=3600.0)
(1.0, 2.0)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Optional

import msgspec

from infra.settings import TopicNames
from streams.replay.errors import BrokerUnavailable, PublishError
from streams.replay.timeline import TimelineEntry

__all__ = ["DEFAULT_PRODUCER_CONFIG", "publish", "ensure_topics", "pace_delay", "kafka_client"]

log = logging.getLogger(__name__)

DEFAULT_PRODUCER_CONFIG: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 5,
    "batch_size": 512 * 1024,
    # Inline images are <= 512 KiB (base64 + JSON fits in the topics' 1 MiB).
    "max_request_size": 1_048_576,
}


def pace_delay(prev_ts: datetime, ts: datetime, speedup: float, max_sleep_s: float = 2.0) -> float:
    """Wall seconds to wait between two events: ``gap / speedup``, capped.

    Negative gaps (never produced by the timeline) count as zero.
    """
    gap = (ts - prev_ts).total_seconds()
    return min(max(gap, 0.0) / speedup, max_sleep_s)


def publish(
    timeline: Iterable[TimelineEntry],
    bootstrap: str,
    topics: TopicNames,
    speedup: Optional[float] = None,
    progress: Optional[Callable[[int], Any]] = None,
    *,
    max_sleep_s: float = 2.0,
    progress_every: int = 1000,
    producer_config: Optional[Mapping[str, Any]] = None,
) -> dict[str, int]:
    """Send every ``(kind, key, record)`` to its topic and wait until acked.

    Parameters
    ----------
    timeline : iterable of (kind, key, record)
        From :func:`~streams.replay.timeline.build_timeline` (or
        ``iter_timeline``); consumed once, in order.
    bootstrap : str
        Kafka bootstrap servers, ``host:port[,host:port...]``.
    topics : TopicNames
        Maps the kinds to topic names (``topics.inputs()``).
    speedup : float, optional
        None: as fast as possible. Otherwise divide event-time gaps by this
        factor (e.g. 3600 = one hour of market per second), each single wait
        capped at ``max_sleep_s``.
    progress : callable, optional
        Called as ``progress(n_sent)`` every ``progress_every`` records and
        with the final count at the end (once per count).
    max_sleep_s : float, optional
        Cap of a single paced wait (2 s).
    progress_every : int, optional
    producer_config : mapping, optional
        Overrides of :data:`DEFAULT_PRODUCER_CONFIG` (``acks="all"``,
        ``linger_ms=5``, ``batch_size=512 KiB``).

    Returns
    -------
    dict[str, int]
        Records sent per topic name (all acknowledged by the broker).

    Raises
    ------
    KeyError
        A kind without a topic in ``topics.inputs()``.
    PublishError
        When any send failed (first error chained); the rest were flushed.
    """
    from kafka import KafkaProducer  # imported lazily: heavy, warns on import

    if speedup is not None and speedup <= 0:
        raise ValueError(f"speedup must be > 0 or None, got {speedup}")
    names = topics.inputs()
    encode = msgspec.json.Encoder().encode
    producer = kafka_client(KafkaProducer, bootstrap, **{**DEFAULT_PRODUCER_CONFIG, **(producer_config or {})})
    counts: Counter[str] = Counter()
    errors: list[BaseException] = []
    sent = 0
    prev_ts: Optional[datetime] = None
    due = time.monotonic()
    try:
        for kind, key, record in timeline:
            topic = names[kind]
            if speedup is not None:
                if prev_ts is not None:
                    due += pace_delay(prev_ts, record.ts, speedup, max_sleep_s)
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    else:
                        due = time.monotonic()  # behind schedule: do not burst to catch up
                prev_ts = record.ts
            future = producer.send(topic, key=key.encode(), value=encode(record))
            future.add_errback(errors.append)
            counts[topic] += 1
            sent += 1
            if progress is not None and sent % progress_every == 0:
                progress(sent)
        producer.flush()
    finally:
        producer.close()
    if progress is not None and (sent == 0 or sent % progress_every):
        progress(sent)
    if errors:
        raise PublishError(f"{len(errors)} of {sent} records failed to publish: {errors[0]!r}") from errors[0]
    log.info("published %d records: %s", sent, dict(counts))
    return dict(counts)


def kafka_client(factory: Callable[..., Any], bootstrap: str, **config: Any) -> Any:
    """``factory(bootstrap_servers=bootstrap, **config)`` (a kafka-python client);
    a broker that does not answer becomes a :class:`BrokerUnavailable` that says
    what to do, not a kafka-python traceback."""
    from kafka import errors

    # kafka-python 2.x raises NoBrokersAvailable, 3.x a KafkaTimeoutError ("Unable to bootstrap").
    unreachable = tuple(getattr(errors, n) for n in ("NoBrokersAvailable", "KafkaTimeoutError") if hasattr(errors, n))
    try:
        return factory(bootstrap_servers=bootstrap, **config)
    except unreachable as exc:
        raise BrokerUnavailable(
            f"no Kafka broker answers at {bootstrap} ({exc}); start one with `artwatch stack up`"
            " or point ARTWATCH_BROKER_URL at yours"
        ) from exc


def ensure_topics(
    bootstrap: str,
    topics: TopicNames,
    partitions: int,
    *,
    replication_factor: int = 1,
    include_outputs: bool = False,
    timeout_ms: int = 30_000,
) -> list[str]:
    """Create the input topics (and optionally alerts/deadletter) if missing.

    Parameters
    ----------
    bootstrap : str
        Kafka bootstrap servers.
    topics : TopicNames
        Names; ``topics.inputs()`` are created, plus ``alerts`` and
        ``deadletter`` when ``include_outputs``.
    partitions : int
        Partitions of each new topic (existing topics are left alone).
    replication_factor : int, optional

    Returns
    -------
    list[str]
        The topics this call created (``TopicAlreadyExistsError`` is ignored).
    """
    import kafka
    from kafka.admin import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    names = list(topics.inputs().values())
    if include_outputs:
        names += [topics.alerts, topics.deadletter]
    created = []
    admin = kafka_client(KafkaAdminClient, bootstrap)
    try:
        for name in dict.fromkeys(names):
            if int(kafka.__version__.split(".")[0]) >= 3:
                spec: Any = {name: {"num_partitions": partitions, "replication_factor": replication_factor}}
            else:  # kafka-python 2.x takes NewTopic objects (deprecated in 3.x)
                from kafka.admin import NewTopic

                spec = [NewTopic(name=name, num_partitions=partitions, replication_factor=replication_factor)]
            try:
                admin.create_topics(spec, timeout_ms=timeout_ms)
            except TopicAlreadyExistsError:
                continue
            created.append(name)
    finally:
        admin.close()
    return created

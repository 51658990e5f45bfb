"""Every Prometheus metric artwatch exposes, built on a registry the caller owns.

Names follow ``artwatch_<subsystem>_<name>_<unit>``: base units, ``_total`` on
counters, bounded labels only (topic, partition, reason, table, kind).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "build_metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    events_in: Counter
    events_stored: Counter
    events_duplicate: Counter
    deadletters: Counter
    sink_batch_rows: Histogram
    sink_batch_seconds: Histogram
    sink_retries: Counter
    event_to_stored: Histogram
    consumer_lag: Gauge
    alerts_emitted: Counter


def build_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create the metrics on ``registry`` (a fresh one when None).

    Examples
    --------
    >>> m = build_metrics()
    >>> m.events_in.labels(topic="sales").inc(3)
    >>> m.registry.get_sample_value("artwatch_streams_events_in_total", {"topic": "sales"})
    3.0
    """
    r = registry if registry is not None else CollectorRegistry()
    return Metrics(
        registry=r,
        events_in=Counter(
            "artwatch_streams_events_in", "Messages consumed from an input topic.", ["topic"], registry=r
        ),
        events_stored=Counter(
            "artwatch_streams_events_stored",
            "Events newly stored (events out of the ingest agents).",
            ["topic"],
            registry=r,
        ),
        events_duplicate=Counter(
            "artwatch_streams_events_duplicate",
            "Valid events already stored (redelivery after a restart); not stored again.",
            ["topic"],
            registry=r,
        ),
        deadletters=Counter(
            "artwatch_streams_deadletter", "Messages sent to the deadletter topic.", ["topic", "reason"], registry=r
        ),
        sink_batch_rows=Histogram(
            "artwatch_infra_db_batch_rows", "Rows per sink transaction.", ["table"],
            buckets=_BATCH_BUCKETS, registry=r,
        ),
        sink_batch_seconds=Histogram(
            "artwatch_infra_db_batch_duration_seconds", "Sink transaction duration.", ["table"],
            buckets=_LATENCY_BUCKETS, registry=r,
        ),
        sink_retries=Counter(
            "artwatch_infra_db_retries", "Sink transactions retried after a transient database error.",
            ["table"], registry=r,
        ),
        event_to_stored=Histogram(
            "artwatch_streams_event_to_stored_seconds",
            "From the event's Kafka timestamp (when it entered the broker) to its database commit.",
            ["topic"], buckets=_LATENCY_BUCKETS, registry=r,
        ),
        consumer_lag=Gauge(
            "artwatch_streams_consumer_lag_messages",
            "Highwater minus the worker's read position, per assigned partition.",
            ["topic", "partition"], registry=r,
        ),
        alerts_emitted=Counter(
            "artwatch_alerts_emitted", "Alerts stored and published.", ["kind"], registry=r
        ),
    )

"""A database outage mid-stream is waited out.

The worker reaches PostgreSQL through a TCP proxy of the test's own. While
the replay flows, the proxy resets every connection and refuses new ones for
``OUTAGE_S`` (35 s, longer than the 30 s after which the worker used to give
up), then lets them through again. The worker process must stay alive the
whole time (same pid, never restarted), keep its metrics endpoint up and,
where ``/health`` exists on it, report ``degraded`` during the outage and
``ready`` after it; afterwards every published event is stored exactly once,
the rollups equal the raw tables' aggregates, no alert is stored twice and
the alerts on the topic are keyed, with any repeat straddling the outage.
"""

from __future__ import annotations

import time
from collections import Counter

import psycopg
import pytest

from tests.faults.helpers import (
    OUTAGE_S,
    VALID,
    Publisher,
    TcpProxy,
    assert_rollups_match,
    assert_stored_exactly_once,
    check_alerts,
    health,
    ids_by_kind,
    isolated_settings,
    log_tail,
    metrics,
    ready,
    replay_events,
    summarize,
    table_counts,
    wait_drained,
)

# A hang fails the test (and its teardown still stops what it started).
pytestmark = [pytest.mark.integration, pytest.mark.broker, pytest.mark.timescale,
              pytest.mark.timeout(300 + OUTAGE_S + VALID // 100)]


def test_database_outage_is_waited_out(broker, fresh_db, workers, tmp_path) -> None:
    info = psycopg.conninfo.conninfo_to_dict(fresh_db)
    proxy = TcpProxy((info.get("host") or "127.0.0.1", int(info.get("port") or 5432)))
    try:
        _run(broker, fresh_db, proxy, workers, tmp_path)
    finally:
        proxy.close()


def _run(broker, dsn, proxy, workers, tmp_path) -> None:
    via_proxy = psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=proxy.port)
    settings = isolated_settings(broker, via_proxy, tmp_path / "data")
    events = replay_events(VALID)
    published = ids_by_kind(events)
    worker = ready(workers.start(settings, "worker"))
    pid = worker.proc.pid
    before = health(worker)

    def alive() -> None:
        if not worker.alive() or worker.proc.pid != pid:
            pytest.fail(f"the worker exited (code {worker.proc.returncode}); it must wait the outage out\n"
                        f"{log_tail(worker)}")

    # Before, during and after the outage: a third of the events flow first.
    publisher = workers.publish(Publisher(broker, settings.topics, events, seconds=OUTAGE_S * 1.6))
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 120
        while sum(table_counts(conn)[k] for k in published) < len(events) // 10:
            alive()
            assert time.monotonic() < deadline, f"nothing stored before the outage\n{log_tail(worker)}"
            time.sleep(0.2)
        stored_at_cut = sum(table_counts(conn)[k] for k in published)

    t_cut = time.time()
    proxy.cut()
    states: Counter = Counter()
    metrics_down = 0
    while time.time() < t_cut + OUTAGE_S:
        alive()
        state, _body = health(worker)
        states[state] += 1
        if not metrics(worker):
            metrics_down += 1
        time.sleep(0.5)
    refused = proxy.refused
    proxy.restore()
    t_restore = time.time()
    alive()

    publisher.finish()
    expected = {k: len(v) for k, v in published.items()}
    wait_drained(dsn, worker, expected, timeout=180, alive=alive)
    after = health(worker)
    deadline = time.monotonic() + 60
    while after[0] not in (None, "ready") and time.monotonic() < deadline:
        time.sleep(0.5)
        after = health(worker)
    alive()
    assert worker.stop() == 0, f"the worker did not stop cleanly after the outage\n{log_tail(worker)}"

    assert_stored_exactly_once(dsn, published)
    assert_rollups_match(dsn)
    report = check_alerts(dsn, broker, settings.topics.alerts, [(t_cut, t_restore)])
    summary = (f"{len(events)} events, {stored_at_cut} stored before a {OUTAGE_S}s outage, {refused} connections "
               f"refused during it; /health before {before[0]!r}, during {dict(states)}, after {after[0]!r}; "
               f"metrics endpoint down at {metrics_down} probes; {report}")
    summarize("database outage", summary)
    assert metrics_down == 0, f"the metrics endpoint did not answer at {metrics_down} probes during the outage"
    assert refused > 0, "the worker never tried to reconnect during the outage"
    if set(states) == {None}:
        pytest.skip("everything else passed, but the worker has no /health endpoint on its metrics port yet "
                    f"(it answers /health with Prometheus metrics): {summary}")
    assert states.get("degraded", 0) > 0, f"/health never said degraded during the outage: {dict(states)}"
    assert after[0] == "ready", f"/health did not return to ready after the outage: {after}"

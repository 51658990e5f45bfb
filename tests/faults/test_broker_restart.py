"""A broker restart mid-stream loses and doubles nothing.

The test runs a broker of its own (``infra.stack.Stack`` on its own port and
data folder, in the stack's default storage, which issue 8 makes durable), so
the session's broker and the other tests are not disturbed. A worker consumes
30% of the replay and stores part of it; then the ``listings`` table is locked
and the next 30% published, so the worker cannot get through that topic (it
pauses its partitions while a batch waits) and the broker is certain to hold
published events nobody consumed yet. The broker (and its S3 store, in s3
storage) is then stopped, left down a few seconds and started again; the lock
is released and the rest of the replay published. The worker process must
survive it (same pid), and afterwards every published event is stored
exactly once, the rollups equal the raw tables' aggregates, no alert is
stored twice and every alert is on the alerts topic, keyed, any repeat
straddling the restart. A broker that forgets what it held (``memory://``
storage: ``ARTWATCH_FAULTS_BROKER_STORAGE=memory`` shows it) fails this test.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pytest

from infra.settings import Settings
from tests.conftest import ADMIN_DSN, free_port, unavailable
from tests.faults.helpers import (
    VALID,
    Publisher,
    _env_int,
    assert_rollups_match,
    assert_stored_exactly_once,
    check_alerts,
    ids_by_kind,
    isolated_settings,
    log_tail,
    metric_by_label,
    ready,
    replay_events,
    summarize,
    table_counts,
    wait_drained,
)

# A hang fails the test (and its teardown still stops what it started).
pytestmark = [pytest.mark.integration, pytest.mark.broker, pytest.mark.timescale,
              pytest.mark.timeout(300 + VALID // 100)]

DOWN_S = _env_int("ARTWATCH_FAULTS_BROKER_DOWN_S", 5)
# Unset: the stack's default storage, which is what must be durable.
STORAGE = {"broker_storage": s} if (s := os.environ.get("ARTWATCH_FAULTS_BROKER_STORAGE")) else {}
LOCKED = "listings"


def _storage(stack) -> str:
    """The broker's --storage-engine, read from its command line."""
    pid = stack.status(probe=False)["broker"]["pid"]
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, TypeError):
        return "unknown"
    for flag, value in zip(argv, argv[1:]):
        if flag == b"--storage-engine":
            return value.decode()
    return "unknown"


def test_broker_restart_mid_stream_loses_and_doubles_nothing(fresh_db, workers, tmp_path) -> None:
    from infra.stack import Stack

    stack = Stack(Settings(broker_url=f"127.0.0.1:{free_port()}", database_url=ADMIN_DSN,
                           data_dir=tmp_path / "broker", **STORAGE))
    try:
        try:
            stack.up(timeout=120)
        except Exception as exc:  # noqa: BLE001 - reported as skip/fail
            unavailable(f"the test's own broker could not start: {exc}")
        _run(stack, fresh_db, workers, tmp_path)
    finally:
        stack.down()


def _run(stack, dsn, workers, tmp_path) -> None:
    bootstrap = stack.settings.broker_url
    storage = _storage(stack)
    print(f"broker storage: {storage}")
    # Small batches: the worker fetches little of the locked topic before it waits.
    settings = isolated_settings(bootstrap, dsn, tmp_path / "data", batch_size=200)
    events = replay_events(VALID)
    published = ids_by_kind(events)
    a, b = len(events) * 3 // 10, len(events) * 6 // 10
    flowing, held, rest = events[:a], events[a:b], events[b:]
    first = events[:b]
    assert any(kind == LOCKED for kind, _, _ in held)
    worker = ready(workers.start(settings, "worker"))
    pid = worker.proc.pid

    def alive() -> None:
        if not worker.alive() or worker.proc.pid != pid:
            pytest.fail(f"the worker exited (code {worker.proc.returncode}) around the broker restart\n"
                        f"{log_tail(worker)}")

    def stored(conn: psycopg.Connection) -> int:
        return sum(table_counts(conn)[k] for k in published)

    # Mid-stream: the first 30% flows and part of it is stored ...
    workers.publish(Publisher(bootstrap, settings.topics, flowing)).finish()
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while stored(conn) < len(flowing) // 10:
            alive()
            assert time.monotonic() < deadline, f"nothing stored before the restart\n{log_tail(worker)}"
            time.sleep(0.1)
    with psycopg.connect(dsn) as blocker:
        # ... then the next 30% is published while a table is locked, so the
        # broker holds events the worker has not consumed when it stops.
        blocker.execute(f"LOCK TABLE {LOCKED} IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
        workers.publish(Publisher(bootstrap, settings.topics, held)).finish()
        consumed = metric_by_label(worker, "artwatch_streams_events_in_total", "topic")
        t_stop = time.time()
        stack.down(services=("broker", "s3"))  # the broker and its store, if it has one
        status = stack.status(probe=False)
        assert not status["broker"]["running"] and not status.get("s3", {}).get("running"), "the broker did not stop"
        stored_at_stop = stored(blocker)  # the lock's holder may read
        unconsumed = len(first) - int(sum(consumed.get(t, 0) for t in settings.topics.inputs().values()))
        down_until = time.monotonic() + DOWN_S
        while time.monotonic() < down_until:
            alive()
            time.sleep(0.2)
        try:
            stack.up(timeout=120)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"the broker did not start again: {exc}")
        t_up = time.time()
        alive()
        blocker.rollback()

    assert unconsumed > 0, (f"the broker held no unconsumed events when it stopped ({consumed}); this run did not "
                            "test that it keeps them")
    workers.publish(Publisher(bootstrap, settings.topics, rest)).finish()
    expected = {k: len(v) for k, v in published.items()}
    wait_drained(dsn, worker, expected, timeout=240, alive=alive)
    alive()
    assert worker.stop() == 0, f"the worker did not stop cleanly after the broker restart\n{log_tail(worker)}"

    summary = (f"broker storage {storage}; {len(first)} events published before the restart, {unconsumed} of them "
               f"not yet consumed and {stored_at_stop} stored when it stopped; down {DOWN_S}s; {len(rest)} after")
    assert_stored_exactly_once(dsn, published)
    assert_rollups_match(dsn)
    report = check_alerts(dsn, bootstrap, settings.topics.alerts, [(t_stop, t_up)])
    summarize("broker restart", f"{summary}; {report}")

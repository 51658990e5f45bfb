"""Fixtures of the fault suite: a migrated TimescaleDB database of the test's
own and a registry of the worker processes it starts (all stopped after it).
The broker is the session's (tests/conftest.py), except in the broker-restart
test, which runs its own."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.conftest import ADMIN_DSN, _fresh_database, unavailable
from tests.faults.helpers import Workers


@pytest.fixture
def fresh_db() -> str:
    """A new database, migrated with TimescaleDB (hypertables), dropped afterwards."""
    from infra.db.migrate import migrate

    name = f"artwatch_faults_{uuid.uuid4().hex[:10]}"
    dsn = _fresh_database(name)
    try:
        with psycopg.connect(dsn) as conn:
            if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone() is None:
                unavailable("the timescaledb extension is not installed (../shared/tools/install-timescaledb.sh)")
        migrate(dsn, timescale="on")
        yield dsn
    finally:
        try:
            with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass  # tests/conftest.py drops it at the end of the session too


@pytest.fixture
def workers(tmp_path) -> Workers:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.close()


def pytest_terminal_summary(terminalreporter) -> None:
    """What each fault test saw (kills, outage, repeats on the alerts topic), at the end of the run."""
    from tests.faults.helpers import SUMMARIES

    if SUMMARIES:
        terminalreporter.section("artwatch fault suite")
        for test, text in SUMMARIES:
            terminalreporter.write_line(f"{test}: {text}")

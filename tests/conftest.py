"""Shared fixtures: a real broker and real PostgreSQL databases, no mocks.

Locally a missing service skips the tests that need it; with
ARTWATCH_REQUIRE_SERVICES=1 (set by .ci/run) it fails them instead, so CI can
never go green on skipped broker or TimescaleDB tests.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import psycopg
import pytest

from infra.settings import Settings

REQUIRE = os.environ.get("ARTWATCH_REQUIRE_SERVICES") == "1"
# A server we may create databases on (CI: the machine's PostgreSQL 15).
ADMIN_DSN = os.environ.get("ARTWATCH_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
SHARED = Path(__file__).resolve().parents[2] / "shared"


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI."""
    if REQUIRE:
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one handed out before in this session:
    the OS may return a just-closed port again, and settings refuse two equal
    local ports."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def _dsn_for(db: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=db)


_CREATED: list[str] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    """Drop the databases this session created."""
    if not _CREATED:
        return
    try:
        with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            for name in _CREATED:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error:
        pass  # best effort; names carry the pid, so a later run never reuses one


def _fresh_database(name: str) -> str:
    try:
        with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        _CREATED.append(name)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {ADMIN_DSN}: {exc}")
    return _dsn_for(name)


@pytest.fixture(scope="session")
def timescale_dsn() -> str:
    """A fresh database with the TimescaleDB extension available."""
    dsn = _fresh_database(f"artwatch_test_ts_{os.getpid()}")
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone() is None:
            unavailable("the timescaledb extension is not installed (../shared/tools/install-timescaledb.sh)")
    return dsn


@pytest.fixture(scope="session")
def plain_dsn() -> str:
    """A fresh database migrated later with timescale='off' (ordinary tables)."""
    return _fresh_database(f"artwatch_test_plain_{os.getpid()}")


@pytest.fixture(scope="session", params=["timescale", "plain"])
def any_dsn(request, timescale_dsn, plain_dsn) -> tuple[str, str]:
    """Both storage paths: (dsn, timescale mode) — migrated."""
    from infra.db.migrate import migrate

    dsn, mode = (timescale_dsn, "on") if request.param == "timescale" else (plain_dsn, "off")
    migrate(dsn, timescale=mode)
    return dsn, mode


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> str:
    """A Tansu broker on a free port for the whole session, on the default
    (durable, S3) storage that users get; ARTWATCH_BROKER_STORAGE=memory runs
    the suite on memory storage instead (test_ingest.py: ~69 s vs ~81 s)."""
    from infra.stack import Stack

    port = free_port()
    settings = Settings(
        broker_url=f"127.0.0.1:{port}",
        database_url=ADMIN_DSN,
        data_dir=tmp_path_factory.mktemp("stack"),
    )
    stack = Stack(settings)
    try:
        stack.up(timeout=60)
    except Exception as exc:  # noqa: BLE001 - reported as skip/fail below
        unavailable(f"broker could not start: {exc}")
    yield settings.broker_url
    stack.down()


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:10]

"""Idempotent schema migrations, TimescaleDB hypertables when available.

Each ``migrations/NNN_name.sql`` runs once per database, recorded in
``schema_migrations``, under an advisory lock so two workers starting together
do not race. Every statement is also written to be re-runnable, and the
hypertable step runs each time (``if_not_exists``), so a database migrated
before the extension was installed is upgraded on the next run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import psycopg

from infra.errors import ConfigError

__all__ = ["migrate", "MigrationReport", "HYPERTABLES"]

log = logging.getLogger(__name__)

# table -> (time column, chunk interval). Punk history spans four years of sparse
# sales, so event chunks are a month; rollup chunks follow their bucket size.
HYPERTABLES: dict[str, tuple[str, str]] = {
    "sales": ("ts", "30 days"),
    "listings": ("ts", "30 days"),
    "bids": ("ts", "30 days"),
    "images": ("ts", "30 days"),
    "alerts": ("ts", "30 days"),
    "rollup_1m": ("bucket", "7 days"),
    "rollup_1h": ("bucket", "90 days"),
}
_LOCK_ID = 0x61727477  # "artw"

TimescaleMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class MigrationReport:
    applied: tuple[str, ...]
    timescale: bool
    hypertables: tuple[str, ...]


def _migration_files() -> list[tuple[str, str]]:
    folder = resources.files("infra.db") / "migrations"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in files]


def _timescale_available(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    return row is not None


def migrate(dsn: str, timescale: TimescaleMode = "auto") -> MigrationReport:
    """Bring the database at ``dsn`` to the latest schema.

    Parameters
    ----------
    dsn
        libpq connection string.
    timescale
        ``auto`` uses TimescaleDB when the extension is installed, ``on``
        requires it (error otherwise), ``off`` keeps plain tables.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            use_ts = timescale == "on" or (timescale == "auto" and _timescale_available(conn))
            if use_ts:
                if not _timescale_available(conn):
                    raise ConfigError(
                        "ARTWATCH_TIMESCALE=on but the timescaledb extension is not installed on this server;"
                        " install it (infra/scripts/install-timescaledb.sh) or use auto/off"
                    )
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in _migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
                log.info("applied migration %s", version)
            hypers: list[str] = []
            if use_ts:
                for table, (column, interval) in HYPERTABLES.items():
                    conn.execute(
                        "SELECT create_hypertable(%s::regclass, %s, chunk_time_interval => %s::interval,"
                        " if_not_exists => TRUE, migrate_data => TRUE)",
                        (table, column, interval),
                    )
                hypers = [
                    r[0]
                    for r in conn.execute(
                        "SELECT hypertable_name FROM timescaledb_information.hypertables"
                        " WHERE hypertable_schema = current_schema() ORDER BY 1"
                    )
                ]
            return MigrationReport(tuple(applied), use_ts, tuple(hypers))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))

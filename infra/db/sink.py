"""Idempotent batched writes: COPY into a temp table, then INSERT ... ON CONFLICT.

One call of :meth:`EventSink.write` is one transaction that inserts a batch,
adds only the newly inserted rows to the 1 min and 1 h rollups, and lets the
caller add dependent rows (alerts, dead letters) before the commit. A replayed
batch (at-least-once delivery) therefore changes nothing: its rows conflict,
nothing is returned as new, and the rollups do not move.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence

import psycopg
from psycopg import sql

from infra.errors import SinkBackpressure

__all__ = ["TableSpec", "EventSink", "WriteResult", "ROLLUP_TABLES"]

log = logging.getLogger(__name__)

ROLLUP_TABLES = {"rollup_1m": "1 minute", "rollup_1h": "1 hour"}
_TRANSIENT = (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


@dataclass(frozen=True)
class TableSpec:
    """How one record kind lands in its table.

    ``price_column`` set means the table feeds the rollups under ``kind``.
    """

    table: str
    columns: tuple[str, ...]
    key: tuple[str, ...] = ("event_id", "ts")
    price_column: Optional[str] = None

    @property
    def staging(self) -> str:
        return f"_stage_{self.table}"


@dataclass(frozen=True)
class WriteResult:
    new_keys: frozenset[tuple[Any, ...]]
    rows: int
    seconds: float


def _insert_sql(spec: TableSpec) -> sql.Composed:
    cols = sql.SQL(", ").join(map(sql.Identifier, spec.columns))
    ret = sql.SQL(", ").join(map(sql.Identifier, spec.key))
    returned = spec.key
    if spec.price_column is not None:
        returned = tuple(dict.fromkeys((*spec.key, "ts", "collection", "currency", "synthetic", spec.price_column)))
    insert = sql.SQL(
        "INSERT INTO {t} ({c}) SELECT {c} FROM {s} ON CONFLICT DO NOTHING RETURNING {r}"
    ).format(
        t=sql.Identifier(spec.table), s=sql.Identifier(spec.staging), c=cols,
        r=sql.SQL(", ").join(map(sql.Identifier, returned)),
    )
    if spec.price_column is None:
        return insert
    # Rollups from the rows this statement inserted, in the same statement.
    price = sql.Identifier(spec.price_column)
    rollups = []
    for name, width in ROLLUP_TABLES.items():
        rollups.append(
            sql.SQL(
                "{n} AS (INSERT INTO {rt} AS r (bucket, collection, kind, currency, n, n_synthetic, volume, min_price, max_price)"
                " SELECT date_bin({w}::interval, ts, timestamptz 'epoch'), collection, {k}, currency,"
                " count(*), count(*) FILTER (WHERE synthetic), sum({p}), min({p}), max({p})"
                " FROM ins GROUP BY 1, 2, 4"
                " ON CONFLICT (collection, kind, currency, bucket) DO UPDATE SET"
                " n = r.n + EXCLUDED.n, n_synthetic = r.n_synthetic + EXCLUDED.n_synthetic,"
                " volume = r.volume + EXCLUDED.volume,"
                " min_price = LEAST(r.min_price, EXCLUDED.min_price),"
                " max_price = GREATEST(r.max_price, EXCLUDED.max_price))"
            ).format(
                n=sql.Identifier(f"up_{name}"), rt=sql.Identifier(name), w=sql.Literal(width),
                k=sql.Literal(spec.table), p=price,
            )
        )
    return sql.SQL("WITH ins AS ({i}), {u} SELECT {r} FROM ins").format(
        i=insert, u=sql.SQL(", ").join(rollups), r=ret
    )


class EventSink:
    """Batched, idempotent writer over one async connection.

    Parameters
    ----------
    conninfo
        libpq connection string.
    specs
        The tables this sink writes.
    retry_max_s
        How long transient database errors are retried (with backoff) before
        :class:`~infra.errors.SinkBackpressure` is raised.
    on_retry
        Called with the exception before each retry (for a metric).
    """

    def __init__(
        self,
        conninfo: str,
        specs: Iterable[TableSpec],
        retry_max_s: float = 30.0,
        on_retry: Optional[Callable[[BaseException], None]] = None,
    ) -> None:
        self.conninfo = conninfo
        self.specs = {s.table: s for s in specs}
        self.retry_max_s = retry_max_s
        self.on_retry = on_retry
        self._conn: Optional[psycopg.AsyncConnection] = None
        self._sql = {t: _insert_sql(s) for t, s in self.specs.items()}

    async def connect(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.conninfo)
            for spec in self.specs.values():
                await conn.execute(
                    sql.SQL(
                        "CREATE TEMP TABLE IF NOT EXISTS {s} (LIKE {t} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                    ).format(s=sql.Identifier(spec.staging), t=sql.Identifier(spec.table))
                )
            await conn.commit()
            self._conn = conn
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def write(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        before_commit: Optional[Callable[[psycopg.AsyncConnection, frozenset], Awaitable[None]]] = None,
    ) -> WriteResult:
        """Insert ``rows`` (tuples in ``TableSpec.columns`` order) exactly once.

        ``before_commit(conn, new_keys)`` runs inside the transaction, so rows
        it writes commit atomically with the batch. Transient errors roll the
        whole transaction back and retry it.
        """
        spec = self.specs[table]
        deadline = time.monotonic() + self.retry_max_s
        delay = 0.05
        while True:
            try:
                return await self._write_once(spec, rows, before_commit)
            except _TRANSIENT as exc:
                if self.on_retry is not None:
                    self.on_retry(exc)
                await self._drop_connection()
                if time.monotonic() + delay > deadline:
                    raise SinkBackpressure(
                        f"database unavailable for {self.retry_max_s:.0f}s writing {table}: {exc}",
                        retry_after=delay,
                    ) from exc
                log.warning("write to %s failed (%s); retrying in %.2fs", table, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # the connection is already broken; closing is best effort
                pass

    async def _write_once(self, spec, rows, before_commit) -> WriteResult:
        started = time.perf_counter()
        conn = await self.connect()
        async with conn.transaction():
            async with conn.cursor() as cur:
                copy_sql = sql.SQL("COPY {s} ({c}) FROM STDIN").format(
                    s=sql.Identifier(spec.staging), c=sql.SQL(", ").join(map(sql.Identifier, spec.columns))
                )
                async with cur.copy(copy_sql) as copy:
                    for row in rows:
                        await copy.write_row(row)
                await cur.execute(self._sql[spec.table])
                new_keys = frozenset(await cur.fetchall())
            if before_commit is not None:
                await before_commit(conn, new_keys)
        return WriteResult(new_keys, len(rows), time.perf_counter() - started)

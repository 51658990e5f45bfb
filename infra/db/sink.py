"""Idempotent batched writes: one transaction per batch, nothing stored twice.

One call of :meth:`EventSink.write` is one transaction that inserts a batch,
folds only the newly inserted rows into the 1 min and 1 h rollups, and lets
the caller add dependent rows (alerts, dead letters) before the commit. A
replayed batch (at-least-once delivery) changes nothing: its rows conflict,
none is new, and the rollups do not move.

Two paths, same result. The fast path COPYs straight into the table inside a
savepoint: when no row exists yet (the steady state) that is all, at the speed
of a plain COPY. A unique violation (a replay after a restart, a redelivered
message) rolls the savepoint back and takes the safe path: COPY into a temp
table, then ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` the new keys.
Measured on this machine the safe path alone runs at ~0.4x a plain COPY
(BENCHMARKS.md), which is why it is not the only path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional, Sequence, TypeVar

import psycopg
from psycopg import sql

from infra.db.rollup import fold, upsert_rollups
from infra.errors import SinkBackpressure

__all__ = ["TableSpec", "EventSink", "WriteResult", "column_types", "ROW_REJECTED"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT = (psycopg.OperationalError, psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
# What a row's own content can make a write fail with (bad text encoding, a
# numeric out of range, a check constraint). Retrying cannot help; the caller
# finds the rows with :meth:`EventSink.rejected_rows` and sets them aside.
# Unique violations are the sink's own business (the safe path).
ROW_REJECTED = (psycopg.DataError, psycopg.errors.CheckViolation, psycopg.errors.NotNullViolation)


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

    @cached_property
    def copy_sql(self) -> sql.Composed:
        """Binary COPY into the table: psycopg formats a row in ~2 µs instead
        of ~3.7 µs for text, and the server skips parsing numerics and times."""
        return _copy_sql(self.table, self.columns)

    @cached_property
    def staging_copy_sql(self) -> sql.Composed:
        return _copy_sql(self.staging, self.columns)

    @cached_property
    def insert_new_sql(self) -> sql.Composed:
        """Staging -> table, keeping only rows not stored yet; returns their keys."""
        cols = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        return sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM {s} ON CONFLICT DO NOTHING RETURNING {k}").format(
            t=sql.Identifier(self.table), s=sql.Identifier(self.staging), c=cols,
            k=sql.SQL(", ").join(map(sql.Identifier, self.key)),
        )

    @cached_property
    def row_key(self) -> Callable[[Sequence[Any]], tuple]:
        """Row tuple -> its key tuple (C-speed getter; always a tuple)."""
        get = itemgetter(*(self.columns.index(k) for k in self.key))
        return get if len(self.key) > 1 else lambda row: (get(row),)

    @cached_property
    def rollup_fields(self) -> Optional[Callable[[Sequence[Any]], tuple]]:
        """Row tuple -> (ts, collection, currency, synthetic, price), or None without rollups."""
        if self.price_column is None:
            return None
        return itemgetter(*(self.columns.index(c) for c in ("ts", "collection", "currency", "synthetic", self.price_column)))


@dataclass(frozen=True)
class WriteResult:
    new_keys: frozenset[tuple[Any, ...]]
    rows: int
    seconds: float


def _copy_sql(table: str, columns: tuple[str, ...]) -> sql.Composed:
    return sql.SQL("COPY {t} ({c}) FROM STDIN (FORMAT BINARY)").format(
        t=sql.Identifier(table), c=sql.SQL(", ").join(map(sql.Identifier, columns))
    )


async def column_types(conn: psycopg.AsyncConnection, table: str, columns: Sequence[str]) -> list[str]:
    """SQL type names of ``columns`` of ``table`` (as the server reports them)."""
    cur = await conn.execute(
        "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (table,),
    )
    types = dict(await cur.fetchall())
    missing = [c for c in columns if c not in types]
    if missing:
        raise psycopg.errors.UndefinedColumn(f"{table} has no column(s) {missing}; run artwatch migrate")
    return [types[c] for c in columns]


async def _close_quietly(conn: psycopg.AsyncConnection) -> None:
    try:
        await conn.close()
    except Exception:  # noqa: BLE001 - it is broken already; closing is best effort
        pass


class EventSink:
    """Batched, idempotent writer over a few async connections.

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
    connections
        At most this many transactions at once (the batch engine keeps one
        committing while it formats the next).
    """

    def __init__(
        self,
        conninfo: str,
        specs: Iterable[TableSpec],
        retry_max_s: float = 30.0,
        on_retry: Optional[Callable[[BaseException], None]] = None,
        connections: int = 2,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        self.conninfo = conninfo
        self.specs = {s.table: s for s in specs}
        self.retry_max_s = retry_max_s
        self.on_retry = on_retry
        self.fallbacks = 0  # batches that took the safe path
        self._types: dict[str, list[str]] = {}  # table -> column types, for binary COPY
        self._idle: list[psycopg.AsyncConnection] = []
        self._slots = asyncio.Semaphore(connections)

    async def _open(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(self.conninfo)
        for spec in self.specs.values():
            self._types[spec.table] = await column_types(conn, spec.table, spec.columns)
            await conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {s} (LIKE {t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                    " ON COMMIT DELETE ROWS"
                ).format(s=sql.Identifier(spec.staging), t=sql.Identifier(spec.table))
            )
        await conn.commit()
        return conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """Borrow a connection; one that saw an error is closed, not reused."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            try:
                yield conn
            except BaseException:
                await _close_quietly(conn)
                raise
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await _close_quietly(conn)
            else:
                self._idle.append(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close_quietly(conn)

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
        return await self._retrying(f"writing {table}", lambda: self._write_once(spec, rows, before_commit))

    async def read(self, what: str, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """``fn(conn)`` in a transaction, retried like a write on transient errors
        (so it must be safe to run twice); ``what`` names it in logs and errors."""

        async def once() -> T:
            async with self.connection() as conn, conn.transaction():
                return await fn(conn)

        return await self._retrying(what, once)

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.retry_max_s
        delay = 0.05
        while True:
            try:
                return await attempt()
            except _TRANSIENT as exc:
                if self.on_retry is not None:
                    self.on_retry(exc)
                if time.monotonic() + delay > deadline:
                    raise SinkBackpressure(
                        f"database unavailable for {self.retry_max_s:.0f}s {what}: {exc}", retry_after=delay,
                    ) from exc
                log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _write_once(self, spec: TableSpec, rows, before_commit) -> WriteResult:
        started = time.perf_counter()
        async with self.connection() as conn, conn.transaction():
            new_rows = await self._insert_new(conn, spec, rows)
            new_keys = frozenset(map(spec.row_key, new_rows))
            if spec.rollup_fields is not None and new_rows:
                await upsert_rollups(conn, spec.table, fold(map(spec.rollup_fields, new_rows)))
            if before_commit is not None:
                await before_commit(conn, new_keys)
        return WriteResult(new_keys, len(rows), time.perf_counter() - started)

    async def _insert_new(self, conn, spec: TableSpec, rows) -> list:
        """Insert ``rows``; return those that were not stored before (first of each key)."""
        if not rows:
            return []
        try:
            async with conn.transaction():  # savepoint: a conflict undoes only this COPY
                await self._copy(conn, spec.copy_sql, self._types[spec.table], rows)
            return list(rows)
        except psycopg.errors.UniqueViolation:
            self.fallbacks += 1
            log.info("%s: batch overlaps stored rows (replay); inserting only the new ones", spec.table)
        await self._copy(conn, spec.staging_copy_sql, self._types[spec.table], rows)
        cur = await conn.execute(spec.insert_new_sql)
        fresh = {tuple(k) for k in await cur.fetchall()}
        new_rows = []
        for r in rows:
            k = spec.row_key(r)
            if k in fresh:
                fresh.discard(k)  # a key twice in one batch is stored once
                new_rows.append(r)
        return new_rows

    async def rejected_rows(self, table: str, rows: Sequence[Sequence[Any]]) -> list[tuple[int, str]]:
        """``(index, error)`` of each row in ``rows`` that the database refuses.

        Bisects the batch with COPYs into the staging table (which carries the
        table's constraints), each in its own savepoint, all rolled back: a
        few dozen statements for one bad row in thousands. Empty when every
        row is fine on its own (then the failure was not a row's fault).
        """
        spec = self.specs[table]
        found: list[tuple[int, str]] = []

        async def probe(conn: psycopg.AsyncConnection, lo: int, hi: int) -> None:
            try:
                async with conn.transaction():  # savepoint
                    await self._copy(conn, spec.staging_copy_sql, self._types[table], rows[lo:hi])
            except ROW_REJECTED as exc:
                if hi - lo == 1:
                    found.append((lo, str(exc).strip()))
                    return
                mid = (lo + hi) // 2
                await probe(conn, lo, mid)
                await probe(conn, mid, hi)

        if rows:
            async with self.connection() as conn, conn.transaction(force_rollback=True):
                await probe(conn, 0, len(rows))
        return found

    @staticmethod
    async def _copy(conn: psycopg.AsyncConnection, statement: sql.Composed, types: list[str], rows) -> None:
        async with conn.cursor() as cur:
            async with cur.copy(statement) as copy:
                copy.set_types(types)
                for row in rows:
                    await copy.write_row(row)

"""Idempotent batched writes: one transaction per batch, nothing stored twice.

One call of :meth:`EventSink.write` is one transaction that inserts a batch,
folds only the newly inserted rows into the 1 min and 1 h rollups, and lets
the caller add dependent rows (alerts, dead letters) before the commit. A
replayed batch (at-least-once delivery) changes nothing: its rows conflict,
none is new, and the rollups do not move.

One identity per event. The tables' keys hold the time (``(event_id, ts)``,
as hypertables require), so the id alone is claimed in ``event_ids`` (kind,
event_id; an ordinary table, migration 002) in the same transaction, with the
row's ts and a digest of its content (:func:`row_digest`). The first stored
version of an event wins: a later one with the same ts and content is a plain
duplicate (counted, dropped); one with another ts or other content is a
*conflicting duplicate*, never stored, rolled up or alerted, and reported in
:attr:`WriteResult.conflicts` for the caller to dead-letter.

Two paths, same result. The fast path COPYs the ids into ``event_ids`` and
the rows straight into the table inside one savepoint: when no id exists yet
(the steady state) that is all. The identity costs ~2 µs per row here (~0.5
µs of it the digest), about a quarter of the sink's throughput: the sink runs
at ~0.5x a plain COPY of the same rows, ~0.7x without it (BENCHMARKS.md).
A unique violation (a replay after a restart, a redelivered or re-sent
message, an id twice in the batch) rolls the savepoint back and takes the
safe path: the batch's first version of each id goes into ``event_ids`` with
``INSERT ... ON CONFLICT DO NOTHING RETURNING``, the ids that were there
already are compared (ts, digest) with the version kept, and only the new
events are inserted (COPY again; a staging table + ``ON CONFLICT`` only for
rows written around the sink). A staging path for every batch measured
~0.4x a plain COPY (BENCHMARKS.md), which is why it is not the only path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from operator import itemgetter
from datetime import datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, NamedTuple, Optional, Sequence, TypeVar

import msgspec
import psycopg
from psycopg import sql

from infra.db.rollup import fold, upsert_rollups
from infra.db.failures import classify, describe
from infra.errors import SinkBackpressure
from infra.retry import Backoff, Throttle

__all__ = ["TableSpec", "EventSink", "WriteResult", "Conflict", "row_digest", "column_types", "ROW_REJECTED"]

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    def identity(self) -> Callable[[Sequence[Any]], tuple]:
        """Row tuple -> (event_id, ts): what ``event_ids`` holds of it."""
        return itemgetter(self.columns.index("event_id"), self.columns.index("ts"))

    @cached_property
    def event_id(self) -> Callable[[Sequence[Any]], Any]:
        return itemgetter(self.columns.index("event_id"))

    @cached_property
    def ts(self) -> Callable[[Sequence[Any]], Any]:
        return itemgetter(self.columns.index("ts"))

    @cached_property
    def rollup_fields(self) -> Optional[Callable[[Sequence[Any]], tuple]]:
        """Row tuple -> (ts, collection, currency, synthetic, price), or None without rollups."""
        if self.price_column is None:
            return None
        return itemgetter(*(self.columns.index(c) for c in ("ts", "collection", "currency", "synthetic", self.price_column)))


class Conflict(NamedTuple):
    """A row whose ``event_id`` is kept already with another ts or other content.

    ``kept`` is the version kept (a row tuple; None when its stored row is
    gone, e.g. dropped by retention), ``kept_index`` its place in this batch
    when it came in this batch (None: stored before). ``differs`` names the
    columns that differ (compared as the digest sees them).
    """

    index: int
    event_id: str
    ts: datetime
    kept_ts: datetime
    kept_index: Optional[int]
    kept: Optional[tuple]
    differs: tuple[str, ...]

    def describe(self) -> str:
        when = "earlier in this batch" if self.kept_index is not None else "already"
        what = ", ".join(self.differs) or "content"
        return (f"event_id {self.event_id!r} is stored {when} (ts {self.kept_ts.isoformat()}); this version differs"
                f" in {what}. The first stored version is kept")


@dataclass(frozen=True)
class WriteResult:
    """``new_keys``: keys of the rows this write stored. ``conflicts``: rows
    refused as conflicting duplicates (see :class:`Conflict`). The rest of
    ``rows`` were plain duplicates of stored events."""

    new_keys: frozenset[tuple[Any, ...]]
    rows: int
    seconds: float
    conflicts: tuple[Conflict, ...] = ()

    @property
    def duplicates(self) -> int:
        return self.rows - len(self.new_keys) - len(self.conflicts)


_PACK = msgspec.msgpack.Encoder().encode


def row_digest(row: Sequence[Any]) -> bytes:
    """16-byte digest of a row tuple's content: blake2b of its msgpack encoding.

    msgpack is canonical for these types: a timestamp is its UTC instant (any
    zone, and as read back from the database), a Decimal its string as
    written, so ``2.0`` and ``2.00`` differ (they are stored differently too).
    ~0.7 µs per sales row here, about 5 % of the worker's CPU per event.

    Examples
    --------
    >>> from datetime import timedelta, timezone
    >>> t = datetime(2021, 1, 1, 12, tzinfo=timezone.utc)
    >>> row_digest(("e", t)) == row_digest(("e", t.astimezone(timezone(timedelta(hours=8)))))
    True
    >>> len(row_digest(("e", t))), row_digest(("e", t)) == row_digest(("e", t, None))
    (16, False)
    """
    return hashlib.blake2b(_PACK(row), digest_size=16).digest()


# event_ids (migration 002): the fast path COPYs (kind, event_id, ts, digest);
# the safe path inserts each id's first version and reads back the others.
_IDS_COPY = sql.SQL("COPY event_ids (kind, event_id, ts, digest) FROM STDIN (FORMAT BINARY)")
_IDS_TYPES = ["text", "text", "timestamptz", "bytea"]
_IDS_INSERT = (
    "INSERT INTO event_ids (kind, event_id, ts, digest)"
    " SELECT %s::text, * FROM unnest(%s::text[], %s::timestamptz[], %s::bytea[])"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)
_IDS_KNOWN = "SELECT event_id, ts, digest FROM event_ids WHERE kind = %s AND event_id = ANY(%s)"
_IDS_FILL = (
    "UPDATE event_ids i SET digest = d.digest FROM unnest(%s::text[], %s::bytea[]) AS d(event_id, digest)"
    " WHERE i.kind = %s AND i.event_id = d.event_id AND i.digest IS NULL"
)


def _differs(spec: TableSpec, row: Sequence[Any], kept: Optional[Sequence[Any]], ts_differs: bool) -> tuple[str, ...]:
    """Names of the columns in which ``row`` differs from ``kept`` (as :func:`row_digest` sees them)."""
    if kept is None:
        return ("ts",) if ts_differs else ()
    return tuple(c for c, a, b in zip(spec.columns, row, kept) if _PACK(a) != _PACK(b))


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
        How long transient database errors (:func:`infra.db.failures.classify`)
        are retried, with backoff, before :class:`~infra.errors.SinkBackpressure`
        is raised; checked before each attempt too. Deterministic errors are
        raised at once, as they are.
    on_retry
        Called with the exception before each retry (for a metric, the health).
    connections
        At most this many transactions at once (the batch engine keeps one
        committing while it formats the next).
    connect_timeout_s, statement_timeout_s, lock_timeout_s
        Every wait on the server has a limit: libpq's connect_timeout (whole
        seconds), and the sessions' statement_timeout and lock_timeout (a
        timeout is transient: retried).
    backoff_max_s
        Cap of the exponential, jittered backoff between retries.
    on_recovered
        Called when an attempt succeeds after failed ones (the health).
    """

    def __init__(
        self,
        conninfo: str,
        specs: Iterable[TableSpec],
        retry_max_s: float = 30.0,
        on_retry: Optional[Callable[[BaseException], None]] = None,
        connections: int = 2,
        connect_timeout_s: int = 5,
        statement_timeout_s: float = 60.0,
        lock_timeout_s: float = 10.0,
        backoff_max_s: float = 5.0,
        on_recovered: Optional[Callable[[], None]] = None,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        self.conninfo = conninfo
        self.specs = {s.table: s for s in specs}
        self.retry_max_s = retry_max_s
        self.on_retry = on_retry
        self.on_recovered = on_recovered
        self.backoff_max_s = backoff_max_s
        self.statement_timeout_ms = max(1, round(statement_timeout_s * 1000))
        self.lock_timeout_ms = max(1, round(lock_timeout_s * 1000))
        # A peer that vanishes without a reset (a cut cable, a blackholed
        # address) would leave a read waiting forever: keepalives find it in
        # ~20 s idle, tcp_user_timeout when sent data stays unacknowledged.
        self._connect_args = {
            "connect_timeout": max(2, int(connect_timeout_s)), "keepalives": 1, "keepalives_idle": 10,
            "keepalives_interval": 5, "keepalives_count": 2, "tcp_user_timeout": 30_000,
        }
        self._log_every = Throttle(10.0)  # one warning per ~10 s through an outage of any length
        self.fallbacks = 0  # batches that took the safe path
        self._types: dict[str, list[str]] = {}  # table -> column types, for binary COPY
        self._idle: list[psycopg.AsyncConnection] = []
        self._slots = asyncio.Semaphore(connections)

    async def _open(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(self.conninfo, **self._connect_args)
        try:
            # Session limits first: even the temp table below waits for a lock on its table.
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
                (f"{self.statement_timeout_ms}ms", f"{self.lock_timeout_ms}ms"),
            )
            for spec in self.specs.values():
                self._types[spec.table] = await column_types(conn, spec.table, spec.columns)
                await conn.execute(
                    sql.SQL(
                        "CREATE TEMP TABLE IF NOT EXISTS {s} (LIKE {t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                        " ON COMMIT DELETE ROWS"
                    ).format(s=sql.Identifier(spec.staging), t=sql.Identifier(spec.table))
                )
            await conn.commit()
        except BaseException:
            await _close_quietly(conn)  # a half-opened session is not kept (nor left to the GC)
            raise
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
        before_commit: Optional[
            Callable[[psycopg.AsyncConnection, frozenset, tuple[Conflict, ...]], Awaitable[None]]
        ] = None,
    ) -> WriteResult:
        """Insert the events of ``rows`` (tuples in ``TableSpec.columns`` order) exactly once.

        ``before_commit(conn, new_keys, conflicts)`` runs inside the
        transaction, so rows it writes (alerts, the conflicts' dead letters)
        commit atomically with the batch. It may run more than once: transient
        errors roll the whole transaction back and retry it.
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
        started = time.monotonic()
        deadline = started + self.retry_max_s
        backoff = Backoff(0.05, self.backoff_max_s)
        failures = 0
        while True:
            try:
                result = await attempt()
            except Exception as exc:
                failure = classify(exc)
                if not failure.transient:
                    raise  # deterministic: the caller reports it (or dead-letters the row)
                failures += 1
                if self.on_retry is not None:
                    self.on_retry(exc)
                delay, now = backoff.next(), time.monotonic()
                if now + delay > deadline:  # checked before each attempt, not only after a failure
                    raise SinkBackpressure(
                        f"database unavailable for {now - started:.0f}s {what} ({describe(exc)})",
                        retry_after=delay, reason=failure.reason,
                    ) from exc
                if self._log_every.ready():
                    log.warning("%s failed (%s); retrying in %.2fs (attempt %d)", what, describe(exc), delay,
                                failures + 1)
                await asyncio.sleep(delay)
                continue
            if failures:
                self._log_every.reset()
                log.info("%s succeeded after %d failed attempt(s) in %.1fs", what, failures,
                         time.monotonic() - started)
                if self.on_recovered is not None:
                    self.on_recovered()
            return result

    async def _write_once(self, spec: TableSpec, rows, before_commit) -> WriteResult:
        started = time.perf_counter()
        async with self.connection() as conn, conn.transaction():
            new_rows, conflicts = await self._insert_new(conn, spec, rows)
            new_keys = frozenset(map(spec.row_key, new_rows))
            if spec.rollup_fields is not None and new_rows:
                await upsert_rollups(conn, spec.table, fold(map(spec.rollup_fields, new_rows)))
            if before_commit is not None:
                await before_commit(conn, new_keys, conflicts)
        return WriteResult(new_keys, len(rows), time.perf_counter() - started, conflicts)

    async def _insert_new(self, conn, spec: TableSpec, rows) -> tuple[list, tuple[Conflict, ...]]:
        """Insert the events of ``rows`` whose id is new; return those rows and the conflicting duplicates."""
        if not rows:
            return [], ()
        kind = spec.table
        digests = list(map(row_digest, rows))
        # id rows built by map/zip (C loops): this runs for every event
        ids = zip(repeat(kind), map(spec.event_id, rows), map(spec.ts, rows), digests)
        try:
            async with conn.transaction():  # savepoint: a conflict undoes only these COPYs
                # ids first: a repeated id fails here, before the bigger COPY
                await self._copy(conn, _IDS_COPY, _IDS_TYPES, ids)
                await self._copy(conn, spec.copy_sql, self._types[spec.table], rows)
            return list(rows), ()
        except psycopg.errors.UniqueViolation:
            self.fallbacks += 1
            log.info("%s: batch repeats event ids (a replay or a re-send); inserting only the new ones", kind)
        return await self._insert_new_safely(conn, spec, rows, digests)

    async def _insert_new_safely(self, conn, spec: TableSpec, rows, digests: list[bytes]):
        """The safe path of :meth:`_insert_new`: claim each id's first version in
        ``event_ids``, compare every other version with the one kept."""
        kind, ident = spec.table, spec.identity
        first: dict[str, int] = {}  # event_id -> index of its first version in the batch
        for i, r in enumerate(rows):
            first.setdefault(ident(r)[0], i)
        heads = [ident(rows[i]) for i in first.values()]
        cur = await conn.execute(
            _IDS_INSERT, (kind, [e for e, _ in heads], [t for _, t in heads], [digests[i] for i in first.values()])
        )
        fresh = {r[0] for r in await cur.fetchall()}
        # event_id -> (ts, digest, index in this batch or None) of the version kept
        kept: dict[str, tuple[datetime, Optional[bytes], Optional[int]]] = {
            e: (ident(rows[i])[1], digests[i], i) for e, i in first.items() if e in fresh
        }
        stored: dict[str, tuple] = {}  # event_id -> its stored row, where read back
        old = [e for e in first if e not in fresh]
        if old:
            # A new statement: under READ COMMITTED it sees ids a concurrent
            # batch committed while the INSERT above waited for it.
            cur = await conn.execute(_IDS_KNOWN, (kind, old))
            known = {e: (t, d) for e, t, d in await cur.fetchall()}
            if len(known) != len(old):
                lost = sorted(set(old) - set(known))[:5]
                raise RuntimeError(f"event_ids: {kind} ids neither inserted nor found: {lost}")
            # Read back the stored rows of ids repeated with another ts or
            # digest (for Conflict.kept), or stored before digests existed.
            suspect = {
                e: known[e][0] for i, r in enumerate(rows) if (e := ident(r)[0]) in known
                and (known[e][1] is None or ident(r)[1] != known[e][0] or digests[i] != known[e][1])
            }
            if suspect:
                stored = await self._stored_rows(conn, spec, suspect)
                filled = {e: row_digest(row) for e, row in stored.items() if known[e][1] is None}
                if filled:
                    await conn.execute(_IDS_FILL, (list(filled), list(filled.values()), kind))
                    known.update((e, (known[e][0], d)) for e, d in filled.items())
            # A stored row gone (retention) with no digest: same ts counts as a plain duplicate.
            kept.update((e, (t, d, None)) for e, (t, d) in known.items())
        new_rows, conflicts = [], []
        for i, r in enumerate(rows):
            e, ts = ident(r)
            kts, kdigest, ki = kept[e]
            if ki == i:
                new_rows.append(r)
            elif ts != kts or (kdigest is not None and digests[i] != kdigest):
                krow = rows[ki] if ki is not None else stored.get(e)
                conflicts.append(Conflict(i, e, ts, kts, ki, krow, _differs(spec, r, krow, ts != kts)))
        return await self._insert_rows(conn, spec, new_rows), tuple(conflicts)

    async def _stored_rows(self, conn, spec: TableSpec, keys: dict[str, datetime]) -> dict[str, tuple]:
        """event_id -> stored row (``spec.columns`` order) for ``keys`` (event_id -> ts)."""
        q = sql.SQL(
            "SELECT {c} FROM {t} t JOIN unnest(%s::text[], %s::timestamptz[]) AS k(event_id, ts)"
            " ON t.event_id = k.event_id AND t.ts = k.ts"
        ).format(c=sql.SQL(", ").join(sql.Identifier("t", c) for c in spec.columns), t=sql.Identifier(spec.table))
        cur = await conn.execute(q, (list(keys), list(keys.values())))
        eid = spec.columns.index("event_id")
        return {row[eid]: row for row in await cur.fetchall()}

    async def _insert_rows(self, conn, spec: TableSpec, rows: list) -> list:
        """Insert rows whose ids were just claimed (one per id); return those stored."""
        if not rows:
            return []
        try:
            async with conn.transaction():  # savepoint
                await self._copy(conn, spec.copy_sql, self._types[spec.table], rows)
            return rows
        except psycopg.errors.UniqueViolation:
            # Only a row written around the sink (no event_ids entry) gets here;
            # the stored one stays, as the old key rule had it.
            log.warning("%s: rows stored without an event_ids entry; keeping the stored ones", spec.table)
        await self._copy(conn, spec.staging_copy_sql, self._types[spec.table], rows)
        cur = await conn.execute(spec.insert_new_sql)
        fresh = {tuple(k) for k in await cur.fetchall()}
        return [r for r in rows if spec.row_key(r) in fresh]

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

"""Idempotent batched writes: one transaction per batch, nothing stored twice.

One call of :meth:`EventSink.write` is one transaction that inserts a batch,
folds only the newly inserted rows into the 1 min and 1 h rollups, and lets
the caller add dependent rows (alerts, dead letters) before the commit. A
replayed batch (at-least-once delivery) changes nothing: its rows conflict,
none is new, and the rollups do not move.

One identity per event. The tables' keys hold the time (``(event_id, ts)``,
as hypertables require), so the id alone is claimed in ``event_ids`` (kind,
event_id, ts; an ordinary table partitioned by kind, each kind's partition
keyed by the id alone, migration 002) in the same transaction. The first
stored version of an event wins: a later one with the same ts and content is
a plain duplicate (counted, dropped); one with another ts or other content is
a *conflicting duplicate*, never stored, rolled up or alerted, and reported in
:attr:`WriteResult.conflicts` for the caller to dead-letter. "The same
content" means what storing it would keep (:func:`_same_as_stored`): equal
values, numerics with the same scale (``2.0`` and ``2.00`` differ, ``1E+3``
and ``1000`` are stored alike).

Two paths, same result. The fast path COPYs the ids (kind, event_id, ts) into
their kind's partition of ``event_ids`` and the rows straight into the table
inside one savepoint: when no id exists yet (the steady state) that is all,
nothing hashed or compared (the id rows are the rows' id and ts, taken by
C-level ``map``/``zip``). The identity then costs ~0.7 µs of client CPU per
row (building and sending the id rows) and ~1.5 µs of server CPU (the second
insert, heap and unique index), against ~1.8 and ~2.0 with a content digest
in ``event_ids`` keyed (kind, event_id) (BENCHMARKS.md, 2026-11-30). A
unique violation (a replay after a restart, a redelivered or re-sent
message, an id twice in the batch) rolls the savepoint back and takes the
safe path, where all the content comparison lives: the batch's ids are
looked up in ``event_ids``, the others' first versions claimed with ``INSERT
... ON CONFLICT DO NOTHING RETURNING``; for the ids that were there already
the stored rows are read back from the event table at the ts ``event_ids``
holds (one query per batch) and compared column by column; a later version
of an id new in this batch is compared with its first one; only the new
events are inserted (COPY again; a staging table + ``ON CONFLICT`` only for
rows written around the sink). A staging path for every batch measured ~0.4x
a plain COPY (BENCHMARKS.md), which is why it is not the only path.

A stored row that is gone (deleted by hand or by a retention policy) while
its id stays in ``event_ids``: the id is still never stored again. A version
with another ts is a conflicting duplicate (``Conflict.kept`` None, differs
``("ts",)``); one with the same ts is counted as a plain duplicate, since
there is nothing left to compare its content with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from operator import itemgetter
from datetime import datetime
from decimal import Decimal
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, NamedTuple, Optional, Sequence, TypeVar

import msgspec
import psycopg
from psycopg import sql

from infra.db.rollup import fold, upsert_rollups
from infra.db.failures import AttemptTimeout, classify, describe
from infra.errors import SinkBackpressure
from infra.retry import Backoff, Throttle

__all__ = ["TableSpec", "EventSink", "WriteResult", "Conflict", "column_types", "ROW_REJECTED"]

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
    gone, deleted or dropped by retention), ``kept_index`` its place in this
    batch when it came in this batch (None: stored before). ``differs`` names
    the columns that differ (compared as stored, :func:`_same_as_stored`).
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


def _same_as_stored(a: Any, b: Any) -> bool:
    """Whether two values of a column are stored alike: equal, and for a
    numeric the same scale too (psycopg sends a Decimal's own digits; the
    server keeps ``max(0, -exponent)`` decimals).

    Compares a row as sent with the row read back from the table: an aware
    datetime is its instant whatever its zone, ``2.0`` and ``2.00`` differ (and
    are stored differently), ``1E+3`` and ``1000`` do not (both are stored as
    ``1000``).

    Examples
    --------
    >>> from datetime import timedelta, timezone
    >>> t = datetime(2021, 1, 1, 12, tzinfo=timezone.utc)
    >>> _same_as_stored(t, t.astimezone(timezone(timedelta(hours=8))))
    True
    >>> _same_as_stored(Decimal("2.0"), Decimal("2.00")), _same_as_stored(Decimal("1E+3"), Decimal("1000"))
    (False, True)
    >>> _same_as_stored(None, ""), _same_as_stored(b"x", b"x")
    (False, True)
    """
    if type(a) is Decimal and type(b) is Decimal:
        if a.compare_total(b) == 0:  # the same digits and exponent (~0.1 µs; as_tuple() ~0.4)
            return True
        if not (a.is_finite() and b.is_finite()):  # NaN, Infinity (the edge refuses them)
            return False
        return a == b and min(a.as_tuple().exponent, 0) == min(b.as_tuple().exponent, 0)
    return a == b


def _differs(spec: TableSpec, row: Sequence[Any], kept: Sequence[Any], numeric: Sequence[int] = ()) -> tuple[str, ...]:
    """Names of the columns in which ``row`` and ``kept`` are not stored alike.

    ``numeric``: the places of the numeric columns. Tuples that compare equal
    (one C-level comparison, the common case of a replay) can then only differ
    in a numeric's scale, which ``==`` does not see: ~0.8 µs a sales row read
    back instead of ~2.6 column by column.
    """
    if row == kept:
        for i in numeric:
            if not _same_as_stored(row[i], kept[i]):
                break
        else:
            return ()
    return tuple(c for c, a, b in zip(spec.columns, row, kept) if not _same_as_stored(a, b))


# event_ids (migration 002): partitioned by kind, each kind's partition keyed by
# event_id alone. The fast path COPYs (kind, event_id, ts) into the kind's own
# partition when it has one (the parent routes each row otherwise, ~0.1 µs more
# per row); the safe path inserts each id's first version through the parent
# and reads back the others.
_IDS_TYPES = ["text", "text", "timestamptz"]
_IDS_PARTITION = (
    "SELECT n.nspname, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE i.inhparent = 'event_ids'::regclass"
    " AND pg_get_expr(c.relpartbound, c.oid) = format('FOR VALUES IN (%%L)', %s::text)"
)
# The ids a batch claims on the safe path travel as one JSON document of
# [event_id, ts] pairs: msgspec writes it in C (RFC 3339, microseconds and zone
# kept), where psycopg dumps a timestamptz[] element by element (~2.3 µs each).
_KEYS_JSON = msgspec.json.Encoder().encode
_KEYS = "(SELECT x->>0 AS event_id, (x->>1)::timestamptz AS ts FROM json_array_elements(%s::json) x)"
_IDS_INSERT = (
    "INSERT INTO event_ids (kind, event_id, ts) SELECT %s::text, k.event_id, k.ts FROM " + _KEYS + " k"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)
_IDS_KNOWN = "SELECT event_id, ts FROM event_ids WHERE kind = %s AND event_id = ANY(%s)"


async def _known_ids(conn: psycopg.AsyncConnection, kind: str, ids: list[str]) -> dict[str, datetime]:
    """event_id -> ts of those of ``ids`` that ``event_ids`` holds under ``kind``."""
    cur = await conn.execute(_IDS_KNOWN, (kind, ids))
    return dict(await cur.fetchall())


def _ids_copy_sql(target: sql.Composable) -> sql.Composed:
    return sql.SQL("COPY {t} (kind, event_id, ts) FROM STDIN (FORMAT BINARY)").format(t=target)


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


# An attempt's client-side limit is the session's statement_timeout plus
# libpq's connect_timeout plus this (set-up, the commit, the event loop's own delays).
ATTEMPT_MARGIN_S = 5.0
_UNWIND_S = 5.0  # how long an abandoned attempt is given to unwind before it is left behind
# The connections the running attempt holds (set per attempt task by EventSink._bounded).
_HELD: ContextVar[Optional[set]] = ContextVar("artwatch_sink_attempt_connections", default=None)


def _cut(conn: psycopg.AsyncConnection) -> None:
    """Shut ``conn``'s socket down under psycopg: a read or write it waits in
    ends at once (EOF: the server closed the connection), and the server, if it
    hears anything, hears the client leave. Cancelling the waiting task
    instead makes psycopg send a query cancel and wait for the silent server
    again (up to ~10 s), and then roll back on the same dead connection."""
    try:
        fd = conn.pgconn.socket
    except Exception:  # noqa: BLE001 - closed already
        return
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:  # a duplicate: shutdown() acts on the socket itself
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # an abandoned attempt's error was replaced by AttemptTimeout


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
        timeout is transient: retried). And each attempt (a write's or a
        read's whole transaction, with the connect) has a client-side one,
        ``attempt_timeout_s`` = statement_timeout + connect_timeout +
        ``ATTEMPT_MARGIN_S``: a frozen server, or a route that swallows the
        bytes while TCP still acknowledges them, answers nothing, so neither
        the server's limits nor keepalives end the wait. Past it the attempt
        is abandoned (:class:`~infra.db.failures.AttemptTimeout`, transient),
        its connection cut and closed, and retried on a new one.
    backoff_max_s
        Cap of the exponential, jittered backoff between retries.
    on_recovered
        Called when an attempt succeeds while no other call of this sink is
        failing, after ``on_retry`` was called (the health: this sink is well
        again). Calls run at once (batches in flight, the outbox, the rule's
        warm-up): one that gets through while another still retries does
        not report the sink well.
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
        # Neither helps when the peer's TCP still acknowledges (a frozen
        # server, a middlebox that swallows the bytes): a limit of our own.
        self.attempt_timeout_s = statement_timeout_s + self._connect_args["connect_timeout"] + ATTEMPT_MARGIN_S
        self._failing = 0  # calls of _retrying now between a failed attempt and their end
        self._degraded = False  # on_retry called, on_recovered not since
        self._running: dict[object, tuple[float, str]] = {}  # attempt -> (when it started, what it does)
        self._log_every = Throttle(10.0)  # one warning per ~10 s through an outage of any length
        self.fallbacks = 0  # batches that took the safe path
        self._types: dict[str, list[str]] = {}  # table -> column types, for binary COPY
        self._ids_copy: dict[str, sql.Composed] = {}  # table -> COPY into its event_ids partition
        self._numeric: dict[str, tuple[int, ...]] = {}  # table -> places of its numeric columns
        self._idle: list[psycopg.AsyncConnection] = []
        self._slots = asyncio.Semaphore(connections)

    async def _open(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(self.conninfo, **self._connect_args)
        held = _HELD.get()
        if held is not None:
            held.add(conn)  # a set-up that stalls is cut like the rest of the attempt
        try:
            # Session limits first: even the temp table below waits for a lock on its table.
            limits = {
                "statement_timeout": f"{self.statement_timeout_ms}ms",
                "lock_timeout": f"{self.lock_timeout_ms}ms",
                # A transaction whose client was cut off without the server
                # hearing of it (an abandoned attempt behind a dead route) must
                # not hold its locks against the retry for longer than an attempt.
                "idle_in_transaction_session_timeout": f"{max(1, round(self.attempt_timeout_s * 1000))}ms",
            }
            if conn.info.server_version >= 140000:
                # A backend whose client left mid-statement (an abandoned
                # attempt, cut) stops within a second, not at the statement's end.
                limits["client_connection_check_interval"] = "1000ms"
            await conn.execute(
                "SELECT " + ", ".join(["set_config(%s, %s, false)"] * len(limits)),
                [v for kv in limits.items() for v in kv],
            )
            for spec in self.specs.values():
                self._types[spec.table] = await column_types(conn, spec.table, spec.columns)
                self._numeric[spec.table] = tuple(i for i, t in enumerate(self._types[spec.table]) if t == "numeric")
                cur = await conn.execute(_IDS_PARTITION, (spec.table,))
                part = await cur.fetchone()
                self._ids_copy[spec.table] = _ids_copy_sql(
                    sql.Identifier(*part) if part else sql.Identifier("event_ids"))
                await conn.execute(
                    sql.SQL(
                        "CREATE TEMP TABLE IF NOT EXISTS {s} (LIKE {t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                        " ON COMMIT DELETE ROWS"
                    ).format(s=sql.Identifier(spec.staging), t=sql.Identifier(spec.table))
                )
            await conn.commit()
        except BaseException:
            if held is not None:
                held.discard(conn)
            await _close_quietly(conn)  # a half-opened session is not kept (nor left to the GC)
            raise
        return conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """Borrow a connection; one that saw an error is closed, not reused.

        Inside an attempt (:meth:`_retrying`) the connection is known to it,
        so an attempt past its limit can cut it."""
        async with self._slots:
            held = _HELD.get()
            conn = self._idle.pop() if self._idle else await self._open()
            if held is not None:
                held.add(conn)
            try:
                yield conn
            except BaseException:
                await _close_quietly(conn)
                raise
            finally:
                if held is not None:
                    held.discard(conn)
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
        try:
            while True:
                try:
                    result = await self._bounded(what, attempt)
                except Exception as exc:
                    failure = classify(exc)
                    if not failure.transient:
                        raise  # deterministic: the caller reports it (or dead-letters the row)
                    if not failures:
                        self._failing += 1
                    failures += 1
                    self._degraded = True
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
                    self._failing -= 1
                    failures, failed = 0, failures
                    self._log_every.reset()
                    log.info("%s succeeded after %d failed attempt(s) in %.1fs", what, failed,
                             time.monotonic() - started)
                # Well again only when no other call of this sink still fails
                # (one that gave up, SinkBackpressure, left _degraded set: the
                # next call to get through reports it).
                if self._degraded and not self._failing:
                    self._degraded = False
                    if self.on_recovered is not None:
                        self.on_recovered()
                return result
        finally:
            if failures:  # left failing: raised or cancelled
                self._failing -= 1

    def waiting(self) -> tuple[float, str]:
        """``(seconds, what)`` of the oldest attempt now running (``(0.0, "")``:
        none runs): how long it has waited for the database, and what it is
        (as named in logs). A stall with no error yet shows here."""
        if not self._running:
            return 0.0, ""
        started, what = min(self._running.values())
        return time.monotonic() - started, what

    async def _bounded(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` within ``attempt_timeout_s``. Past it the connections
        the attempt holds are cut (its waits end at once, as on a lost
        connection, and :meth:`connection` closes them), it is given
        ``_UNWIND_S`` to unwind (then cancelled, then left behind), and
        :class:`~infra.db.failures.AttemptTimeout` is raised."""
        held: set = set()

        async def run() -> T:
            _HELD.set(held)  # in this task's own context
            return await attempt()

        self._running[token := object()] = (time.monotonic(), what)
        try:
            return await self._within_limit(asyncio.ensure_future(run()), held)
        finally:
            del self._running[token]

    async def _within_limit(self, task: asyncio.Future, held: set):
        try:
            done, _ = await asyncio.wait({task}, timeout=self.attempt_timeout_s)
        except asyncio.CancelledError:  # the caller stops: so does the attempt, without waiting on the server
            for conn in list(held):
                _cut(conn)
            task.cancel()
            await asyncio.wait({task}, timeout=_UNWIND_S)
            if not task.done():
                task.add_done_callback(_retrieve)
            raise
        if done:
            return task.result()
        for conn in list(held):
            _cut(conn)
        done, _ = await asyncio.wait({task}, timeout=_UNWIND_S)
        if not done:  # not waiting on a socket it holds (e.g. connecting): cancel it
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=_UNWIND_S)
        if done:
            _retrieve(task)
        else:
            task.add_done_callback(_retrieve)
            log.warning("an abandoned database attempt did not unwind within %.0fs; left to finish by itself",
                        2 * _UNWIND_S)
        raise AttemptTimeout(
            f"no answer from the database within {self.attempt_timeout_s:g}s (statement_timeout"
            f" {self.statement_timeout_ms / 1000:g}s + connect_timeout {self._connect_args['connect_timeout']}s"
            f" + {ATTEMPT_MARGIN_S:g}s); the attempt was abandoned and its connection dropped"
        )

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
        # id rows built by map/zip (C loops): this runs for every event
        ids = zip(repeat(kind), map(spec.event_id, rows), map(spec.ts, rows))
        try:
            async with conn.transaction():  # savepoint: a conflict undoes only these COPYs
                # ids first: a repeated id fails here, before the bigger COPY
                await self._copy(conn, self._ids_copy[kind], _IDS_TYPES, ids)
                await self._copy(conn, spec.copy_sql, self._types[spec.table], rows)
            return list(rows), ()
        except psycopg.errors.UniqueViolation:
            self.fallbacks += 1
            log.info("%s: batch repeats event ids (a replay or a re-send); inserting only the new ones", kind)
        return await self._insert_new_safely(conn, spec, rows)

    async def _insert_new_safely(self, conn, spec: TableSpec, rows):
        """The safe path of :meth:`_insert_new`: look the batch's ids up in
        ``event_ids``, claim the first version of each other one, and compare
        every other version with the one kept (in this batch, or stored
        before: read back from the table)."""
        kind, ident = spec.table, spec.identity
        first: dict[str, int] = {}  # event_id -> index of its first version in the batch
        for i, r in enumerate(rows):
            first.setdefault(ident(r)[0], i)
        # The ids stored before (a replay: usually all of them) are looked up,
        # only the others are claimed: a conflicting INSERT costs ~4.5 µs an id
        # here, a lookup ~2.
        known = await _known_ids(conn, kind, list(first))  # event_id -> ts of the version kept
        fresh: set[str] = set()
        if claim := [e for e in first if e not in known]:
            heads = _KEYS_JSON([ident(rows[first[e]]) for e in claim]).decode()
            cur = await conn.execute(_IDS_INSERT, (kind, heads))
            fresh = {r[0] for r in await cur.fetchall()}
            if raced := [e for e in claim if e not in fresh]:
                # Committed by a concurrent batch while the INSERT waited for it:
                # under READ COMMITTED a new statement sees them, and the rows
                # that batch committed with them.
                known.update(await _known_ids(conn, kind, raced))
                if lost := [e for e in raced if e not in known]:
                    raise RuntimeError(f"event_ids: {kind} ids neither inserted nor found: {sorted(lost)[:5]}")
        stored = await self._stored_rows(conn, spec, known) if known else {}  # event_id -> its stored row
        numeric = self._numeric.get(spec.table, ())
        new_rows, conflicts = [], []
        for i, r in enumerate(rows):
            e, ts = ident(r)
            if e in fresh:
                ki = first[e]
                if ki == i:
                    new_rows.append(r)
                    continue
                kts, krow = ident(rows[ki])[1], rows[ki]
            else:
                ki, kts, krow = None, known[e], stored.get(e)
            if krow is None:  # the stored row is gone: only the ts can still be told
                if ts != kts:
                    conflicts.append(Conflict(i, e, ts, kts, None, None, ("ts",)))
            elif differs := _differs(spec, r, krow, numeric):
                conflicts.append(Conflict(i, e, ts, kts, ki, krow, differs))
        return await self._insert_rows(conn, spec, new_rows), tuple(conflicts)

    async def _stored_rows(self, conn, spec: TableSpec, keys: dict[str, datetime]) -> dict[str, tuple]:
        """event_id -> stored row (``spec.columns`` order) for ``keys`` (event_id -> ts); a key
        whose row is gone is left out.

        One index scan per chunk in the keys' ts range (chunks outside it
        excluded when planning), every key looked up in the table's key index
        by ``event_id = ANY(...)``; rows of an id at another ts (only ever
        written around the sink) are dropped here. A join on (event_id, ts)
        either hashes every row in range or, kept to index probes (``LATERAL
        ... LIMIT 1``), pays TimescaleDB's per-probe chunk exclusion: 4,000
        keys in a 1M-row, 47-chunk table took 12 ms this way against 53 for
        the probes (keys of 5 days) and 153 against 278 (keys spread over
        all chunks) (BENCHMARKS.md 2026-11-30).
        """
        q = sql.SQL("SELECT {c} FROM {t} WHERE event_id = ANY(%s::text[]) AND ts BETWEEN %s AND %s").format(
            c=sql.SQL(", ").join(map(sql.Identifier, spec.columns)), t=sql.Identifier(spec.table))
        cur = await conn.execute(q, (list(keys), min(keys.values()), max(keys.values())))
        ident = spec.identity
        return {e: row for row in await cur.fetchall() if keys[(e := ident(row)[0])] == ident(row)[1]}

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

"""What a database error means: wait it out (transient) or stop (deterministic).

psycopg raises ``OperationalError`` for both kinds (a lost connection and a
full disk alike), so errors are classified by SQLSTATE class, not by Python
type. Transient: the server is away or not ready yet, or this transaction lost
a race or waited past a limit; the same work can succeed later, so it is
retried with backoff for as long as it takes. Deterministic: retrying cannot
help (disk full, out of memory, a program limit, a missing table or
privilege, a server misconfiguration); the worker reports it once and stops.
A refused connection carries no SQLSTATE, so there the server's words decide
(a missing database or role, failed authentication: configuration).
A row's own bad content (class 22/23) is deterministic too, but the pipeline
catches it first (``infra.db.sink.ROW_REJECTED``) and dead-letters the row.
An attempt the server never answers (frozen, or a route that swallows the
bytes while TCP still acknowledges them) carries no error at all: the sink
abandons it at its own limit (:class:`AttemptTimeout`, transient).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import psycopg

from infra.errors import SinkBackpressure

__all__ = ["Failure", "AttemptTimeout", "classify", "describe", "RETRY_REASONS"]


class AttemptTimeout(Exception):
    """A database attempt got no answer within the sink's client-side limit
    (statement_timeout + connect_timeout + a margin) and was abandoned, its
    connection dropped. Not a ``TimeoutError``: that would read as the broker's."""


@dataclass(frozen=True)
class Failure:
    """``reason`` is a short class name from a bounded set (a metric label)."""

    transient: bool
    reason: str
    sqlstate: Optional[str] = None


_TRANSIENT_STATES = {
    "57P01": "shutdown", "57P02": "shutdown", "57P03": "shutdown",  # admin/crash shutdown, cannot connect now
    "53300": "too_many_connections",
    "40001": "serialization", "40P01": "deadlock",
    "55P03": "lock_timeout",  # lock_not_available: lock_timeout ran out
    "57014": "statement_timeout",  # query_canceled: statement_timeout ran out
    "25006": "read_only",  # a standby answers: the address is failing over to a new primary
    # The server ended a session left idle in its transaction past the limit
    # the sink sets (an attempt it abandoned, or a stalled client): a new one will do.
    "25P03": "idle_in_transaction_timeout",
}
_TRANSIENT_CLASSES = {"08": "connection", "40": "rollback"}
_DETERMINISTIC_STATES = {"53100": "disk_full", "53200": "out_of_memory"}
_DETERMINISTIC_CLASSES = {
    "53": "insufficient_resources", "54": "program_limit", "42": "syntax_or_access", "58": "system_error",
    "F0": "configuration", "XX": "internal_error", "22": "data", "23": "integrity",
}
# At connect time libpq passes the server's refusal on as text only, without
# its SQLSTATE. These (English) refusals are settings waiting cannot fix; any
# other one (starting up, shutting down, too many clients, or a message in
# another language) is waited out, which at worst waits with the reason shown.
_MISCONFIGURED = re.compile(
    r"FATAL:.*(password authentication failed|authentication failed|does not exist|no pg_hba\.conf entry"
    r"|permission denied|is not permitted to log in)", re.S)
# The labels artwatch_infra_db_retries_total can carry.
RETRY_REASONS = ("connection", "backpressure", "rollback", "attempt_timeout",
                 *sorted(set(_TRANSIENT_STATES.values())))


def classify(exc: BaseException) -> Failure:
    """Transient or deterministic, by SQLSTATE.

    Examples
    --------
    >>> classify(psycopg.errors.LockNotAvailable())
    Failure(transient=True, reason='lock_timeout', sqlstate='55P03')
    >>> classify(psycopg.errors.DiskFull())
    Failure(transient=False, reason='disk_full', sqlstate='53100')
    >>> classify(psycopg.errors.TooManyConnections())
    Failure(transient=True, reason='too_many_connections', sqlstate='53300')
    >>> classify(psycopg.OperationalError("connection refused"))  # no SQLSTATE: the server was not reached
    Failure(transient=True, reason='connection', sqlstate=None)
    >>> classify(psycopg.OperationalError('failed: FATAL:  database "x" does not exist'))
    Failure(transient=False, reason='configuration', sqlstate=None)
    >>> classify(AttemptTimeout("no answer within 67s"))
    Failure(transient=True, reason='attempt_timeout', sqlstate=None)
    """
    if isinstance(exc, SinkBackpressure):
        return Failure(True, "backpressure")
    if isinstance(exc, AttemptTimeout):
        return Failure(True, "attempt_timeout")
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # Never reached the server or lost it (refused, reset, timed out,
            # "the connection is closed"); an InterfaceError is a misuse.
            if isinstance(exc, psycopg.OperationalError):
                if _MISCONFIGURED.search(str(exc)):
                    return Failure(False, "configuration")
                return Failure(True, "connection")
            return Failure(False, "interface")
        if state in _TRANSIENT_STATES:
            return Failure(True, _TRANSIENT_STATES[state], state)
        if state[:2] in _TRANSIENT_CLASSES:
            return Failure(True, _TRANSIENT_CLASSES[state[:2]], state)
        reason = _DETERMINISTIC_STATES.get(state) or _DETERMINISTIC_CLASSES.get(state[:2], "other")
        return Failure(False, reason, state)
    if isinstance(exc, (ConnectionError, TimeoutError)):  # socket level, outside psycopg's wrapping
        return Failure(True, "connection")
    return Failure(False, "other")


def describe(exc: BaseException) -> str:
    """One line for logs and /health: the class, SQLSTATE and first line of the message.

    Examples
    --------
    >>> describe(psycopg.errors.DiskFull("could not extend file: No space left on device\\nHINT: ..."))
    'disk_full 53100: could not extend file: No space left on device'
    """
    f = classify(exc)
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    state = f" {f.sqlstate}" if f.sqlstate else ""
    return f"{f.reason}{state}: {text}"

"""Edge validation: raw Kafka bytes in, a typed record or a rejection reason out.

Any bytes end as one or the other: whatever the decoder or a record's checks
raise (invalid UTF-8, a date that overflows, nesting too deep, a bug) becomes
a :class:`Rejected`, so no message can stop the stream.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Callable

import msgspec

from infra.settings import ValidationSettings
from streams import image_checks
from streams.records import RECORD_TYPES, Event, Image

__all__ = ["Validator", "Rejected", "REASONS", "EARLIEST_EVENT_TIME", "printable"]

_BACKSLASH = 0x5C
_DEL = 0x7F  # the one control character valid unescaped in JSON and ASCII
# Older event times are typos or epoch-zero placeholders; near year 1 they
# also overflow date arithmetic (a window's start) downstream.
EARLIEST_EVENT_TIME = datetime(1900, 1, 1, tzinfo=timezone.utc)

# Bounded label values of artwatch_streams_deadletter_total{reason}: a fixed
# set, never built from the message (the error text says the rest).
REASONS = (
    "oversized", "malformed_json", "missing_field", "unknown_field", "invalid_field", "future_timestamp",
    "empty", "invalid_image", "forbidden_uri",
    "undecodable",  # the catch-all: an exception nothing above names (class in the error text)
    "rejected_by_database",  # set by the pipeline for what the edge let through
    "conflicting_duplicate",  # set by the pipeline: an event_id stored with another ts or content
    "corrupt_batch",  # set by the batch engine: a record batch the consumer cannot read (streams/batch_ingest.py)
)

# Control characters (Unicode Cc: C0, DEL, C1) and the bidi controls that
# reorder how a name displays (U+202E turns "gpj.exe" around).
_FORBIDDEN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_ERROR_CHARS = 300  # of an unexpected exception's message (it may quote the input)


ERROR_CHARS_MAX = 1000  # of a dead letter's error text


def printable(text: str, limit: int = ERROR_CHARS_MAX) -> str:
    """``text`` cut to ``limit`` characters with control and bidi characters
    escaped: error texts quote the input (an unknown field's name), and a NUL
    there would make the dead letter itself unstorable (a crash loop), a
    newline would forge log lines.

    Examples
    --------
    >>> printable("unknown field `" + chr(0) + chr(10) + "`")
    'unknown field `\\\\u0000\\\\u000a`'
    >>> len(printable("x" * 5000))
    1000
    """
    return _FORBIDDEN_TEXT.sub(lambda m: f"\\u{ord(m.group()):04x}", text[:limit])[:limit]


class Rejected(Exception):
    """A message that cannot become a record; ``reason`` is one of REASONS and
    ``error`` is bounded and printable (see :func:`printable`)."""

    def __init__(self, reason: str, error: str) -> None:
        error = printable(error)
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


class Validator:
    """Decode and check messages of one record kind.

    Examples
    --------
    >>> from infra.settings import ValidationSettings
    >>> v = Validator("sales", ValidationSettings())
    >>> v.decode(b'{"event_id": "x"')
    Traceback (most recent call last):
    ...
    streams.validation.Rejected: malformed_json: Input data was truncated
    >>> v.decode(b'{"event_id": "\\xff"}')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streams.validation.Rejected: malformed_json: invalid UTF-8 (UnicodeDecodeError: 'utf-8' codec can't decode ...)
    """

    def __init__(
        self, kind: str, settings: ValidationSettings, clock: Callable[[], float] = time.time
    ) -> None:
        if kind not in RECORD_TYPES:
            raise ValueError(f"unknown record kind {kind!r}; known: {sorted(RECORD_TYPES)}")
        self.kind = kind
        self.max_bytes = settings.max_message_bytes
        self.max_skew = settings.max_future_skew_s
        self.clock = clock
        self.settings = settings
        self._images = kind == Image.kind
        self._decoder = msgspec.json.Decoder(RECORD_TYPES[kind])

    def not_after(self) -> datetime:
        """The latest event time accepted now (computed once per batch)."""
        return datetime.fromtimestamp(self.clock() + self.max_skew, timezone.utc)

    def decode(self, value: bytes | None, not_after: datetime | None = None) -> Event:
        """Decode one message; ``not_after`` defaults to :meth:`not_after`.

        Returns a record or raises :class:`Rejected`, nothing else (only
        BaseException-only signals such as KeyboardInterrupt pass through).
        """
        # One try around everything: free in CPython 3.11 until something raises.
        try:
            if not value:
                raise Rejected("empty", "message has no value")
            if len(value) > self.max_bytes:
                raise Rejected("oversized", f"{len(value)} bytes > limit {self.max_bytes}")
            record = self._decoder.decode(value)
            # Control characters arrive escaped (\u0000), as DEL or as non-ASCII
            # bytes (C1 and bidi controls); raw bytes < 0x20 are invalid JSON.
            # isascii and memchr cost ~50 ns together and most messages pass
            # all three; only then is the decoded text looked at.
            if not value.isascii() or _BACKSLASH in value or _DEL in value:
                _reject_control_characters(record)
            if record.ts < EARLIEST_EVENT_TIME:
                raise Rejected("invalid_field",
                               f"ts {record.ts.isoformat()} is before {EARLIEST_EVENT_TIME.isoformat()}")
            if record.ts > (not_after or self.not_after()):
                ahead = record.ts.timestamp() - self.clock()
                now = datetime.fromtimestamp(self.clock(), timezone.utc).isoformat()
                raise Rejected(
                    "future_timestamp",
                    f"ts {record.ts.isoformat()} is {ahead:.0f}s ahead of now (limit {self.max_skew:.0f}s, now {now})",
                )
            if self._images:
                self._check_image(record)
            return record
        except Rejected:
            raise
        except msgspec.ValidationError as exc:
            msg = str(exc)
            if "missing required field" in msg:
                raise Rejected("missing_field", msg) from None
            raise Rejected("unknown_field" if "unknown field" in msg else "invalid_field", msg) from None
        except msgspec.DecodeError as exc:
            raise Rejected("malformed_json", str(exc)) from None
        except UnicodeDecodeError as exc:  # JSON is UTF-8; msgspec leaves a bad string to Python's codec
            raise Rejected("malformed_json", f"invalid UTF-8 ({_describe(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - the catch-all: no message may stop the stream
            raise Rejected("undecodable", _describe(exc)) from None

    def _check_image(self, image: Image) -> None:
        s = self.settings
        try:
            if image.data is not None:
                image_checks.check_inline(image.content_type, image.data, s.image_max_pixels)
            else:
                image_checks.check_content_type(image.content_type)
        except ValueError as exc:
            raise Rejected("invalid_image", str(exc)) from None
        if image.uri is not None:
            try:
                image_checks.check_uri(image.uri, s.image_uri_schemes, s.image_uri_hosts)
            except ValueError as exc:
                raise Rejected("forbidden_uri", str(exc)) from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]


def _reject_control_characters(record: Event) -> None:
    """Refuse text holding a control or bidi character: PostgreSQL's text
    cannot hold NUL (the batch would fail at the database), and the others
    hide or disguise what a name says wherever it is shown."""
    for name in record.__struct_fields__:
        value = getattr(record, name)
        if isinstance(value, str) and (found := _FORBIDDEN_TEXT.search(value)):
            char = found.group()
            what = "a NUL" if char == "\x00" else "a bidi control" if char > "\x9f" else "a control"
            raise Rejected("invalid_field", f"{name} contains {what} character (U+{ord(char):04X})")

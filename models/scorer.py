"""The scorer protocol: the one seam every model and detector plugs into (issue 9, point 1).

A *scorer* reads records of some kinds, keeps state per key (a collection, an
auction, a wallet...), and for each record first **scores** it against the
state as it stands, then **learns** it. That is River's ``score_one`` /
``learn_one`` order (prequential evaluation) and a Kafka Streams processor's
shape: the stage that drives scorers owns ordering (event time per key, ties by
event id), persistence and exactly-once; a scorer is only a pure function of
(state, record) plus an update.

Contract (checked for every detector by tests/unit/models/test_scorer_contract.py):

* ``kinds``: the record kinds it reads (``"sales"``, ``"listings"``, ``"bids"``,
  ``"images"``, as ``streams.records``' ``kind`` class attributes). The stage
  sends it nothing else.
* ``key(record)``: what its state is keyed by, or ``None`` for a record it
  ignores (the stage then neither scores nor learns it for this scorer). All
  records with one key must reach one stage instance (the repartition).
* ``new_state(key)``: the state of a key never seen.
* ``score(state, record)``: **pure**: the same state and record give the same
  :class:`Scored`, and ``state`` is not mutated (``dump(state)`` is identical
  before and after). Derived rows and alert candidates come only from here.
* ``learn(state, record)``: folds the record into the state and returns the
  new state (it may be the same object, updated in place). Called right after
  ``score`` with the same record.
* ``dump(state)`` / ``load(data)``: a checkpoint as bytes, with the scorer's
  ``name`` and ``version`` inside. ``load`` of a checkpoint written by another
  scorer or another state ``version`` raises :class:`CheckpointError`; bump
  ``version`` whenever the state layout or its meaning changes, and the stage
  rebuilds that state (replay from the stored history) instead of misreading it.
  ``load(dump(s))`` must behave exactly like ``s`` for every later record.

Records are duck-typed: a scorer reads attributes (``ts`` as an aware UTC
datetime, ``collection``, ``price`` as Decimal, ``currency``, ``synthetic``,
``event_id``, ``kind``...), so the stream's msgspec records and small test
dataclasses both work. This package never imports ``streams`` or ``alerts``:
:class:`Signal` is an alert *candidate*; the stage turns it into an
``alerts.alert.Alert`` (alert id from ``kind`` and ``event_id``, which are
unique per scorer and record).

Examples
--------
A scorer that counts sales per collection and flags every tenth one:

>>> from dataclasses import dataclass
>>> from datetime import datetime, timezone
>>> from decimal import Decimal
>>> @dataclass(frozen=True)
... class Sale:
...     kind = "sales"
...     event_id: str
...     ts: datetime
...     collection: str
...     price: Decimal
...     currency: str = "ETH"
...     synthetic: bool = False
>>> class Counter:
...     name, version, kinds = "counter", 1, frozenset({"sales"})
...     def key(self, record): return record.collection
...     def new_state(self, key): return {"n": 0}
...     def score(self, state, record):
...         n = state["n"] + 1
...         if n % 10:
...             return Scored.EMPTY
...         return Scored(signals=(Signal(kind="tenth_sale", severity="info", subject=record.collection,
...                                       ts=record.ts, evidence={"n": n}, detector=self.name,
...                                       version=self.version, collection=record.collection,
...                                       event_id=record.event_id),))
...     def learn(self, state, record):
...         state["n"] += 1
...         return state
...     def dump(self, state): return encode_checkpoint(self.name, self.version, state)
...     def load(self, data): return decode_checkpoint(data, self.name, self.version)
>>> counter = Counter()
>>> isinstance(counter, Scorer)
True
>>> t0 = datetime(2021, 1, 1, tzinfo=timezone.utc)
>>> sales = [Sale(f"s{i}", t0, "punks", Decimal(1)) for i in range(25)]
>>> [out.signals[0].evidence["n"] for _, out in prequential(counter, sales) if out.signals]
[10, 20]
>>> checkpoint = counter.dump({"n": 3})
>>> counter.load(checkpoint)
{'n': 3}
>>> class CounterV2(Counter):
...     version = 2
>>> CounterV2().load(checkpoint)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
models.scorer.CheckpointError: checkpoint of 'counter' has state version 1, but this scorer reads version 2; ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional, Protocol, TypeVar, runtime_checkable

__all__ = [
    "Scorer",
    "Scored",
    "SeriesPoint",
    "Signal",
    "CheckpointError",
    "encode_checkpoint",
    "decode_checkpoint",
    "prequential",
    "SEVERITIES",
]

S = TypeVar("S")

SEVERITIES = ("info", "warning", "critical")

# A checkpoint is one JSON object: {"scorer": name, "version": n, "state": ...}.
_MAGIC = "artwatch-scorer-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that this scorer must not load (another scorer, another
    state version, or not a checkpoint at all)."""


@dataclass(frozen=True)
class SeriesPoint:
    """One derived row for a stored series (e.g. ``market_index``).

    ``key`` is the scorer's state key (the series is stored per key), ``values``
    maps column names to numbers (float, int or Decimal; None when unknown).
    The stage stores ``(series, key, ts)`` once: a replayed record yields the
    same point again, which an idempotent upsert absorbs.
    """

    series: str
    key: str
    ts: datetime
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Signal:
    """An alert candidate raised by a scorer.

    ``kind`` is the alert kind (``trend_break``, ``floor_drop``, ...),
    ``subject`` what it is about (a collection, an item), ``evidence`` what a
    dealer needs to check it (values, the window they were computed on,
    thresholds). ``detector`` and ``version`` name the scorer and its state
    version. ``event_id`` is the record that raised it: with ``kind`` it gives
    the alert its deterministic id, so a replay cannot raise it twice.
    """

    kind: str
    severity: str
    subject: str
    ts: datetime
    evidence: Mapping[str, Any]
    detector: str
    version: int
    collection: str = ""
    synthetic: bool = False
    event_id: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


@dataclass(frozen=True)
class Scored:
    """What scoring one record produced: derived rows and alert candidates."""

    rows: tuple[SeriesPoint, ...] = ()
    signals: tuple[Signal, ...] = ()

    EMPTY: ClassVar["Scored"]

    def __bool__(self) -> bool:
        return bool(self.rows or self.signals)


Scored.EMPTY = Scored()


@runtime_checkable
class Scorer(Protocol[S]):
    """What a model or detector implements; see the module docstring for the contract."""

    name: str
    version: int
    kinds: frozenset[str]

    def key(self, record: Any) -> Optional[str]: ...

    def new_state(self, key: str) -> S: ...

    def score(self, state: S, record: Any) -> Scored: ...

    def learn(self, state: S, record: Any) -> S: ...

    def dump(self, state: S) -> bytes: ...

    def load(self, data: bytes) -> S: ...


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which is not JSON")


def encode_checkpoint(name: str, version: int, state: Any) -> bytes:
    """A checkpoint of ``state`` (JSON-serialisable: dicts, lists, str, int,
    float; Decimals and datetimes are written as strings) for scorer ``name``
    at state ``version``. Floats round-trip exactly (JSON writes ``repr``).
    Keys are sorted, so equal states give equal bytes."""
    doc = {"format": _MAGIC, "scorer": name, "version": int(version), "state": state}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=_json_default,
                      allow_nan=False).encode()


def decode_checkpoint(data: bytes, name: str, version: int) -> Any:
    """The state inside a checkpoint written by :func:`encode_checkpoint` for
    the same scorer and state version; :class:`CheckpointError` otherwise."""
    try:
        doc = json.loads(data)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"not a scorer checkpoint ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != _MAGIC:
        raise CheckpointError("not a scorer checkpoint (no artwatch checkpoint header)")
    if doc.get("scorer") != name:
        raise CheckpointError(f"checkpoint belongs to scorer {doc.get('scorer')!r}, not {name!r}")
    if doc.get("version") != version:
        raise CheckpointError(
            f"checkpoint of {name!r} has state version {doc.get('version')!r}, but this scorer reads "
            f"version {version}; rebuild the state from history instead of loading it")
    return doc["state"]


def prequential(scorer: Scorer, records: Iterable[Any],
                states: Optional[dict[str, Any]] = None) -> Iterator[tuple[Any, Scored]]:
    """Score then learn each record in the order given, state per key, in one
    process (for tests, evaluation and notebooks; the stream stage does the same
    with ordering, persistence and exactly-once around it). Records of other
    kinds, or whose key is None, are skipped. ``states`` (key -> state) is
    updated in place when given."""
    states = {} if states is None else states
    kinds = scorer.kinds
    for record in records:
        if getattr(record, "kind", None) not in kinds:
            continue
        key = scorer.key(record)
        if key is None:
            continue
        state = states.get(key)
        if state is None:
            state = scorer.new_state(key)
        out = scorer.score(state, record)
        states[key] = scorer.learn(state, record)
        yield record, out

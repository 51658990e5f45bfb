"""Floor tracker: ``floor_drop`` when a collection's floor falls by more than ``drop`` within a window.

The **floor** after each listing or sale of a collection (state per
``collection|currency|real``, or ``|synthetic``):

* from **listings** when at least ``min_listings`` asks are live (an item's
  latest ask, not sold since, at most ``listing_ttl_s`` old): the
  ``rank``-th lowest ask (2nd: a single mistyped or bait ask is not a floor);
* else from **sales**: the ``quantile`` (20th percentile) of the last
  ``sales`` sale prices (20), which is where the cheapest items trade. The real
  CryptoPunks history has no listing feed, so its floor is this one.

A ``floor_drop`` is raised when the floor has stayed at least ``drop`` (30%)
below its highest value of the last ``window_s`` (3 days) for ``confirm``
consecutive events (3: one dumped item is not a floor drop). The high then
restarts from the current floor, so the next alert needs a new 30% fall. A
change of source (listings <-> sales) also restarts it: the two floors are
not comparable.

Examples
--------
>>> from datetime import datetime, timedelta, timezone
>>> from decimal import Decimal
>>> from types import SimpleNamespace as R
>>> t0 = datetime(2021, 3, 1, tzinfo=timezone.utc)
>>> prices = [10, 12, 11, 10, 13, 11, 10, 12] * 5 + [6, 7, 6, 6.5, 7, 6] * 4
>>> sales = [R(kind="sales", event_id=f"s{i}", ts=t0 + timedelta(hours=i), collection="punks", currency="ETH",
...            price=Decimal(str(p)), synthetic=False, item_id=str(i)) for i, p in enumerate(prices)]
>>> from models.scorer import prequential
>>> alerts = [s for _, out in prequential(FloorTracker(), sales) for s in out.signals]
>>> [(a.event_id, a.evidence["floor_high"], a.evidence["floor"], round(a.evidence["drop"], 2)) for a in alerts]
[('s46', 10.0, 6.4, 0.36)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Optional

from models.detectors.common import ListingBook, Window, epoch, iso, market_key, split_key
from models.scorer import CheckpointError, Scored, Signal, decode_checkpoint, encode_checkpoint

__all__ = ["FloorTracker", "FloorParams", "KIND"]

KIND = "floor_drop"
_DAY = 86400.0


@dataclass(frozen=True)
class FloorParams:
    drop: float = 0.30
    window_s: float = 3 * _DAY
    confirm: int = 3
    listing_ttl_s: float = 7 * _DAY
    rank: int = 2
    min_listings: int = 5
    sales: int = 20
    quantile: float = 0.2


@dataclass
class _State:
    book: ListingBook
    sales: Window
    highs: list = field(default_factory=list)  # [t, floor], floors decreasing: the window's max is highs[0]
    source: Optional[str] = None
    pending: int = 0


@dataclass(frozen=True)
class _Step:
    floor: Optional[float]
    source: Optional[str]
    high: Optional[tuple[float, float]]  # (t, floor) of the window's high before this event
    pending: int
    fire: bool
    live: int


class FloorTracker:
    """The ``floor_drop`` scorer (see the module docstring)."""

    name = "floor_drop"
    version = 1
    kinds = frozenset({"sales", "listings"})

    def __init__(self, params: FloorParams = FloorParams()) -> None:
        if not 0 < params.drop < 1 or params.confirm < 1 or params.rank < 1:
            raise ValueError("need 0 < drop < 1, confirm >= 1 and rank >= 1")
        self.params = params
        self._config = asdict(params)

    def key(self, record: Any) -> Optional[str]:
        price = getattr(record, "price", None)
        if price is None or not price > 0:
            return None
        return market_key(record)

    def new_state(self, key: str) -> _State:
        return _State(book=ListingBook(self.params.listing_ttl_s), sales=Window(self.params.sales))

    def _step(self, state: _State, record: Any, t: float) -> _Step:
        """What the event does to the floor, computed without changing ``state``."""
        p = self.params
        item = str(getattr(record, "item_id", ""))
        price = Decimal(record.price)
        if record.kind == "listings":
            extra, sale_values = price, None
        else:
            extra = None
            full = len(state.sales) == p.sales
            sale_values = state.sales.sorted_with(add=float(price), drop=state.sales.item(0)[1] if full else None)
        live = state.book.live(t, skip=item) + (extra is not None)
        floor: Optional[float] = None
        source: Optional[str] = None
        if live >= p.min_listings:
            ask = state.book.lowest(p.rank, t, skip=item, extra=extra)
            floor, source = (float(ask), "listings") if ask is not None else (None, None)
        if floor is None:
            values = sale_values if sale_values is not None else state.sales.sorted_with()
            if len(values) >= max(1, p.sales // 2):
                pos = p.quantile * (len(values) - 1)
                i = int(pos)
                floor = values[i] if i + 1 >= len(values) else values[i] + (values[i + 1] - values[i]) * (pos - i)
                source = "sales"
        if floor is None or source != state.source:
            return _Step(floor, source, None, 0, False, live)
        cut = t - p.window_s
        high = next(((ht, hf) for ht, hf in state.highs if ht >= cut), None)
        dropped = high is not None and floor <= (1 - p.drop) * high[1]
        pending = state.pending + 1 if dropped else 0
        return _Step(floor, source, high, pending, pending == p.confirm, live)

    def score(self, state: _State, record: Any) -> Scored:
        t = epoch(record.ts)
        step = self._step(state, record, t)
        if not step.fire:
            return Scored.EMPTY
        p = self.params
        assert step.high is not None and step.floor is not None
        collection, currency, synthetic = split_key(market_key(record) or "||real")
        evidence = {
            "detector": self.name, "version": self.version,
            "floor": step.floor, "floor_high": step.high[1], "drop": 1 - step.floor / step.high[1],
            "threshold": p.drop, "source": step.source, "currency": currency,
            "how": (f"{p.rank}th lowest of {step.live} live asks" if step.source == "listings"
                    else f"{p.quantile:.0%} quantile of the last {p.sales} sales"),
            "confirmed_by_events": p.confirm,
            "window": {"seconds": p.window_s, "high_at": iso(step.high[0]), "to": iso(t)},
            "price": str(record.price), "record_kind": record.kind,
        }
        return Scored(signals=(Signal(kind=KIND, severity="warning", subject=collection, ts=record.ts,
                                      evidence=evidence, detector=self.name, version=self.version,
                                      collection=collection, synthetic=synthetic,
                                      event_id=str(getattr(record, "event_id", ""))),))

    def learn(self, state: _State, record: Any) -> _State:
        t = epoch(record.ts)
        step = self._step(state, record, t)
        item = str(getattr(record, "item_id", ""))
        state.book.prune(t)
        if record.kind == "listings":
            state.book.add(item, t, Decimal(record.price))
        else:
            state.book.sold(item)
            state.sales.add(t, float(record.price))
        if step.floor is None:
            return state
        if step.source != state.source or step.fire:
            state.highs = []  # a new baseline: the next alert needs a new fall from here
        state.source = step.source
        state.pending = 0 if step.fire else step.pending
        cut = t - self.params.window_s
        highs = [h for h in state.highs if h[0] >= cut and h[1] > step.floor]
        highs.append([t, step.floor])
        state.highs = highs
        return state

    def dump(self, state: _State) -> bytes:
        return encode_checkpoint(self.name, self.version, {
            "config": self._config, "book": state.book.to_json(), "sales": state.sales.to_json(),
            "highs": state.highs, "source": state.source, "pending": state.pending})

    def load(self, data: bytes) -> _State:
        doc = decode_checkpoint(data, self.name, self.version)
        if doc.get("config") != self._config:
            raise CheckpointError(f"checkpoint of {self.name!r} was written with other parameters "
                                  f"({doc.get('config')!r}); rebuild the state from history")
        return _State(book=ListingBook.from_json(doc["book"], self.params.listing_ttl_s),
                      sales=Window.from_json(doc["sales"], self.params.sales),
                      highs=[[float(t), float(f)] for t, f in doc["highs"]],
                      source=doc["source"], pending=int(doc["pending"]))

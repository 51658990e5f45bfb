"""A robust price index per collection: the ``market_index`` series.

For every sale of a collection (state per ``collection|currency|real``, or
``|synthetic``), one :class:`~models.scorer.SeriesPoint` of series
``market_index``:

* ``index``: median price of the collection's last ``sales`` sales (25)
  that are at most ``max_age_s`` old (30 days), this sale included. A median
  ignores the few rare items that sell at 10-100x the floor, which make a mean
  useless on NFT collections.
* ``floor``: the lowest live ask (a listing of an item not sold since and at
  most ``listing_ttl_s`` old, 7 days); None without listings. The real
  CryptoPunks history has no listing feed, so real points have no floor;
  ``floor_drop`` falls back to sales.
* ``listings``, ``sales``, ``volume``: listings and sales in the trailing
  ``day_s`` (the 24 h up to this sale, which is included; an event exactly
  24 h old is out) and the sum of those sales' prices.
* ``index_sales``: how many sales the index is the median of.

Prices stay Decimal (exact); the stage stores the point once per
(series, key, ts) — an idempotent upsert.

Examples
--------
>>> from datetime import datetime, timedelta, timezone
>>> from decimal import Decimal
>>> from types import SimpleNamespace as R
>>> t0 = datetime(2021, 3, 1, tzinfo=timezone.utc)
>>> def ev(kind, i, price, item="1"):
...     return R(kind=kind, event_id=f"{kind}{i}", ts=t0 + timedelta(hours=i), collection="punks",
...              currency="ETH", price=Decimal(price), synthetic=False, item_id=item)
>>> index, state = PriceIndex(), None
>>> points = []
>>> for e in [ev("listings", 0, "30", "7"), ev("sales", 1, "20"), ev("sales", 2, "100"), ev("sales", 3, "22")]:
...     state = state or index.new_state(index.key(e))
...     points += index.score(state, e).rows
...     state = index.learn(state, e)
>>> [(p.values["index"], p.values["floor"], p.values["sales"], p.values["volume"]) for p in points]
[(Decimal('20'), Decimal('30'), 1, Decimal('20')), (Decimal('60'), Decimal('30'), 2, Decimal('120')), (Decimal('22'), Decimal('30'), 3, Decimal('142'))]
>>> points[-1].series, points[-1].key
('market_index', 'punks|ETH|real')
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from decimal import Decimal, localcontext
from typing import Any, Optional

from models.detectors.common import ListingBook, epoch, market_key
from models.scorer import CheckpointError, Scored, SeriesPoint, decode_checkpoint, encode_checkpoint

__all__ = ["PriceIndex", "IndexParams", "SERIES"]

SERIES = "market_index"
_DAY = 86400.0


@dataclass(frozen=True)
class IndexParams:
    sales: int = 25
    max_age_s: float = 30 * _DAY
    day_s: float = _DAY
    listing_ttl_s: float = 7 * _DAY


@dataclass
class _State:
    recent: deque  # (t, price) of the last `sales` sales
    day_sales: deque  # (t, price) of the sales in the trailing day
    day_volume: Decimal
    day_listings: deque  # t of the listings in the trailing day
    book: ListingBook


def _median(prices: list[Decimal]) -> Decimal:
    s = sorted(prices)
    n = len(s)
    if n % 2:
        return s[n // 2]
    with localcontext() as ctx:
        ctx.prec = 100
        mid = ((s[n // 2 - 1] + s[n // 2]) / 2).normalize()
        # No positive exponent (60, not 6E+1): the project's one money form.
        return mid.quantize(Decimal(1)) if mid.as_tuple().exponent > 0 else mid  # type: ignore[operator]


class PriceIndex:
    """The ``market_index`` scorer (see the module docstring)."""

    name = "market_index"
    version = 1
    kinds = frozenset({"sales", "listings"})

    def __init__(self, params: IndexParams = IndexParams()) -> None:
        self.params = params
        self._config = asdict(params)

    def key(self, record: Any) -> Optional[str]:
        if getattr(record, "price", None) is None:
            return None
        return market_key(record)

    def new_state(self, key: str) -> _State:
        return _State(recent=deque(), day_sales=deque(), day_volume=Decimal(0), day_listings=deque(),
                      book=ListingBook(self.params.listing_ttl_s))

    def score(self, state: _State, record: Any) -> Scored:
        if record.kind != "sales":
            return Scored.EMPTY
        p = self.params
        t = epoch(record.ts)
        price = Decimal(record.price)
        recent = [q for s, q in list(state.recent)[-(p.sales - 1):] if s >= t - p.max_age_s] if p.sales > 1 else []
        recent.append(price)
        cut = t - p.day_s
        expired = [q for s, q in state.day_sales if s <= cut]
        with localcontext() as ctx:
            ctx.prec = 100
            volume = state.day_volume - sum(expired, Decimal(0)) + price
        values = {
            "index": _median(recent),
            "floor": state.book.lowest(1, t, skip=str(getattr(record, "item_id", ""))),
            "listings": sum(1 for s in state.day_listings if s > cut),
            "sales": len(state.day_sales) - len(expired) + 1,
            "volume": volume,
            "index_sales": len(recent),
        }
        return Scored(rows=(SeriesPoint(series=SERIES, key=market_key(record) or "", ts=record.ts, values=values),))

    def learn(self, state: _State, record: Any) -> _State:
        p = self.params
        t = epoch(record.ts)
        price = Decimal(record.price)
        cut = t - p.day_s
        item = str(getattr(record, "item_id", ""))
        state.book.prune(t)
        while state.day_listings and state.day_listings[0] <= cut:
            state.day_listings.popleft()
        with localcontext() as ctx:
            ctx.prec = 100
            while state.day_sales and state.day_sales[0][0] <= cut:
                state.day_volume -= state.day_sales.popleft()[1]
            if record.kind == "sales":
                state.recent.append((t, price))
                while len(state.recent) > p.sales:
                    state.recent.popleft()
                state.day_sales.append((t, price))
                state.day_volume += price
                state.book.sold(item)
            elif record.kind == "listings":
                state.day_listings.append(t)
                state.book.add(item, t, price)
        return state

    def dump(self, state: _State) -> bytes:
        return encode_checkpoint(self.name, self.version, {
            "config": self._config,
            "recent": [[t, str(q)] for t, q in state.recent],
            "day_sales": [[t, str(q)] for t, q in state.day_sales],
            "day_volume": str(state.day_volume),
            "day_listings": list(state.day_listings),
            "book": state.book.to_json(),
        })

    def load(self, data: bytes) -> _State:
        doc = decode_checkpoint(data, self.name, self.version)
        if doc.get("config") != self._config:
            raise CheckpointError(f"checkpoint of {self.name!r} was written with other parameters "
                                  f"({doc.get('config')!r}); rebuild the state from history")
        return _State(recent=deque((float(t), Decimal(q)) for t, q in doc["recent"]),
                      day_sales=deque((float(t), Decimal(q)) for t, q in doc["day_sales"]),
                      day_volume=Decimal(doc["day_volume"]),
                      day_listings=deque(float(t) for t in doc["day_listings"]),
                      book=ListingBook.from_json(doc["book"], self.params.listing_ttl_s))

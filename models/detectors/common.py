"""Shared pieces of the market detectors: the state key, price and time
conversions, a rolling window with an O(log n) median, and a listing book.

Everything here is plain data (lists, dicts, floats, strings) so that each
detector's state is one JSON checkpoint (``models.scorer.encode_checkpoint``).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterable, Optional

__all__ = [
    "market_key",
    "split_key",
    "log_price",
    "epoch",
    "iso",
    "Window",
    "ListingBook",
    "median",
]

REAL, SYNTHETIC = "real", "synthetic"


def market_key(record: Any) -> Optional[str]:
    """The state key of a market event: ``"collection|currency|real"`` or
    ``"...|synthetic"``.

    Real and synthetic events never share state (a real event is scored only
    against real history, a synthetic one only against synthetic history), and
    prices in different currencies are never mixed. Currencies and the last
    part contain no ``|``, so :func:`split_key` splits from the right and a
    collection name may contain ``|``. None when the record has no collection
    or currency.

    >>> from types import SimpleNamespace as R
    >>> market_key(R(collection="cryptopunks", currency="ETH", synthetic=False))
    'cryptopunks|ETH|real'
    >>> split_key("a|b|ETH|synthetic")
    ('a|b', 'ETH', True)
    """
    collection = getattr(record, "collection", None)
    currency = getattr(record, "currency", None)
    if not collection or not currency:
        return None
    return f"{collection}|{currency}|{SYNTHETIC if getattr(record, 'synthetic', False) else REAL}"


def split_key(key: str) -> tuple[str, str, bool]:
    """``(collection, currency, synthetic)`` of a :func:`market_key`."""
    collection, currency, flavour = key.rsplit("|", 2)
    return collection, currency, flavour == SYNTHETIC


def log_price(price: Any) -> Optional[float]:
    """Natural log of a positive price (Decimal, int, float or decimal string);
    None for zero, negative or non-finite prices, which carry no market level."""
    try:
        value = float(price)
    except (TypeError, ValueError, ArithmeticError):
        return None
    if not value > 0 or math.isinf(value):
        return None
    return math.log(value)


def epoch(ts: datetime) -> float:
    """Seconds since 1970 of an aware datetime (a naive one is taken as UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.timestamp()


def iso(t: float) -> str:
    """ISO 8601 UTC text of an epoch time, for evidence."""
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def median(values: Iterable[float]) -> float:
    """Median of a non-empty iterable of numbers (mean of the middle two)."""
    s = sorted(values)
    n = len(s)
    if not n:
        raise ValueError("median of nothing")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class Window:
    """The last ``size`` values in arrival order, with their times, kept sorted
    too: median and quantiles in O(1), add in O(size) memmove.

    >>> w = Window(3)
    >>> for t, v in enumerate([5.0, 1.0, 3.0, 4.0]):
    ...     w.add(float(t), v)
    >>> w.values(), w.median(), len(w)
    ([1.0, 3.0, 4.0], 3.0, 3)
    >>> Window.from_json(w.to_json(), 3).values() == w.values()
    True
    """

    __slots__ = ("size", "_fifo", "_sorted")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        self.size = size
        self._fifo: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._fifo)

    def add(self, t: float, value: float) -> None:
        self._fifo.append((t, value))
        bisect.insort(self._sorted, value)
        if len(self._fifo) > self.size:
            _, old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def clear(self) -> None:
        self._fifo.clear()
        self._sorted.clear()

    def median(self) -> float:
        s = self._sorted
        n = len(s)
        if not n:
            raise ValueError("median of an empty window")
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile ``q`` in [0, 1]."""
        s = self._sorted
        if not s:
            raise ValueError("quantile of an empty window")
        pos = q * (len(s) - 1)
        i = int(pos)
        if i + 1 >= len(s):
            return s[-1]
        return s[i] + (s[i + 1] - s[i]) * (pos - i)

    def sorted_with(self, add: Optional[float] = None, drop: Optional[float] = None) -> list[float]:
        """The sorted values as they would be after removing one ``drop`` and
        adding ``add``, as a new list (the window is not changed)."""
        s = list(self._sorted)
        if drop is not None:
            del s[bisect.bisect_left(s, drop)]
        if add is not None:
            bisect.insort(s, add)
        return s

    def item(self, i: int) -> tuple[float, float]:
        """``(time, value)`` at position ``i`` in arrival order (0 = oldest, -1 = newest)."""
        return self._fifo[i]

    def values(self) -> list[float]:
        return [v for _, v in self._fifo]

    def items(self) -> list[tuple[float, float]]:
        return list(self._fifo)

    def oldest_time(self) -> Optional[float]:
        return self._fifo[0][0] if self._fifo else None

    def to_json(self) -> list[list[float]]:
        return [[t, v] for t, v in self._fifo]

    @classmethod
    def from_json(cls, rows: list, size: int) -> "Window":
        w = cls(size)
        for t, v in rows:
            w.add(float(t), float(v))
        return w


class ListingBook:
    """Live asks per item: an item's latest listing, dropped when the item
    sells or after ``ttl_s`` seconds (no feed here says when a listing is
    withdrawn, so an old ask is presumed gone).

    >>> b = ListingBook(ttl_s=100)
    >>> b.add("a", 0.0, Decimal("5")); b.add("b", 10.0, Decimal("3")); b.add("a", 20.0, Decimal("4"))
    >>> b.lowest(2, now=50.0), b.live(now=50.0)
    (Decimal('4'), 2)
    >>> b.sold("b"); b.lowest(1, now=50.0), b.lowest(1, now=500.0)
    (Decimal('4'), None)
    """

    __slots__ = ("ttl_s", "_asks")

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._asks: dict[str, tuple[float, Decimal]] = {}

    def add(self, item: str, t: float, price: Decimal) -> None:
        old = self._asks.get(item)
        if old is None or t >= old[0]:
            self._asks[item] = (t, price)

    def sold(self, item: str) -> None:
        self._asks.pop(item, None)

    def prune(self, now: float) -> None:
        cut = now - self.ttl_s
        for item in [i for i, (t, _) in self._asks.items() if t < cut]:
            del self._asks[item]

    def _live(self, now: float, skip: Optional[str] = None) -> list[Decimal]:
        cut = now - self.ttl_s
        return [p for i, (t, p) in self._asks.items() if t >= cut and i != skip]

    def live(self, now: float, skip: Optional[str] = None) -> int:
        return len(self._live(now, skip))

    def lowest(self, k: int, now: float, skip: Optional[str] = None,
               extra: Optional[Decimal] = None) -> Optional[Decimal]:
        """The ``k``-th lowest live ask (1 = the lowest) at ``now``, leaving out
        item ``skip`` and adding one ask ``extra`` (how :meth:`score` sees the
        book after the record without changing it); None with fewer than k."""
        asks = self._live(now, skip)
        if extra is not None:
            asks.append(extra)
        if len(asks) < k:
            return None
        return heapq.nsmallest(k, asks)[-1]

    def to_json(self) -> dict[str, list]:
        return {i: [t, str(p)] for i, (t, p) in sorted(self._asks.items())}

    @classmethod
    def from_json(cls, doc: dict, ttl_s: float) -> "ListingBook":
        b = cls(ttl_s)
        for item, (t, p) in doc.items():
            b._asks[item] = (float(t), Decimal(p))
        return b

"""Sale outlier: a sale at >= N x its collection's trailing median price.

State is a time-ordered window of recent sales per (collection, currency)
and per kind of sale: real and synthetic sales have separate windows, so a
real sale is judged only against real ones (synthetic events never move a
real-market median) and a synthetic one only against synthetic ones. It lives
in process memory for speed but is rebuilt from the database the first time
a (collection, currency) is seen after a start (see ``streams.pipeline``), so
a restart neither forgets history nor double-counts it (a window is keyed by
event id).

Each batch is scored in event-time order, but a sale that arrives after a
later one of its key was learnt (partitions drifting apart, a lagging
replay) is scored against the window as it stands: its median then includes
sales from after it. Its alert says by how much (``evidence["late_by_s"]``),
and beyond ``late_grace`` the sale is counted (``late_sales``, the metric
``artwatch_alerts_late_sales_total``, a log line per batch) rather than
paying for an exact as-of median.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Context, Decimal, localcontext
from typing import Iterable, Optional

from alerts.alert import Alert, alert_id_for

__all__ = ["SaleOutlierRule", "SaleFacts", "KIND"]

KIND = "sale_outlier"

# Prices span 1e-18 to 1e21, so a ratio can need ~40 digits; the default
# context (28) would raise on quantize and fail the whole batch.
_WIDE = Context(prec=100)


@dataclass(frozen=True)
class SaleFacts:
    """What the rule needs of a sale. Any object with these attributes will do
    (the stream passes its ``Sale`` records as they are)."""

    event_id: str
    ts: datetime
    collection: str
    item_id: str
    currency: str
    price: Decimal
    synthetic: bool = False


@dataclass
class _Window:
    # Sorted lists; inserts are bisect + memmove, so sales arriving out of
    # order across partitions stay cheap. Times are floats (epoch seconds):
    # bisect over floats is several times faster than over datetime tuples.
    times: list = field(default_factory=list)  # ascending
    rows: list = field(default_factory=list)  # (event_id, price), same order as times
    prices: list = field(default_factory=list)  # ascending, the same rows' prices
    ids: set = field(default_factory=set)

    def add(self, t: float, event_id: str, price: Decimal) -> None:
        if event_id in self.ids:
            return
        self.ids.add(event_id)
        if not self.times or t >= self.times[-1]:
            self.times.append(t)
            self.rows.append((event_id, price))
        else:
            i = bisect.bisect_right(self.times, t)
            self.times.insert(i, t)
            self.rows.insert(i, (event_id, price))
        bisect.insort(self.prices, price)

    def expire(self, before: float) -> None:
        if not self.times or self.times[0] >= before:
            return
        cut = bisect.bisect_left(self.times, before)
        for event_id, price in self.rows[:cut]:
            self.ids.discard(event_id)
            del self.prices[bisect.bisect_left(self.prices, price)]
        del self.times[:cut], self.rows[:cut]

    def discard(self, t: float, event_id: str, price: Decimal) -> None:
        """Remove the entry of exactly this version (time, id, price): a
        different version of the same id (a conflicting duplicate) must not
        take the stored one out."""
        if event_id not in self.ids:
            return
        lo, hi = bisect.bisect_left(self.times, t), bisect.bisect_right(self.times, t)
        i = next((i for i in range(lo, hi) if self.rows[i] == (event_id, price)), None)
        if i is None:
            return
        del self.times[i], self.rows[i]
        del self.prices[bisect.bisect_left(self.prices, price)]
        self.ids.discard(event_id)

    def median(self) -> Decimal:
        p, n = self.prices, len(self.prices)
        return p[n // 2] if n % 2 else (p[n // 2 - 1] + p[n // 2]) / 2


class SaleOutlierRule:
    """Flag a sale priced at >= ``multiple`` x the trailing median.

    Parameters
    ----------
    multiple
        How many times the median a sale must reach to alert.
    window
        Trailing window of event time the median is taken over.
    min_history
        Sales the window must hold before the rule speaks.
    late_grace
        How far behind the newest sale of its key a sale may arrive and still
        count as on time (it is scored and learnt either way).

    Examples
    --------
    >>> from datetime import timezone
    >>> rule = SaleOutlierRule(multiple=3.0, window=timedelta(days=7), min_history=3)
    >>> t0 = datetime(2021, 1, 1, tzinfo=timezone.utc)
    >>> sale = lambda i, p: SaleFacts(f"s{i}", t0 + timedelta(hours=i), "punks", str(i), "ETH", Decimal(p))
    >>> [rule.observe(sale(i, "10")) for i in range(3)]
    [None, None, None]
    >>> alert = rule.observe(sale(3, "31"))
    >>> alert.kind, alert.evidence["median"], alert.evidence["ratio"]
    ('sale_outlier', '10', '3.1')
    >>> rule.observe(sale(4, "29")) is None
    True
    """

    def __init__(
        self,
        multiple: float = 3.0,
        window: timedelta = timedelta(days=7),
        min_history: int = 5,
        late_grace: timedelta = timedelta(seconds=60),
    ) -> None:
        if multiple <= 1:
            raise ValueError(f"multiple must be > 1, got {multiple}")
        if min_history < 1:
            raise ValueError(f"min_history must be >= 1, got {min_history}")
        if late_grace < timedelta(0):
            raise ValueError(f"late_grace must not be negative, got {late_grace}")
        self.multiple = Decimal(str(multiple))
        self.window = window
        self._window_s = window.total_seconds()
        self.min_history = min_history
        self._windows: dict[tuple[str, str, bool], _Window] = {}  # (collection, currency, synthetic)
        self._known: set[tuple[str, str]] = set()
        self._grace_s = late_grace.total_seconds()
        self.late_sales = 0  # sales more than late_grace behind the newest of their key

    def knows(self, collection: str, currency: str) -> bool:
        """Whether (collection, currency) was warmed or seen (both its windows)."""
        return (collection, currency) in self._known

    def _window(self, collection: str, currency: str, synthetic: bool) -> _Window:
        w = self._windows.get((collection, currency, synthetic))
        if w is None:
            w = self._windows[(collection, currency, bool(synthetic))] = _Window()
            self._known.add((collection, currency))
        return w

    def warm(
        self, collection: str, currency: str, history: Iterable[tuple[datetime, str, Decimal, bool]]
    ) -> None:
        """Seed a (collection, currency)'s windows with earlier sales ``(ts, event_id, price, synthetic)``;
        each goes to the window of its kind."""
        self._known.add((collection, currency))
        for ts, event_id, price, synthetic in history:
            self._window(collection, currency, synthetic).add(ts.timestamp(), event_id, price)

    def learn(self, sale: SaleFacts) -> None:
        """Add ``sale`` to its window without scoring it (a no-op when its id is there)."""
        self._window(sale.collection, sale.currency, sale.synthetic).add(sale.ts.timestamp(), sale.event_id, sale.price)

    def forget(self, sale: SaleFacts) -> None:
        """Take back a sale learnt by :meth:`observe` (one the database then
        refused, or a conflicting version of a stored one). Only this exact
        version (ts and price) is removed, never another version of its id."""
        w = self._windows.get((sale.collection, sale.currency, sale.synthetic))
        if w is not None:
            w.discard(sale.ts.timestamp(), sale.event_id, sale.price)

    def observe(self, sale: SaleFacts) -> Optional[Alert]:
        """Score ``sale`` against what was known just before it among sales of
        its kind (real or synthetic), then learn it."""
        w = self._window(sale.collection, sale.currency, sale.synthetic)
        t = sale.ts.timestamp()
        w.expire(t - self._window_s)
        seen = sale.event_id in w.ids  # a redelivery: neither scored nor late
        late_by = w.times[-1] - t if not seen and w.times and t < w.times[-1] else 0.0
        if late_by > self._grace_s:
            self.late_sales += 1
        alert = None
        if len(w.prices) >= self.min_history and not seen:
            median = w.median()
            if median > 0 and sale.price >= self.multiple * median:
                with localcontext(_WIDE):
                    ratio = (sale.price / median).quantize(Decimal("0.01")).normalize()
                alert = Alert(
                    alert_id=alert_id_for(KIND, sale.event_id),
                    ts=sale.ts,
                    kind=KIND,
                    severity="high" if ratio >= 2 * self.multiple else "medium",
                    subject=sale.item_id,
                    collection=sale.collection,
                    evidence={
                        "event_id": sale.event_id,
                        "price": str(sale.price),
                        "currency": sale.currency,
                        "median": format(median.normalize(), "f"),
                        "ratio": format(ratio, "f"),
                        "window_sales": len(w.prices),
                        "window_days": self.window.total_seconds() / 86400,
                        # > 0: scored against a window that already held later sales.
                        "late_by_s": round(late_by, 3),
                    },
                    synthetic=sale.synthetic,
                )
        w.add(t, sale.event_id, sale.price)
        return alert

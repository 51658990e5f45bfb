"""Sale outlier: a sale at >= N x its collection's trailing median price.

State is a time-ordered window of recent sales per (collection, currency).
It lives in process memory for speed but is rebuilt from the database the
first time a key is seen after a start (see ``streams.agents.ingest``), so a
restart neither forgets history nor double-counts it (the window is keyed by
event id).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Iterable, Optional

from alerts.alert import Alert, alert_id_for

__all__ = ["SaleOutlierRule", "SaleFacts", "KIND"]

KIND = "sale_outlier"


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
    # Both lists stay sorted; inserts are bisect + memmove (fast in C even for
    # 10^5 rows), so events arriving out of order across partitions are cheap.
    by_time: list = field(default_factory=list)  # (ts, event_id, price)
    prices: list = field(default_factory=list)  # the same rows' prices
    ids: set = field(default_factory=set)

    def add(self, ts: datetime, event_id: str, price: Decimal) -> None:
        if event_id in self.ids:
            return
        self.ids.add(event_id)
        row = (ts, event_id, price)
        if not self.by_time or row >= self.by_time[-1]:
            self.by_time.append(row)
        else:
            bisect.insort(self.by_time, row)
        bisect.insort(self.prices, price)

    def expire(self, before: datetime) -> None:
        if not self.by_time or self.by_time[0][0] >= before:
            return
        cut = bisect.bisect_left(self.by_time, (before,))
        for _, event_id, price in self.by_time[:cut]:
            self.ids.discard(event_id)
            del self.prices[bisect.bisect_left(self.prices, price)]
        del self.by_time[:cut]

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

    def __init__(self, multiple: float = 3.0, window: timedelta = timedelta(days=7), min_history: int = 5) -> None:
        if multiple <= 1:
            raise ValueError(f"multiple must be > 1, got {multiple}")
        if min_history < 1:
            raise ValueError(f"min_history must be >= 1, got {min_history}")
        self.multiple = Decimal(str(multiple))
        self.window = window
        self.min_history = min_history
        self._windows: dict[tuple[str, str], _Window] = {}

    def knows(self, collection: str, currency: str) -> bool:
        return (collection, currency) in self._windows

    def warm(self, collection: str, currency: str, history: Iterable[tuple[datetime, str, Decimal]]) -> None:
        """Seed a key's window with earlier sales ``(ts, event_id, price)``."""
        w = self._windows.setdefault((collection, currency), _Window())
        for ts, event_id, price in history:
            w.add(ts, event_id, price)

    def observe(self, sale: SaleFacts) -> Optional[Alert]:
        """Score ``sale`` against what was known just before it, then learn it."""
        w = self._windows.setdefault((sale.collection, sale.currency), _Window())
        w.expire(sale.ts - self.window)
        alert = None
        if len(w.prices) >= self.min_history and sale.event_id not in w.ids:
            median = w.median()
            if median > 0 and sale.price >= self.multiple * median:
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
                    },
                    synthetic=sale.synthetic,
                )
        w.add(sale.ts, sale.event_id, sale.price)
        return alert

"""Tiny records and event streams for the detector tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import ClassVar

T0 = datetime(2021, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Sale:
    kind: ClassVar[str] = "sales"
    event_id: str
    ts: datetime
    collection: str
    item_id: str
    price: Decimal
    currency: str = "ETH"
    synthetic: bool = False


@dataclass(frozen=True)
class Listing:
    kind: ClassVar[str] = "listings"
    event_id: str
    ts: datetime
    collection: str
    item_id: str
    price: Decimal
    currency: str = "ETH"
    synthetic: bool = False


def price(level: float, rng: random.Random, sigma: float = 0.25) -> Decimal:
    return Decimal(str(round(level * rng.lognormvariate(0.0, sigma), 6)))


def sales(levels: list[float], seed: int = 1, step_h: float = 2.0, collection: str = "punks",
          synthetic: bool = False, start: datetime = T0, prefix: str = "s") -> list[Sale]:
    """One sale per entry of ``levels`` (its market level), ``step_h`` hours apart."""
    rng = random.Random(seed)
    return [Sale(f"{prefix}{i}", start + timedelta(hours=step_h * i), collection, str(rng.randrange(10000)),
                 price(level, rng), synthetic=synthetic) for i, level in enumerate(levels)]


def market(n: int = 400, seed: int = 3, shift_at: int = 250, factor: float = 0.5, burst_at: int = 300) -> list:
    """Sales and listings of one collection, one every 30 minutes except 60
    events 3 minutes apart from ``burst_at`` on, with the price level
    multiplied by ``factor`` from event ``shift_at`` on; a few synthetic
    events mixed in."""
    rng = random.Random(seed)
    out: list = []
    ts = T0
    for i in range(n):
        level = 10.0 * (factor if i >= shift_at else 1.0)
        ts += timedelta(minutes=3 if burst_at <= i < burst_at + 60 else 30)
        item = str(rng.randrange(300))
        synthetic = i % 17 == 0
        if rng.random() < 0.5:
            out.append(Listing(f"l{i}", ts, "punks", item, price(level * 1.2, rng, 0.15), synthetic=synthetic))
        else:
            out.append(Sale(f"s{i}", ts, "punks", item, price(level, rng), synthetic=synthetic))
    return out

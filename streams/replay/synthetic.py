"""Seeded synthetic CryptoPunks listings and bids around the real sales.

The real data has completed sales only, so the listings (asks) and bids
(offers) that the monitor also consumes are made up here, and every one is
labelled ``synthetic=True`` with its own ``source``:

* listings (``source="synthetic-listings"``): for each real sale, with
  probability ``listing_probability``, 1..``max_listings`` listings of the
  punk by the sale's seller on marketplace ``"larvalabs"``, strictly after
  the punk's previous sale (the seller owned it by then) and strictly before
  this sale, at most ``max_lead`` earlier. Asking prices are
  ``sale price * lognormal(price_drift, price_sigma)``; a punk relisted
  several times steps its price down towards the sale.
* punk bids (``source="synthetic-punk-bids"``, ``auction_id="punks-<id>"``):
  for a sale made by accepting a bid (buyer ``0x000...``) the accepted bid
  itself (amount = sale price, one second to ``max_lead`` before the sale)
  plus lower bids before it; for other sales, with probability
  ``bid_probability``, 1..``max_bids`` bids below the sale price.

Everything is drawn from ``random.Random`` streams seeded from ``seed`` (one
stream per kind), event ids are ``syn<seed>-listing-<n>`` /
``syn<seed>-punkbid-<n>``: the same seed and sales give identical records.
Prices are ``Decimal`` quantised to ``decimals`` places, never negative.

Examples
--------
>>> from streams.replay.sources import load_punk_sales
>>> sales = load_punk_sales()[:200]
>>> a = synthetic_listings(sales, seed=1)
>>> a == synthetic_listings(sales, seed=1), a == synthetic_listings(sales, seed=2)
(True, False)
>>> all(l.synthetic and l.source == "synthetic-listings" for l in a)
True
>>> by_item = {}
>>> for s in sales: by_item.setdefault(s.item_id, []).append(s.ts)
>>> all(any(l.ts < t for t in by_item[l.item_id]) for l in a)
True
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Optional, Sequence

from streams.records import Bid, Listing, Sale
from streams.replay.sources import PUNKS_COLLECTION, ZERO_ADDRESS

__all__ = [
    "SyntheticConfig",
    "synthetic_listings",
    "synthetic_punk_bids",
    "generate",
]


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator (defaults give ~0.9 listings per sale).

    Attributes
    ----------
    listing_probability : float
        Chance that a sale gets listings before it.
    max_listings : int
        Listings per such sale are uniform in ``1..max_listings``.
    max_lead : timedelta
        How long before the sale the earliest listing/bid may be.
    min_lead : timedelta
        Typical shortest lead; the lead is log-uniform in
        ``[min_lead, max_lead]`` and clipped to the ownership window.
    price_drift, price_sigma : float
        Asking price factor is ``lognormal(price_drift, price_sigma)``.
    bid_probability : float
        Chance that a sale not made by accepting a bid gets bids.
    max_bids : int
        Bids per such sale are uniform in ``1..max_bids``.
    decimals : int
        Decimal places of generated prices.
    marketplace : str
        Marketplace of the listings.
    market_open : datetime
        Nothing is generated before this (the CryptoPunks market contract
        went live on 2017-06-23; punks were claimed, not bought, before).
    """

    listing_probability: float = 0.6
    max_listings: int = 3
    max_lead: timedelta = timedelta(days=14)
    min_lead: timedelta = timedelta(minutes=5)
    price_drift: float = 0.10
    price_sigma: float = 0.15
    bid_probability: float = 0.3
    max_bids: int = 3
    decimals: int = 6
    marketplace: str = "larvalabs"
    market_open: datetime = datetime(2017, 6, 23, tzinfo=timezone.utc)


DEFAULT_CONFIG = SyntheticConfig()


def _quantum(decimals: int) -> Decimal:
    return Decimal(1).scaleb(-decimals)


def _price(base: Decimal, factor: float, decimals: int) -> Decimal:
    # Prices under 1e-3 (a few 2017 punk sales, down to 1 wei) keep 3
    # significant digits instead of rounding to 0, but never below 1 wei.
    if base > 0:
        decimals = min(max(decimals, 2 - base.adjusted()), 18)
    # repr(float) is exact and platform independent; 9 digits are plenty.
    value = (base * Decimal(f"{factor:.9f}")).quantize(_quantum(decimals), rounding=ROUND_HALF_EVEN)
    return max(value, Decimal(0).quantize(_quantum(decimals)))


def _windows(sales: Sequence[Sale], config: SyntheticConfig):
    """Yield (sale, earliest allowed ts, window seconds) per sale.

    The window opens one second after the punk's previous sale (or
    ``max_lead`` before this one, or ``market_open``, whichever is latest)
    and closes one second before this sale. ``window_s < 1`` means no room.
    """
    last_sale: dict[str, datetime] = {}
    for sale in sales:
        lower = max(sale.ts - config.max_lead, config.market_open)
        prev = last_sale.get(sale.item_id)
        if prev is not None and prev + timedelta(seconds=1) > lower:
            lower = prev + timedelta(seconds=1)
        window_s = int((sale.ts - lower).total_seconds())  # leads allowed: 1..window_s
        yield sale, window_s
        last_sale[sale.item_id] = sale.ts


def _leads(rng: random.Random, n: int, window_s: int, config: SyntheticConfig) -> list[int]:
    """``n`` distinct-ish lead times in seconds, 1..window_s, largest first."""
    lo = max(1.0, config.min_lead.total_seconds())
    hi = max(lo, config.max_lead.total_seconds())
    leads = []
    for _ in range(n):
        lead = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if lead > window_s:
            lead = rng.randint(1, window_s)
        leads.append(max(1, lead))
    return sorted(leads, reverse=True)


def synthetic_listings(
    sales: Sequence[Sale], seed: int, config: SyntheticConfig = DEFAULT_CONFIG
) -> list[Listing]:
    """Synthetic listings before the given real sales.

    Parameters
    ----------
    sales : sequence of Sale
        Real sales in time order (``load_punk_sales()``).
    seed : int
        Generator seed.
    config : SyntheticConfig, optional

    Returns
    -------
    list[Listing]
        In generation order (sale by sale, earliest listing first); not
        globally time-sorted. Every listing has ``ts`` strictly before its
        sale and strictly after the punk's previous sale.
    """
    rng = random.Random(f"artwatch-synthetic-listings:{seed}")
    out: list[Listing] = []
    for sale, window_s in _windows(sales, config):
        # Draw first so that the stream of draws does not depend on the window.
        if rng.random() >= config.listing_probability:
            continue
        n = rng.randint(1, max(1, config.max_listings))
        factors = sorted(
            (rng.lognormvariate(config.price_drift, config.price_sigma) for _ in range(n)), reverse=True
        )
        leads = _leads(rng, n, max(window_s, 1), config)
        if window_s < 1:
            continue  # resold within the same second: no room for a listing
        for lead, factor in zip(leads, factors):
            out.append(
                Listing(
                    event_id=f"syn{seed}-listing-{len(out)}",
                    ts=sale.ts - timedelta(seconds=lead),
                    synthetic=True,
                    source="synthetic-listings",
                    marketplace=config.marketplace,
                    collection=PUNKS_COLLECTION,
                    item_id=sale.item_id,
                    seller=sale.seller,
                    price=_price(sale.price, factor, config.decimals),
                    currency=sale.currency,
                    image_ref=f"{PUNKS_COLLECTION}/{sale.item_id}",
                )
            )
    return out


def _address(rng: random.Random) -> str:
    return f"0x{rng.getrandbits(160):040x}"


def synthetic_punk_bids(
    sales: Sequence[Sale], seed: int, config: SyntheticConfig = DEFAULT_CONFIG
) -> list[Bid]:
    """Synthetic bids (offers) on punks around the given real sales.

    Parameters
    ----------
    sales : sequence of Sale
        Real sales in time order.
    seed : int
        Generator seed.
    config : SyntheticConfig, optional

    Returns
    -------
    list[Bid]
        One auction per sale, ``auction_id="punks-<id>-<sale time>"``,
        ``collection="cryptopunks"``, random bidder addresses, amounts
        ascending within an auction and below the sale price, except that for
        a sale made by accepting a bid the last bid is exactly the sale price.
        All strictly before their sale, in generation order.

    Examples
    --------
    >>> from streams.replay.sources import load_punk_sales
    >>> bids = synthetic_punk_bids(load_punk_sales()[:50], seed=3)
    >>> bids[0].auction_id, bids[0].synthetic, bids[0].source
    ('punks-544-20170623T210506Z', True, 'synthetic-punk-bids')
    """
    rng = random.Random(f"artwatch-synthetic-punk-bids:{seed}")
    out: list[Bid] = []
    q = _quantum(config.decimals)
    for sale, window_s in _windows(sales, config):
        accepted = sale.buyer == ZERO_ADDRESS
        if not accepted and rng.random() >= config.bid_probability:
            continue
        n = rng.randint(1, max(1, config.max_bids))
        # Offers below the price, rising over time; an accepted bid ends at the price.
        fractions = sorted(rng.uniform(0.5, 0.97) for _ in range(n))
        if accepted:
            fractions[-1] = 1.0
        leads = _leads(rng, n, max(window_s, 1), config)
        bidders = [_address(rng) for _ in range(n)]
        if window_s < 1:
            continue
        for lead, fraction, bidder in zip(leads, fractions, bidders):
            amount = sale.price if fraction == 1.0 else _price(sale.price, fraction, config.decimals)
            out.append(
                Bid(
                    event_id=f"syn{seed}-punkbid-{len(out)}",
                    ts=sale.ts - timedelta(seconds=lead),
                    synthetic=True,
                    source="synthetic-punk-bids",
                    auction_id=f"punks-{sale.item_id}-{sale.ts:%Y%m%dT%H%M%SZ}",
                    item_id=sale.item_id,
                    collection=PUNKS_COLLECTION,
                    bidder=bidder,
                    amount=max(amount, Decimal(0).quantize(q)),
                    currency=sale.currency,
                )
            )
    return out


def generate(
    sales: Sequence[Sale],
    seed: int,
    config: Optional[SyntheticConfig] = None,
    *,
    bids: bool = True,
) -> tuple[list[Listing], list[Bid]]:
    """Both synthetic feeds for ``sales``: ``(listings, punk_bids)``.

    The two feeds use independent random streams, so turning bids off does
    not change the listings.
    """
    config = config or DEFAULT_CONFIG
    listings = synthetic_listings(sales, seed, config)
    punk_bids = synthetic_punk_bids(sales, seed, config) if bids else []
    return listings, punk_bids

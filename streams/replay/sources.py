"""Loaders of the real market history shipped in ``streams/replay/data``.

Each loader reads its CSV once (``functools.lru_cache``) and returns wire
records from :mod:`streams.records`, in event-time order, with
``synthetic=False``. Callers must not mutate the returned lists (they are
shared by the cache); copy them first.

Examples
--------
>>> sales = load_punk_sales()
>>> len(sales), sales[0].item_id, str(sales[0].price), sales[0].currency
(10224, '544', '0.01', 'ETH')
>>> load_punk_sales_skipped()
9
>>> bids = load_auction_bids()
>>> len(bids), bids[0].collection, bids[0].ts.isoformat()
(26066, 'art-auction-house-5', '2020-12-26T00:36:45+00:00')
>>> load_punk_attributes()[0]["accessories"]
('Green Eye Shadow', 'Earring', 'Blonde Bob')
"""

from __future__ import annotations

import csv
import logging
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from streams.records import Bid, Sale

__all__ = [
    "DATA_DIR",
    "PUNKS_COLLECTION",
    "ZERO_ADDRESS",
    "load_punk_sales",
    "load_punk_sales_skipped",
    "load_auction_bids",
    "load_punk_attributes",
    "wei_to_eth",
]

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
PUNKS_COLLECTION = "cryptopunks"
#: Buyer of a sale made by accepting a bid (``acceptBidForPunk``): the contract
#: clears the bid before it emits ``PunkBought``, so the event names no buyer.
ZERO_ADDRESS = "0x" + "0" * 40

_WEI_EXP = -18


def wei_to_eth(wei: str) -> Decimal:
    """Convert an integer wei string to ETH exactly.

    Parameters
    ----------
    wei : str
        Non-negative integer amount in wei (may exceed int64).

    Returns
    -------
    Decimal
        ``wei / 10**18`` without rounding, trailing zeros removed and no
        positive exponent (``4200``, not ``4.2E+3``).

    Examples
    --------
    >>> wei_to_eth("10000000000000000"), wei_to_eth("4200000000000000000000"), wei_to_eth("1")
    (Decimal('0.01'), Decimal('4200'), Decimal('1E-18'))
    """
    if not wei.isdigit():
        raise ValueError(f"price_wei must be a non-negative integer, got {wei!r}")
    value = Decimal(wei).scaleb(_WEI_EXP).normalize()
    if value.as_tuple().exponent > 0:  # type: ignore[operator]
        value = value.quantize(Decimal(1))
    return value


def _utc(text: str) -> datetime:
    # fromisoformat accepts "Z" from Python 3.11 on; every row carries a zone.
    ts = datetime.fromisoformat(text)
    if ts.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    return ts


@lru_cache(maxsize=None)
def _punk_sales(path: Path) -> tuple[list[Sale], int]:
    sales: list[Sale] = []
    skipped = 0
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            wei = row["price_wei"].strip()
            if not wei:
                skipped += 1
                continue
            sales.append(
                Sale(
                    event_id="punks-sale-" + row["tx"],
                    ts=_utc(row["timestamp_utc"]),
                    synthetic=False,
                    source="cryptopunks-sales",
                    collection=PUNKS_COLLECTION,
                    item_id=str(int(row["punk_id"])),
                    buyer=row["to"],
                    seller=row["from"],
                    price=wei_to_eth(wei),
                    currency="ETH",
                    tx=row["tx"],
                )
            )
    if skipped:
        log.info("skipped %d CryptoPunks sales without a price in %s", skipped, path.name)
    # The file is sorted by (timestamp, block, tx, punk_id); a stable sort keeps that.
    sales.sort(key=lambda s: s.ts)
    return sales, skipped


def load_punk_sales() -> list[Sale]:
    """Every CryptoPunks sale from 2017-06-23 to 2021-04-05, oldest first.

    Returns
    -------
    list[Sale]
        10,224 sales (10,233 rows minus the 9 without a price, see
        :func:`load_punk_sales_skipped`). ``price`` is exact
        (``price_wei / 10**18``); 10 rows are below 1e-6 ETH and are kept.
        ``buyer`` is :data:`ZERO_ADDRESS` for the 1,926 sales made by
        accepting a bid (the real buyer is not known). ``event_id`` is
        ``"punks-sale-" + tx`` (the tx hash is unique per row).

    Notes
    -----
    Cached: the same list object is returned on every call; do not mutate it.
    """
    return _punk_sales(DATA_DIR / "cryptopunks_sales.csv")[0]


def load_punk_sales_skipped() -> int:
    """Number of sale rows :func:`load_punk_sales` skipped for lack of a price (9)."""
    return _punk_sales(DATA_DIR / "cryptopunks_sales.csv")[1]


@lru_cache(maxsize=None)
def _auction_bids(path: Path) -> list[Bid]:
    bids: list[Bid] = []
    with path.open(newline="", encoding="utf-8") as fh:
        for index, row in enumerate(csv.DictReader(fh)):
            bids.append(
                Bid(
                    # The row index keeps the id unique for the 4 duplicate source rows.
                    event_id=f"art-bid-{row['lot_id']}-{row['bid_seq']}-{index}",
                    ts=_utc(row["bid_time"]),
                    synthetic=False,
                    source="art-auction-bids",
                    auction_id=str(int(row["auction_id"])),
                    item_id=str(int(row["lot_id"])),
                    collection=f"art-auction-house-{int(row['auction_house'])}",
                    bidder=str(row["bidder_id"]),
                    amount=Decimal(row["bid_amount"]),
                    currency=row["currency"] or "CNY",
                )
            )
    bids.sort(key=lambda b: b.ts)
    return bids


def load_auction_bids() -> list[Bid]:
    """Real bids of 6 Chinese online art auction houses, oldest first.

    Returns
    -------
    list[Bid]
        26,066 bids (2020-12-26 .. 2023-07-09), amounts in CNY, ``ts`` in
        UTC (the source's ``+08:00`` local time converted). ``collection`` is
        ``"art-auction-house-<n>"``, ``auction_id`` the sale session,
        ``item_id`` the global lot id. ``event_id`` is
        ``"art-bid-<lot>-<bid_seq>-<row>"``.

    Notes
    -----
    Cached: the same list object is returned on every call; do not mutate it.
    """
    return _auction_bids(DATA_DIR / "art_auction_bids.csv")


@lru_cache(maxsize=None)
def _punk_attributes(path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            punk_id = int(row["punk_id"])
            accessories = tuple(a for a in row["accessories"].split("|") if a)
            out[punk_id] = {
                "punk_id": punk_id,
                "type": row["type"],
                "gender": row["gender"],
                "skin_tone": row["skin_tone"] or None,
                "accessory_count": int(row["accessory_count"]),
                "accessories": accessories,
            }
    return out


def load_punk_attributes() -> dict[int, dict[str, Any]]:
    """Attributes of the 10,000 CryptoPunks, keyed by punk id.

    Returns
    -------
    dict[int, dict]
        ``{"punk_id": int, "type": "Human"|"Zombie"|"Ape"|"Alien",
        "gender": "Male"|"Female", "skin_tone": str | None (None for
        non-humans), "accessory_count": int, "accessories": tuple[str, ...]}``.

    Notes
    -----
    Cached: the same dict is returned on every call; do not mutate it.
    """
    return _punk_attributes(DATA_DIR / "cryptopunks_attributes.csv")

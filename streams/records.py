"""Wire records of every topic, defined once.

msgspec structs rather than ``faust.Record``: the topics carry raw bytes and
each agent decodes a whole batch with one typed decoder (~1 µs per event,
measured in ../shared/notes/faust-throughput.md), which keeps the edge strict
(unknown currency, naive timestamp, negative price are rejected here) and cheap.
Money is ``Decimal``; timestamps must carry a zone and are normalised to UTC.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, ClassVar, Optional

import msgspec

from alerts.alert import Alert

__all__ = [
    "CURRENCIES",
    "Event",
    "Listing",
    "Bid",
    "Sale",
    "Image",
    "Alert",
    "DeadLetter",
    "RECORD_TYPES",
]

# ISO 4217 codes plus the chain currencies the markets quote in.
CURRENCIES = frozenset({"ETH", "WETH", "USD", "USDC", "CNY", "EUR", "GBP", "HKD", "JPY"})
MAX_INLINE_IMAGE_BYTES = 512 * 1024

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(max_length=256)]
UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]


# No market quotes outside these (1 wei is 1e-18 ETH); PostgreSQL's numeric
# holds far more, but a value like 1e200000 cannot even be sent to it.
MONEY_MAX_EXPONENT = 20  # < 1e21
MONEY_MIN_EXPONENT = -18  # >= 1e-18 unless zero


def _check_money(value: Decimal, field: str) -> None:
    if not value.is_finite():
        raise ValueError(f"{field} must be a finite number, got {value}")
    if value < 0:
        raise ValueError(f"{field} must not be negative, got {value}")
    if value and not MONEY_MIN_EXPONENT <= value.adjusted() <= MONEY_MAX_EXPONENT:
        raise ValueError(f"{field} {value} is out of range (1e{MONEY_MIN_EXPONENT} to 1e{MONEY_MAX_EXPONENT + 1})")


def _check_currency(code: str) -> None:
    if code not in CURRENCIES:
        raise ValueError(f"unknown currency {code!r}; known: {', '.join(sorted(CURRENCIES))}")


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """Fields every market event carries.

    ``synthetic`` is True for every event artwatch made up (listings and punk
    bids around real sales, generated images, injected anomalies); real
    history replays with False. ``source`` names the feed or generator.
    """

    kind: ClassVar[str] = "event"

    event_id: Id
    ts: UtcTime
    synthetic: bool = False
    source: Name = ""

    def __post_init__(self) -> None:
        if self.ts.utcoffset():
            msgspec.structs.force_setattr(self, "ts", self.ts.astimezone(timezone.utc))


class Listing(Event, frozen=True):
    kind: ClassVar[str] = "listings"

    marketplace: Name
    collection: Name
    item_id: Id
    seller: Name
    price: Decimal
    currency: str
    image_ref: Optional[Name] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_money(self.price, "price")
        _check_currency(self.currency)


class Bid(Event, frozen=True):
    kind: ClassVar[str] = "bids"

    auction_id: Id
    item_id: Id
    collection: Name
    bidder: Name
    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_money(self.amount, "amount")
        _check_currency(self.currency)


class Sale(Event, frozen=True):
    kind: ClassVar[str] = "sales"

    collection: Name
    item_id: Id
    buyer: Name
    seller: Name
    price: Decimal
    currency: str
    tx: Optional[Name] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_money(self.price, "price")
        _check_currency(self.currency)


class Image(Event, frozen=True):
    """An item's image: inline bytes (<= 512 KiB, base64 in JSON) or a uri."""

    kind: ClassVar[str] = "images"

    item_id: Id
    collection: Name
    content_type: Annotated[str, msgspec.Meta(pattern=r"^image/[a-z0-9.+-]+$")]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    data: Optional[bytes] = None
    uri: Optional[Annotated[str, msgspec.Meta(max_length=2048)]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.data is None) == (self.uri is None):
            raise ValueError("an image carries exactly one of data or uri")
        if self.data is not None:
            if len(self.data) > MAX_INLINE_IMAGE_BYTES:
                raise ValueError(f"inline image of {len(self.data)} bytes exceeds 512 KiB; send a uri")
            if hashlib.sha256(self.data).hexdigest() != self.sha256:
                raise ValueError("sha256 does not match the image bytes")


class DeadLetter(msgspec.Struct, kw_only=True, frozen=True):
    """A message that failed validation, with where it came from and why."""

    ts: UtcTime
    topic: str
    partition: int
    offset: int
    reason: str
    error: str
    key: Optional[bytes] = None
    value: Optional[bytes] = None


RECORD_TYPES: dict[str, type[Event]] = {cls.kind: cls for cls in (Listing, Bid, Sale, Image)}

"""Wire records of every topic, defined once.

msgspec structs rather than ``faust.Record``: the topics carry raw bytes and
each agent decodes a whole batch with one typed decoder (~1 µs per event,
measured in ../shared/notes/faust-throughput.md), which keeps the edge strict
(unknown currency, naive timestamp, negative price are rejected here) and cheap.
Money is ``Decimal`` (sent as a decimal string in one form, :data:`MONEY_PATTERN`);
timestamps must carry a zone and are normalised to UTC. Unknown fields are
refused: a misspelt ``synthetic`` must not silently mean a real event.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Optional

import msgspec

from alerts.alert import Alert

__all__ = [
    "CURRENCIES",
    "MONEY_PATTERN",
    "MAX_MONEY_DIGITS",
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
# A name the record cannot do without (collection, buyer, seller, ...).
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=256)]
UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]

# Money on the wire is a JSON string of ASCII digits with an optional
# fraction and an optional exponent: "4200.5", "0.01", "1E-18". The exponent
# is there because Python's Decimal (and so msgspec's encoder, which every
# producer here uses) and Java's BigDecimal.toString write values below 1e-6
# that way. No sign, spaces, underscores, leading zeros, non-ASCII digits,
# NaN or Infinity, which Decimal() would all accept. JSON numbers are refused:
# one form only, and a number in JSON is a binary float to most parsers.
MONEY_PATTERN = r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]{1,6})?\Z"
_money_form = re.compile(MONEY_PATTERN).match
# At most 38 significant digits: with the range below, every digit of a
# price lies between 1e20 and 1e-55, so rollup sums (infra/db/rollup.py,
# precision 100) and numeric stay exact.
MAX_MONEY_DIGITS = 38

if TYPE_CHECKING:
    Money = Decimal
else:  # decoded as text (checked and converted in __post_init__); the attribute is a Decimal
    Money = Annotated[str, msgspec.Meta(max_length=80)]


# No market quotes outside these (1 wei is 1e-18 ETH); PostgreSQL's numeric
# holds far more, but a value like 1e200000 cannot even be sent to it.
MONEY_MAX_EXPONENT = 20  # < 1e21
MONEY_MIN_EXPONENT = -18  # >= 1e-18 unless zero


def _money(value: Any, field: str) -> Decimal:
    """The Decimal of a wire string or of a Decimal a producer built;
    ValueError when it is no acceptable amount.

    The wire's common case costs a regex match and a Decimal() (~300 ns in
    all): the pattern already rules out signs, NaN and Infinity."""
    if type(value) is str and _money_form(value):
        amount = Decimal(value)
        # A string this short cannot hold too many digits: skip the tuple.
        if (not amount or MONEY_MIN_EXPONENT <= amount.adjusted() <= MONEY_MAX_EXPONENT) and (
            len(value) <= MAX_MONEY_DIGITS or len(amount.as_tuple().digits) <= MAX_MONEY_DIGITS
        ):
            return amount
        value = amount
    elif type(value) is str:
        raise ValueError(_money_form_problem(value, field))
    elif not isinstance(value, Decimal):
        raise TypeError(f"{field} must be a Decimal or a decimal string, got {type(value).__name__}")
    _check_money(value, field)
    return value


def _money_form_problem(text: str, field: str) -> str:
    """Say why ``text`` is not in MONEY_PATTERN's form, as plainly as possible."""
    stripped = text.strip()
    if stripped.lstrip("+-").lower() in ("nan", "snan", "inf", "infinity"):
        return f"{field} must be a finite number, got {text[:40]!r}"
    if stripped.startswith("-"):
        return f"{field} must not be negative, got {text[:40]!r}"
    return (f"{field} must be a decimal string of ASCII digits, an optional fraction and exponent"
            f" (\"12.5\", \"1E-18\"; no sign, spaces, underscores or leading zeros), got {text[:40]!r}")


def _check_money(value: Decimal, field: str) -> None:
    if not value.is_finite():
        raise ValueError(f"{field} must be a finite number, got {value}")
    if value < 0:
        raise ValueError(f"{field} must not be negative, got {value}")
    if value and not MONEY_MIN_EXPONENT <= value.adjusted() <= MONEY_MAX_EXPONENT:
        raise ValueError(f"{field} {value} is out of range (1e{MONEY_MIN_EXPONENT} to 1e{MONEY_MAX_EXPONENT + 1})")
    if len(value.as_tuple().digits) > MAX_MONEY_DIGITS:
        raise ValueError(f"{field} has more than {MAX_MONEY_DIGITS} significant digits")


def _no_blank(record: "Event", *fields: str) -> None:
    """Names made of spaces only are as empty as "" (which the field types refuse)."""
    for name in fields:
        if getattr(record, name).isspace():
            raise ValueError(f"{name} must not be blank")


def _check_currency(code: str) -> None:
    if code not in CURRENCIES:
        raise ValueError(f"unknown currency {code!r}; known: {', '.join(sorted(CURRENCIES))}")


class Event(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Fields every market event carries.

    ``synthetic`` is True for every event artwatch made up (listings and punk
    bids around real sales, generated images, injected anomalies); real
    history replays with False. ``source`` names the feed or generator.
    """

    kind: ClassVar[str] = "event"

    event_id: Id
    ts: UtcTime
    synthetic: bool = False
    source: Text = ""

    def __post_init__(self) -> None:
        if self.ts.utcoffset():
            try:
                utc = self.ts.astimezone(timezone.utc)
            except OverflowError:  # 0001-01-01T00:00+01:00 has no UTC datetime
                raise ValueError(f"ts {self.ts.isoformat()} is out of range in UTC") from None
            msgspec.structs.force_setattr(self, "ts", utc)


class Listing(Event, frozen=True):
    kind: ClassVar[str] = "listings"

    marketplace: Name
    collection: Name
    item_id: Id
    seller: Name
    price: Money
    currency: str
    image_ref: Optional[Name] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        msgspec.structs.force_setattr(self, "price", _money(self.price, "price"))
        _check_currency(self.currency)
        _no_blank(self, "event_id", "marketplace", "collection", "item_id", "seller")


class Bid(Event, frozen=True):
    kind: ClassVar[str] = "bids"

    auction_id: Id
    item_id: Id
    collection: Name
    bidder: Name
    amount: Money
    currency: str

    def __post_init__(self) -> None:
        super().__post_init__()
        msgspec.structs.force_setattr(self, "amount", _money(self.amount, "amount"))
        _check_currency(self.currency)
        _no_blank(self, "event_id", "auction_id", "item_id", "collection", "bidder")


class Sale(Event, frozen=True):
    kind: ClassVar[str] = "sales"

    collection: Name
    item_id: Id
    buyer: Name
    seller: Name
    price: Money
    currency: str
    tx: Optional[Name] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        msgspec.structs.force_setattr(self, "price", _money(self.price, "price"))
        _check_currency(self.currency)
        _no_blank(self, "event_id", "collection", "item_id", "buyer", "seller")


class Image(Event, frozen=True):
    """An item's image: inline bytes (<= 512 KiB, base64 in JSON) or a uri.

    The shape is checked here; whether the bytes are a usable raster of the
    declared type and the uri an allowed one needs the settings, so
    streams.validation checks it (streams/image_checks.py)."""

    kind: ClassVar[str] = "images"

    item_id: Id
    collection: Name
    content_type: Annotated[str, msgspec.Meta(max_length=64)]  # a raster type, checked at the edge
    # \Z, not $: "$" also matches before a final newline.
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
    data: Optional[bytes] = None
    uri: Optional[Annotated[str, msgspec.Meta(max_length=2048)]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _no_blank(self, "event_id", "item_id", "collection")
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

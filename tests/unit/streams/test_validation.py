"""Edge validation: every rejection reason, and valid records of every kind."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest

from infra.settings import ValidationSettings
from streams.records import RECORD_TYPES, Bid, Image, Listing, Sale
from streams.validation import REASONS, Rejected, Validator

UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


def clock() -> float:
    return NOW.timestamp()


def validator(kind: str, **settings) -> Validator:
    return Validator(kind, ValidationSettings(**settings), clock=clock)


def sale_json(**over) -> dict:
    doc = {
        "event_id": "s-1",
        "ts": "2021-03-04T05:06:07Z",
        "collection": "cryptopunks",
        "item_id": "7804",
        "buyer": "0xb",
        "seller": "0xs",
        "price": "4200.5",
        "currency": "ETH",
        "tx": "0xabc",
    }
    doc.update(over)
    return doc


def listing_json(**over) -> dict:
    doc = {
        "event_id": "l-1",
        "ts": "2021-03-04T05:06:07Z",
        "marketplace": "larvalabs",
        "collection": "cryptopunks",
        "item_id": "1",
        "seller": "0xs",
        "price": "12.25",
        "currency": "WETH",
        "synthetic": True,
        "source": "synthetic-listings",
    }
    doc.update(over)
    return doc


def bid_json(**over) -> dict:
    doc = {
        "event_id": "b-1",
        "ts": "2019-11-20T10:00:00+08:00",
        "auction_id": "poly-2019-autumn",
        "item_id": "lot-17",
        "collection": "chinese-paintings",
        "bidder": "paddle-42",
        "amount": 1500000,
        "currency": "CNY",
    }
    doc.update(over)
    return doc


def image_json(**over) -> dict:
    doc = {
        "event_id": "i-1",
        "ts": "2021-03-04T05:06:07Z",
        "item_id": "1",
        "collection": "cryptopunks",
        "content_type": "image/png",
        "sha256": hashlib.sha256(PNG).hexdigest(),
        "data": base64.b64encode(PNG).decode(),
    }
    doc.update(over)
    return doc


def enc(doc: dict) -> bytes:
    return msgspec.json.encode(doc)


def reject(v: Validator, raw) -> Rejected:
    with pytest.raises(Rejected) as info:
        v.decode(raw)
    assert info.value.reason in REASONS
    return info.value


# --- one test per reason -------------------------------------------------------


def test_reasons_are_the_documented_bounded_set():
    assert set(REASONS) == {
        "empty", "oversized", "malformed_json", "missing_field", "invalid_field", "future_timestamp",
        "rejected_by_database",  # set by the pipeline for what the edge let through (tests/integration)
    }
    assert len(REASONS) == len(set(REASONS))


@pytest.mark.parametrize("raw", [None, b""])
def test_empty(raw):
    assert reject(validator("sales"), raw).reason == "empty"


def test_oversized_uses_the_configured_limit():
    raw = enc(sale_json())
    v = validator("sales", max_message_bytes=len(raw) - 1)
    r = reject(v, raw)
    assert r.reason == "oversized"
    assert str(len(raw)) in r.error
    # exactly at the limit is accepted
    assert validator("sales", max_message_bytes=len(raw)).decode(raw).event_id == "s-1"


def test_oversized_is_checked_before_parsing():
    # Garbage that is also too long is reported as oversized, never parsed.
    assert reject(validator("sales", max_message_bytes=8), b"{" * 9).reason == "oversized"


@pytest.mark.parametrize("raw", [b'{"event_id": "x"', b"not json", b"{]", b"\xff\xfe"])
def test_malformed_json(raw):
    assert reject(validator("sales"), raw).reason == "malformed_json"


@pytest.mark.parametrize("kind", sorted(RECORD_TYPES))
@pytest.mark.parametrize("field", ["event_id", "ts"])
def test_missing_common_field(kind, field):
    docs = {"sales": sale_json, "listings": listing_json, "bids": bid_json, "images": image_json}
    doc = docs[kind]()
    del doc[field]
    r = reject(validator(kind), enc(doc))
    assert r.reason == "missing_field"
    assert field in r.error


@pytest.mark.parametrize(
    ("kind", "doc", "field"),
    [
        ("sales", sale_json, "price"),
        ("sales", sale_json, "currency"),
        ("listings", listing_json, "marketplace"),
        ("bids", bid_json, "amount"),
        ("images", image_json, "sha256"),
    ],
)
def test_missing_kind_field(kind, doc, field):
    d = doc()
    del d[field]
    r = reject(validator(kind), enc(d))
    assert r.reason == "missing_field"
    assert field in r.error


@pytest.mark.parametrize(
    ("kind", "doc", "message"),
    [
        ("sales", sale_json(price="-1"), "negative"),
        ("sales", sale_json(price=-0.01), "negative"),
        ("bids", bid_json(amount=-5), "negative"),
        ("listings", listing_json(price="-3"), "negative"),
        ("sales", sale_json(currency="DOGE"), "currency"),
        ("sales", sale_json(currency="eth"), "currency"),
        ("bids", bid_json(currency="XXX"), "currency"),
        ("sales", sale_json(price="NaN"), "finite"),
        ("sales", sale_json(price="Infinity"), "finite"),
        ("listings", listing_json(price="-Infinity"), "finite"),
        ("sales", sale_json(ts="2021-03-04T05:06:07"), "timezone"),
        ("bids", bid_json(ts="2019-11-20T10:00:00"), "timezone"),
        ("sales", sale_json(ts="yesterday"), "datetime"),
        ("sales", sale_json(price="a lot"), "decimal"),
        ("sales", sale_json(event_id=""), "event_id"),
        ("sales", sale_json(item_id=7804), "item_id"),
        ("images", image_json(sha256="0" * 64), "sha256"),
        ("images", image_json(sha256="ABC"), "sha256"),
        ("images", image_json(sha256=hashlib.sha256(PNG).hexdigest().upper()), "sha256"),
        ("images", image_json(uri="https://example.org/1.png"), "exactly one"),
        ("images", image_json(data=None), "exactly one"),
        ("images", image_json(content_type="text/html"), "content_type"),
        # Values PostgreSQL cannot take would fail the whole batch at the database.
        ("sales", sale_json(price="1e200000"), "out of range"),
        ("sales", sale_json(price="1e21"), "out of range"),
        ("bids", bid_json(amount="1e-19"), "out of range"),
        ("sales", sale_json(buyer="0x\u0000b"), "buyer contains a NUL"),
        ("sales", sale_json(ts="0001-01-03T00:00:00Z"), "before 1900-01-01"),
        ("bids", bid_json(ts="1899-12-31T23:59:59Z"), "before 1900-01-01"),
        ("listings", listing_json(collection="punks\u0000"), "collection contains a NUL"),
        ("images", image_json(uri="https://x.org/\u0000.png", data=None), "uri contains a NUL"),
    ],
)
def test_invalid_field(kind, doc, message):
    r = reject(validator(kind), enc(doc))
    assert r.reason == "invalid_field", r
    assert message.lower() in r.error.lower()


def test_invalid_field_wrong_shape():
    # Valid JSON, wrong type at the top: not malformed, but invalid.
    assert reject(validator("sales"), b"[]").reason == "invalid_field"
    assert reject(validator("sales"), b'"sale"').reason == "invalid_field"


def test_image_without_data_or_uri_is_invalid():
    d = image_json()
    del d["data"]
    assert reject(validator("images"), enc(d)).reason == "invalid_field"


def test_future_timestamp_with_injected_clock():
    v = validator("sales", max_future_skew_s=300)
    within = NOW + timedelta(seconds=299)
    beyond = NOW + timedelta(seconds=301)
    assert v.decode(enc(sale_json(ts=within.isoformat()))).ts == within
    r = reject(v, enc(sale_json(ts=beyond.isoformat())))
    assert r.reason == "future_timestamp"
    assert "301s ahead" in r.error
    # A zone other than UTC is compared as an instant, not as wall time.
    beyond_local = beyond.astimezone(timezone(timedelta(hours=8)))
    assert reject(v, enc(sale_json(ts=beyond_local.isoformat()))).reason == "future_timestamp"
    # Moving the clock forward makes the same message acceptable.
    later = Validator("sales", ValidationSettings(max_future_skew_s=300), clock=lambda: beyond.timestamp())
    assert later.decode(enc(sale_json(ts=beyond.isoformat()))).ts == beyond


def test_money_at_the_bounds_and_nul_lookalikes_are_fine():
    v = validator("sales")
    for price in ("0", "0.000000000000000001", "999999999999999999999", "12.5000000000000000000000000000"):
        assert v.decode(enc(sale_json(price=price))).price == Decimal(price)
    # The text "\u0000" (an escaped backslash, then u0000) is no NUL character.
    assert v.decode(enc(sale_json(buyer="lit\\u0000eral"))).buyer == "lit\\u0000eral"
    # Image bytes may hold NULs (bytea).
    assert validator("images").decode(enc(image_json())).data == PNG


def test_past_timestamps_are_fine():
    assert validator("sales").decode(enc(sale_json(ts="2017-06-23T00:00:00Z"))).ts.year == 2017
    assert validator("sales").decode(enc(sale_json(ts="1900-01-01T00:00:00Z"))).ts.year == 1900


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown record kind"):
        Validator("trades", ValidationSettings())


# --- valid records ---------------------------------------------------------------


def test_valid_sale():
    s = validator("sales").decode(enc(sale_json()))
    assert isinstance(s, Sale)
    assert s.price == Decimal("4200.5") and isinstance(s.price, Decimal)
    assert s.ts == datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert (s.synthetic, s.source, s.tx) == (False, "", "0xabc")


def test_valid_listing():
    rec = validator("listings").decode(enc(listing_json()))
    assert isinstance(rec, Listing)
    assert (rec.marketplace, rec.price, rec.currency, rec.synthetic, rec.image_ref) == (
        "larvalabs", Decimal("12.25"), "WETH", True, None,
    )


def test_valid_bid_normalised_to_utc():
    rec = validator("bids").decode(enc(bid_json()))
    assert isinstance(rec, Bid)
    assert rec.amount == Decimal(1500000)
    assert rec.ts == datetime(2019, 11, 20, 2, 0, tzinfo=UTC)
    assert rec.ts.utcoffset() == timedelta(0)
    assert rec.ts.tzinfo is UTC


def test_valid_image_inline_and_by_uri():
    v = validator("images")
    inline = v.decode(enc(image_json()))
    assert isinstance(inline, Image)
    assert inline.data == PNG and inline.uri is None
    d = image_json(uri="https://example.org/punk/1.png")
    del d["data"]
    by_uri = v.decode(enc(d))
    assert by_uri.data is None and by_uri.uri.endswith("1.png")


@pytest.mark.parametrize(
    ("kind", "doc"),
    [("sales", sale_json), ("listings", listing_json), ("bids", bid_json), ("images", image_json)],
)
def test_plus_eight_offset_becomes_utc_for_every_kind(kind, doc):
    rec = validator(kind).decode(enc(doc(ts="2021-03-04T13:06:07.250+08:00")))
    assert type(rec) is RECORD_TYPES[kind]
    assert rec.ts.tzinfo is UTC
    assert rec.ts == datetime(2021, 3, 4, 5, 6, 7, 250000, tzinfo=UTC)
    assert rec.ts.hour == 5  # wall time moved, not just the zone label
    # Re-encoding carries the UTC form.
    assert msgspec.json.decode(msgspec.json.encode(rec))["ts"].startswith("2021-03-04T05:06:07.25")


def test_negative_offset_and_zero_offset_normalised():
    v = validator("sales")
    west = v.decode(enc(sale_json(ts="2021-03-03T23:06:07-06:00")))
    assert west.ts == datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC) and west.ts.tzinfo is UTC
    zero = v.decode(enc(sale_json(ts="2021-03-04T05:06:07+00:00")))
    assert zero.ts.utcoffset() == timedelta(0)


def test_roundtrip_of_every_record_kind():
    for kind, doc in (("sales", sale_json), ("listings", listing_json), ("bids", bid_json), ("images", image_json)):
        v = validator(kind)
        rec = v.decode(enc(doc()))
        assert v.decode(msgspec.json.encode(rec)) == rec


def test_not_after_computed_once_for_a_batch():
    v = validator("sales", max_future_skew_s=300)
    limit = v.not_after()
    assert limit == NOW + timedelta(seconds=300) and limit.tzinfo is not None
    raw_ahead = enc(sale_json(ts=(NOW + timedelta(seconds=350)).isoformat()))
    # an explicit limit wins over the clock, both ways
    assert v.decode(raw_ahead, not_after=NOW + timedelta(seconds=400)).ts == NOW + timedelta(seconds=350)
    raw_soon = enc(sale_json(ts=(NOW + timedelta(seconds=10)).isoformat()))
    assert v.decode(raw_soon).ts == NOW + timedelta(seconds=10)
    with pytest.raises(Rejected) as info:
        v.decode(raw_soon, not_after=NOW)
    assert info.value.reason == "future_timestamp"

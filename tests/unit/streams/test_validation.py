"""Edge validation: every rejection reason, and valid records of every kind."""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec
import numpy as np
import pytest

from infra.settings import Settings, ValidationSettings
from streams.records import RECORD_TYPES, Bid, Image, Listing, Sale
from streams.replay.png import encode_png
from streams.validation import REASONS, Rejected, Validator

UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
PNG = encode_png(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))  # 3x2, a real PNG
# Real 3x2 files from Pillow 13 (not a dependency; written once, kept here).
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQERMUFRUVDA8XGBYU"
    "GBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/wAARCAACAAMD"
    "ASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKB"
    "kaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZ"
    "mqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQF"
    "BgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5"
    "OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX"
    "2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDI+Pngjw5H8X/EsaaBpaxxzJGiCzjAVVjQKoG3gAAADsBRRRX9y8Ef8ktlX/YPR/8A"
    "TcT9dyj/AJF2G/wQ/wDSUf/Z"
)
JPEG_PROGRESSIVE = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQERMUFRUVDA8XGBYU"
    "GBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/wgARCAACAAMD"
    "ASIAAhEBAxEB/8QAFQABAQAAAAAAAAAAAAAAAAAAAAT/xAAVAQEBAAAAAAAAAAAAAAAAAAAGB//aAAwDAQACEAMQAAABjFyXf//EABYQAQEBAAAA"
    "AAAAAAAAAAAAAAQFAf/aAAgBAQABBQK+I+V//8QAGhEAAAcAAAAAAAAAAAAAAAAAAAEDBDRxsf/aAAgBAwEBPwFpHTosH//EABsRAAAHAQAAAAAA"
    "AAAAAAAAAAABAgQFNXOy/9oACAECAQE/AYSra5o5If/EABsQAAEEAwAAAAAAAAAAAAAAAAEAAwQREzJR/9oACAEBAAY/ApIwNUDWg4v/xAAXEAEB"
    "AQEAAAAAAAAAAAAAAAABMQAR/9oACAEBAAE/IRoQQQAcJv/aAAwDAQACAAMAAAAQ/wD/xAAWEQADAAAAAAAAAAAAAAAAAAAAUfD/2gAIAQMBAT8Q"
    "vof/xAAUEQEAAAAAAAAAAAAAAAAAAAAA/9oACAECAQE/EHD/xAAXEAEAAwAAAAAAAAAAAAAAAAABADFB/9oACAEBAAE/EBtgsACBQAAMCf/Z"
)
WEBP_LOSSY = base64.b64decode(
    "UklGRmQAAABXRUJQVlA4IFgAAADwAgCdASoDAAIAAUAmJagCdLoBQAKoAyQD9AAW7PazAADif/x223wt/87x3gqVDYDzZP/sxvj6yv4U3/5Nl/0x"
    "vj6yv4U3/loX3gaxymehwaRA5TOSQAAA"
)
WEBP_LOSSLESS = base64.b64decode("UklGRjQAAABXRUJQVlA4TCgAAAAvAkAAAC8gEEjaH3qN+RcQFPk/2vwHH0QCg0K2EeDQvQSncBH9j2MF")
WEBP_ALPHA = base64.b64decode(  # VP8X: extended format, with an ALPH chunk
    "UklGRlAAAABXRUJQVlA4WAoAAAAQAAAAAgAAAQAAQUxQSAcAAAAAgICAgICAAFZQOCAiAAAAcAEAnQEqAwACAAFAJiWUAnQBQAAA/vw3gVf31Og+"
    "K+AAAA=="
)
GIF = base64.b64decode("R0lGODdhAwACAIIAAP//AAD//wD/AP8A//8AAAAA/wAAAAAAACwAAAAAAwACAAAICQAJCCgAIMCAgAA7")
# A 5x4 GIF87a under the GIF89a signature (89a only adds extensions it does not use).
GIF89 = b"GIF89a" + base64.b64decode("R0lGODdhBQAEAIEAAAECAwAAAAAAAAAAACwAAAAABQAEAAAICQABCBxIsGDBgAA7")[6:]
SAMPLES = {  # name: (content type, bytes, declared width x height)
    "png": ("image/png", PNG, (3, 2)),
    "jpeg": ("image/jpeg", JPEG, (3, 2)),
    "jpeg-progressive": ("image/jpeg", JPEG_PROGRESSIVE, (3, 2)),
    "webp-lossy": ("image/webp", WEBP_LOSSY, (3, 2)),
    "webp-lossless": ("image/webp", WEBP_LOSSLESS, (3, 2)),
    "webp-extended": ("image/webp", WEBP_ALPHA, (3, 2)),
    "gif87a": ("image/gif", GIF, (3, 2)),
    "gif89a": ("image/gif", GIF89, (5, 4)),
}


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
        "amount": "1500000",
        "currency": "CNY",
    }
    doc.update(over)
    return doc


def image_json(**over) -> dict:
    return inline_image_json(PNG, "image/png", **over)


def inline_image_json(image: bytes, content_type: str, /, **over) -> dict:
    doc = {
        "event_id": "i-1",
        "ts": "2021-03-04T05:06:07Z",
        "item_id": "1",
        "collection": "cryptopunks",
        "content_type": content_type,
        "sha256": hashlib.sha256(image).hexdigest(),
        "data": base64.b64encode(image).decode(),
    }
    doc.update(over)
    return doc


def uri_image_json(uri: str, **over) -> dict:
    doc = image_json(uri=uri, **over)
    del doc["data"]
    return doc


DOCS = {"sales": sale_json, "listings": listing_json, "bids": bid_json, "images": image_json}


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
        "empty", "oversized", "malformed_json", "missing_field", "unknown_field", "invalid_field",
        "future_timestamp", "invalid_image", "forbidden_uri", "undecodable",
        # set by the pipeline: what the edge let through but the database refused (tests/integration),
        # and an event_id seen again with another time or content
        "rejected_by_database", "conflicting_duplicate",
        # set by the batch engine: a record batch the consumer cannot read
        "corrupt_batch",
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
    doc = DOCS[kind]()
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
        ("bids", bid_json(amount="-5"), "negative"),
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
        # Values PostgreSQL cannot take would fail the whole batch at the database.
        ("sales", sale_json(price="1e200000"), "out of range"),
        ("sales", sale_json(price="1e21"), "out of range"),
        ("bids", bid_json(amount="1e-19"), "out of range"),
        ("sales", sale_json(buyer="0x\u0000b"), "buyer contains a NUL character (U+0000)"),
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


# --- the catch-all: the crashers of issue 8, by name ------------------------------


def test_invalid_utf8_in_a_string_is_malformed_json():
    for raw in (enc(sale_json(source="SRC")).replace(b"SRC", b"\xff\xfe"),  # a value
                enc(sale_json(buyer="B")).replace(b'"B"', b'"\xc3"'),  # cut multi-byte sequence
                enc(sale_json()).replace(b'"tx"', b'"t\xe9"')):  # a key
        r = reject(validator("sales"), raw)
        assert r.reason == "malformed_json", r
        assert "UnicodeDecodeError" in r.error or "UTF-8" in r.error


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
@pytest.mark.parametrize("kind", sorted(RECORD_TYPES))
def test_timestamps_that_overflow_in_utc_are_invalid(kind, ts):
    r = reject(validator(kind), enc(DOCS[kind](ts=ts)))
    assert r.reason == "invalid_field"
    assert "out of range in UTC" in r.error


def test_an_unknown_field_nested_a_thousand_deep_is_refused_unread():
    deep = b"[" * 1000 + b"]" * 1000
    raw = enc(sale_json()).replace(b'"tx"', b'"pad":' + deep + b',"tx"')
    assert len(raw) < 2500
    r = reject(validator("sales"), raw)
    assert r.reason == "unknown_field" and "pad" in r.error


@pytest.mark.parametrize("name", ["\\u0000", "\\n\\u202e", "x" * 5000])
def test_an_error_quoting_the_input_is_escaped_and_bounded(name):
    """msgspec quotes an unknown field's name; the error becomes a dead
    letter's text (NUL cannot be stored: a crash loop) and a log line."""
    raw = enc(sale_json()).replace(b'"tx"', b'"' + name.encode() + b'":1,"tx"')
    r = reject(validator("sales"), raw)
    assert r.reason == "unknown_field"
    assert not set(r.error) & {"\x00", "\n", "\u202e"} and len(r.error) <= 1000


def test_deep_nesting_in_a_known_field_or_at_the_top():
    arrays, objects = b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    v = validator("sales")
    for deep in (arrays, objects):
        assert reject(v, enc(sale_json(source="S")).replace(b'"S"', deep)).reason == "invalid_field"
    assert reject(v, arrays).reason == "invalid_field"
    assert reject(v, objects).reason == "unknown_field"


class _AnyExtra(Sale, frozen=True):
    """A record with a free-form field, as a future schema might add: msgspec
    then recurses into whatever it holds (the RecursionError of issue 8)."""

    extra: Any = None


class _Faulty(Sale, frozen=True):
    """A record whose own check has a bug or is interrupted."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "bug":
            raise ZeroDivisionError("division by zero in a check")
        if self.source == "interrupt":
            raise KeyboardInterrupt


def test_the_catch_all_names_the_exception_class_and_bounds_the_text():
    v = validator("sales")
    v._decoder = msgspec.json.Decoder(_AnyExtra)  # the real decoder, of a record with an Any field
    deep = b"[" * 100_000 + b"]" * 100_000
    r = reject(v, enc(sale_json()).replace(b'"tx"', b'"extra":' + deep + b',"tx"'))
    assert r.reason == "undecodable"
    assert r.error.startswith("RecursionError: ")
    assert len(r.error) <= 300
    v._decoder = msgspec.json.Decoder(_Faulty)
    r = reject(v, enc(sale_json(source="bug")))
    assert (r.reason, r.error) == ("undecodable", "ZeroDivisionError: division by zero in a check")
    # Not an Exception: a stop signal still stops the worker.
    with pytest.raises(KeyboardInterrupt):
        v.decode(enc(sale_json(source="interrupt")))


@pytest.mark.parametrize("value", [bytearray(b"{}"), memoryview(b'{"a":1}'), "{}", 42])
def test_values_that_are_not_bytes_are_rejected_too(value):
    assert reject(validator("sales"), value).reason in REASONS


# --- unknown fields ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RECORD_TYPES))
def test_a_misspelt_synthetic_is_refused_not_read_as_real(kind):
    doc = DOCS[kind]()
    doc.pop("synthetic", None)
    doc["synthetik"] = True
    r = reject(validator(kind), enc(doc))
    assert r.reason == "unknown_field"
    assert "synthetik" in r.error


# --- money: one form, bounded digits --------------------------------------------------


@pytest.mark.parametrize(
    "price",
    ["1_000", " 12 ", "12 ", "\u0661\u0662", "\uff11\uff12", "+5", "-0", "0x10", "12.", ".5", "007", "00.5", "1e",
     "1E+", "1.2.3", "1,5", "NaN", "sNaN", "Inf", "-Infinity", "", "1e1234567", "12\n"],
)
def test_money_strings_outside_the_one_form_are_invalid(price):
    r = reject(validator("sales"), enc(sale_json(price=price)))
    assert r.reason == "invalid_field"
    assert "price" in r.error


@pytest.mark.parametrize("amount", [1500000, 12.5, 1e5, 0])
def test_money_as_a_json_number_is_invalid(amount):
    r = reject(validator("bids"), enc(bid_json(amount=amount)))
    assert r.reason == "invalid_field"
    assert "Expected `str`" in r.error and "amount" in r.error


@pytest.mark.parametrize(
    ("price", "value"),
    [("0", "0"), ("1e5", "100000"), ("1E-18", "0.000000000000000001"), ("4.2E+3", "4200"), ("0E-7", "0"),
     ("0.0000001", "1E-7"), ("1" * 21, "1" * 21)],
)
def test_money_in_the_form_decimal_writes_is_fine(price, value):
    assert validator("sales").decode(enc(sale_json(price=price))).price == Decimal(value)


def test_money_significant_digits_are_bounded():
    v = validator("listings")
    ok = "1." + "2" * 37  # 38 significant digits
    assert v.decode(enc(listing_json(price=ok))).price == Decimal(ok)
    for price in ("1." + "2" * 38, "0.000000000000000001" + "0" * 38):
        r = reject(v, enc(listing_json(price=price)))
        assert r.reason == "invalid_field" and "38 significant digits" in r.error
    # The 400-digit price of issue 8 is refused before it is even converted.
    r = reject(v, enc(listing_json(price="1." + "0" * 398 + "1")))
    assert r.reason == "invalid_field" and "length <= 80" in r.error and "price" in r.error
    # A producer's Decimal is held to the same bound.
    with pytest.raises(ValueError, match="38 significant digits"):
        Sale(**{**sale_json(ts=NOW, price=Decimal("1." + "0" * 398 + "1"))})


def test_producers_decimals_round_trip_through_the_edge():
    """Every value the range allows, as msgspec encodes it (str(Decimal),
    which uses an exponent below 1e-6), comes back equal."""
    v = validator("sales")
    for price in ("1E-18", "0.000000123", "123456789012345678901", "4.2E+3", "0.000000000000000000",
                  "123456789012345678901.12345678901234567"):
        sale = Sale(**{**sale_json(ts=NOW - timedelta(days=1)), "price": Decimal(price)})
        assert isinstance(sale.price, Decimal)
        back = v.decode(msgspec.json.encode(sale))
        assert back == sale and isinstance(back.price, Decimal)


def test_a_producer_must_pass_a_decimal_or_text():
    with pytest.raises(TypeError, match="price must be a Decimal"):
        Sale(**{**sale_json(ts=NOW), "price": 0.1})


# --- names and text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field"),
    [("sales", "collection"), ("sales", "buyer"), ("sales", "seller"), ("sales", "item_id"), ("sales", "tx"),
     ("listings", "marketplace"), ("listings", "seller"), ("listings", "image_ref"), ("bids", "bidder"),
     ("bids", "auction_id"), ("bids", "collection"), ("images", "collection"), ("images", "item_id")],
)
def test_required_names_are_not_empty(kind, field):
    r = reject(validator(kind), enc(DOCS[kind](**{field: ""})))
    assert r.reason == "invalid_field"
    assert field in r.error and "length >= 1" in r.error


@pytest.mark.parametrize(
    ("kind", "field"),
    [("sales", "collection"), ("sales", "buyer"), ("sales", "seller"), ("sales", "item_id"), ("sales", "event_id"),
     ("listings", "marketplace"), ("listings", "seller"), ("bids", "bidder"), ("bids", "auction_id"),
     ("images", "collection"), ("images", "item_id")],
)
def test_required_names_are_not_blank(kind, field):
    r = reject(validator(kind), enc(DOCS[kind](**{field: " \t "})))
    assert r.reason == "invalid_field"
    assert f"{field} must not be blank" in r.error


def test_source_may_be_empty():
    assert validator("sales").decode(enc(sale_json(source=""))).source == ""


@pytest.mark.parametrize(
    ("char", "what"),
    [("\u0007", "a control"), ("\u001b", "a control"), ("\u007f", "a control"), ("\u0085", "a control"),
     ("\u009f", "a control"), ("\u202e", "a bidi control"), ("\u202a", "a bidi control"),
     ("\u2066", "a bidi control"), ("\u2069", "a bidi control"), ("\u200e", "a bidi control"),
     ("\u200f", "a bidi control"), ("\u061c", "a bidi control"), ("\u0000", "a NUL")],
)
@pytest.mark.parametrize(
    ("kind", "field"), [("sales", "seller"), ("listings", "collection"), ("bids", "source"), ("images", "event_id")]
)
def test_control_and_bidi_characters_are_refused_in_any_text(kind, field, char, what):
    raw = enc(DOCS[kind](**{field: f"abc{char}gpj.exe"}))
    r = reject(validator(kind), raw)
    assert r.reason == "invalid_field"
    assert r.error == f"{field} contains {what} character (U+{ord(char):04X})"


def test_control_characters_in_a_uri_are_refused():
    r = reject(validator("images"), enc(uri_image_json("https://example.org/a\u202ebad.png")))
    assert r.reason == "invalid_field" and "uri contains a bidi control" in r.error


def test_a_raw_del_byte_is_caught_without_escapes_or_non_ascii():
    raw = enc(sale_json(buyer="0xB")).replace(b"0xB", b"0x\x7f")
    assert b"\\" not in raw and raw.isascii()
    assert reject(validator("sales"), raw).error == "buyer contains a control character (U+007F)"


def test_other_unicode_text_is_fine():
    v = validator("bids")
    for name in ("\u9f50\u767d\u77f3", "Beeple \u2728", "\u05e9\u05dc\u05d5\u05dd", "caf\u00e9", "\u00a0nbsp"):
        assert v.decode(enc(bid_json(collection=name))).collection == name


# --- images: raster types, magic, header, end -----------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_real_raster_images_of_every_type_are_accepted(name):
    content_type, data, _size = SAMPLES[name]
    rec = validator("images").decode(enc(inline_image_json(data, content_type)))
    assert rec.data == data and rec.content_type == content_type


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_declared_size_is_read_from_every_type(name):
    from streams.image_checks import image_size

    content_type, data, size = SAMPLES[name]
    assert image_size(content_type, data) == size
    w, h = size
    assert validator("images", image_max_pixels=w * h).decode(enc(inline_image_json(data, content_type)))
    r = reject(validator("images", image_max_pixels=w * h - 1), enc(inline_image_json(data, content_type)))
    assert r.reason == "invalid_image" and f"{w}x{h}" in r.error and "image_max_pixels" in r.error


SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        (SVG, "image/svg+xml", "not a raster type"),
        (SVG, "image/png", "not a PNG"),
        (b"#!/bin/sh\nrm -rf / --no-preserve-root\n", "image/png", "not a PNG"),
        (PNG, "text/html", "not a raster type"),
        (PNG, "image/x-portable-anymap", "not a raster type"),
        (PNG, "image/jpeg", "not a JPEG"),
        (JPEG, "image/png", "not a PNG"),
        (GIF, "image/webp", "not a WebP"),
        (WEBP_LOSSY, "image/gif", "not a GIF"),
        (PNG[:-12], "image/png", "truncated"),
        (PNG[: len(PNG) // 2], "image/png", "truncated"),
        (PNG[:20], "image/png", "IHDR"),
        (PNG + b"trailing", "image/png", "truncated"),
        (JPEG[:-2], "image/jpeg", "truncated"),
        (JPEG[: len(JPEG) // 2], "image/jpeg", "truncated"),
        (GIF[:-1], "image/gif", "truncated"),
        (WEBP_LOSSY[:-4], "image/webp", "truncated"),
        (WEBP_LOSSLESS + b"\0\0", "image/webp", "RIFF header says"),
        # SOI, a comment, then the scan: no frame header says how big the image is
        (b"\xff\xd8\xff\xfe\x00\x04hi\xff\xda\x00\x02\xff\xd9", "image/jpeg", "no readable frame header"),
        # thousands of tiny segments before any frame header: refused without walking them all
        (b"\xff\xd8" + b"\xff\xfe\x00\x02" * 100_000 + b"\xff\xd9", "image/jpeg", "no readable frame header"),
    ],
)
def test_bytes_that_are_not_what_they_claim_are_refused(data, content_type, message):
    r = reject(validator("images"), enc(inline_image_json(data, content_type)))
    assert r.reason == "invalid_image", r
    assert message in r.error


def _png_bomb(width: int, height: int) -> bytes:
    """A complete 1-bit greyscale PNG of zeros: a few hundred KB declaring billions of pixels."""
    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_50000_by_50000_png_bomb_is_refused():
    bomb = _png_bomb(50_000, 50_000)
    assert len(bomb) < 512 * 1024  # small enough to travel inline
    raw = enc(inline_image_json(bomb, "image/png"))
    assert len(raw) < ValidationSettings().max_message_bytes
    r = reject(validator("images"), raw)
    assert r.reason == "invalid_image"
    assert "50000x50000 = 2,500,000,000 pixels, above the limit of 40,000,000" in r.error


@pytest.mark.parametrize(
    ("data", "content_type", "size"),
    [
        (PNG[:16] + struct.pack(">II", 0, 2) + PNG[24:], "image/png", "0x2"),
        (GIF[:6] + struct.pack("<HH", 65535, 65535) + GIF[10:], "image/gif", "65535x65535"),
        (WEBP_ALPHA[:24] + b"\xff\x3f\x00\xff\x3f\x00" + WEBP_ALPHA[30:], "image/webp", "16384x16384"),
        (WEBP_LOSSLESS[:21] + struct.pack("<I", (0x3FFF << 14) | 0x3FFF) + WEBP_LOSSLESS[25:], "image/webp",
         "16384x16384"),
        (JPEG[:JPEG.index(b"\xff\xc0") + 5] + b"\xff\xff\xff\xff" + JPEG[JPEG.index(b"\xff\xc0") + 9:],
         "image/jpeg", "65535x65535"),
    ],
)
def test_declared_sizes_that_are_empty_or_huge_are_refused(data, content_type, size):
    r = reject(validator("images"), enc(inline_image_json(data, content_type)))
    assert r.reason == "invalid_image" and size in r.error


def test_an_image_by_uri_must_declare_a_raster_type():
    v = validator("images")
    assert v.decode(enc(uri_image_json("https://example.org/1.webp", content_type="image/webp"))).uri
    r = reject(v, enc(uri_image_json("https://example.org/1.svg", content_type="image/svg+xml")))
    assert r.reason == "invalid_image"


# --- image uris --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    ["https://example.org/punk/1.png", "https://ipfs.io/ipfs/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco",
     "HTTPS://CDN.Example.org/x.png", "https://example.org:8443/x.png?size=24#top", "https://example.org./x.png",
     "https://xn--bcher-kva.example/b%C3%BCcher.png", "https://a-b.c-d.example.com/"],
)
def test_public_https_uris_are_accepted(uri):
    assert validator("images").decode(enc(uri_image_json(uri))).uri == uri


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:///etc/shadow", "scheme 'file' is not allowed"),
        ("http://example.org/1.png", "scheme 'http' is not allowed"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data'"),
        ("ftp://example.org/1.png", "scheme 'ftp'"),
        ("/relative/1.png", "scheme ''"),
        ("https:///etc/shadow", "no host"),
        ("https://localhost/1.png", "local or internal"),
        ("https://LOCALHOST./1.png", "local or internal"),
        ("https://api.localhost/1.png", "local or internal"),
        ("https://printer.local/1.png", "local or internal"),
        ("https://db.internal/1.png", "local or internal"),
        ("https://router.home.arpa/1.png", "local or internal"),
        ("https://metadata/computeMetadata/v1/", "single-label"),
        ("https://127.0.0.1/1.png", "literal IP"),
        ("https://127.1/1.png", "literal IP"),
        ("https://2130706433/1.png", "literal IP"),
        ("https://0x7f000001/1.png", "literal IP"),
        ("https://10.0.0.1/1.png", "literal IP"),
        ("https://192.168.1.1:8080/1.png", "literal IP"),
        ("https://169.254.169.254/latest/meta-data/", "literal IP"),
        ("https://[::1]/1.png", "literal IPv6"),
        ("https://[fe80::1]/1.png", "literal IPv6"),
        ("https://[::ffff:127.0.0.1]/1.png", "literal IPv6"),
        ("https://user:secret@example.org/1.png", "credentials"),
        ("https://example.org@evil.example/1.png", "credentials"),
        ("https://example.org\\@evil.example/1.png", "outside RFC 3986"),
        ("https://exa mple.org/1.png", "outside RFC 3986"),
        ("https://\u00ebxample.org/1.png", "outside RFC 3986"),
        ("https://ex_ample.org/1.png", "not a valid DNS host name"),
        ("https://-example.org/1.png", "not a valid DNS host name"),
        ("https://example..org/1.png", "not a valid DNS host name"),
        ("https://%6c%6fcalhost/1.png", "not a valid DNS host name"),
        ("https://example.org:99999/1.png", "cannot be parsed"),
        ("https://[::1/1.png", "cannot be parsed"),
    ],
)
def test_uris_a_fetcher_must_not_follow_are_refused(uri, message):
    r = reject(validator("images"), enc(uri_image_json(uri)))
    assert r.reason == "forbidden_uri", r
    assert message in r.error


def test_configured_schemes_and_hosts():
    v = validator("images", image_uri_schemes=("https", "http"), image_uri_hosts=("ipfs.io", "*.nftstorage.link"))
    for uri in ("https://ipfs.io/ipfs/x", "http://ipfs.io/ipfs/x", "https://bafy.ipfs.nftstorage.link/1.png"):
        assert v.decode(enc(uri_image_json(uri))).uri == uri
    for uri in ("https://gateway.ipfs.io/x", "https://nftstorage.link/x", "https://evil.example/ipfs.io",
                "https://127.0.0.1/x", "https://ipfs.io.evil.example/x"):
        assert reject(v, enc(uri_image_json(uri))).reason == "forbidden_uri", uri
    # Listed hosts are the operator's choice, literal addresses included.
    own = validator("images", image_uri_hosts=("10.0.0.5",))
    assert own.decode(enc(uri_image_json("https://10.0.0.5/x.png"))).uri == "https://10.0.0.5/x.png"


def test_uri_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("ARTWATCH_VALIDATION__IMAGE_URI_HOSTS", '["IPFS.io", "*.NFTStorage.link"]')
    monkeypatch.setenv("ARTWATCH_VALIDATION__IMAGE_URI_SCHEMES", '["HTTPS"]')
    monkeypatch.setenv("ARTWATCH_VALIDATION__IMAGE_MAX_PIXELS", "1000000")
    s = Settings().validation
    assert (s.image_uri_hosts, s.image_uri_schemes, s.image_max_pixels) == (
        ("ipfs.io", "*.nftstorage.link"), ("https",), 1_000_000)
    for bad in ({"image_uri_hosts": ("https://ipfs.io",)}, {"image_uri_schemes": ("https:",)},
                {"image_uri_hosts": ("",)}, {"image_max_pixels": 0}):
        with pytest.raises(ValueError):
            ValidationSettings(**bad)
    assert ValidationSettings().image_uri_schemes == ("https",) and ValidationSettings().image_uri_hosts == ()


def test_decode_of_a_valid_event_stays_cheap():
    """A loose guard for a shared CI machine (~1.6 µs here, 1.3 µs before the
    stricter checks): it catches an order-of-magnitude slip, such as a scan of
    the decoded text for every event."""
    import time

    raw = enc(sale_json(ts=NOW.isoformat()))
    v = validator("sales")
    limit = v.not_after()
    best = min(_timed(v.decode, raw, limit, time.perf_counter) for _ in range(5))
    assert best < 10e-6, f"{best * 1e6:.1f} µs per event"


def _timed(decode, raw, limit, clock, n=2000) -> float:
    start = clock()
    for _ in range(n):
        decode(raw, limit)
    return (clock() - start) / n

"""Property: any bytes through the real Validator end as a record or a Rejected.

Issue 8, point 2. Hypothesis feeds arbitrary bytes and mutations of valid
records of every kind (byte flips, truncation, field deletions and
insertions, value swaps, deep nesting, odd unicode, huge numbers, odd
timestamps, damaged image bytes with a matching sha256) to
``Validator.decode`` of every kind. Nothing else may come out: no other
exception, no reason outside REASONS; and whatever is accepted must be a
clean record that survives its own round trip (replays and dead-letter
re-drives depend on it).

Runs derandomized (the same examples on every run, so CI is reproducible)
with no deadline and a few hundred examples per property.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from infra.settings import ValidationSettings
from streams import image_checks
from streams.records import MAX_MONEY_DIGITS, RECORD_TYPES
from streams.storage import row_builder
from streams.validation import REASONS, Rejected, Validator
from tests.unit.streams.test_validation import DOCS, SAMPLES, inline_image_json, uri_image_json

KINDS = sorted(RECORD_TYPES)
# Reasons only the pipeline gives (after the database): the edge never may.
EDGE_REASONS = frozenset(REASONS) - {"rejected_by_database", "conflicting_duplicate"}
# Written out here rather than taken from streams.validation, so a gap there shows.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
NOW = 1_717_243_200.0  # 2024-06-01T12:00:00Z: valid documents are in the past, some mutations are not

EDGE = settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VALIDATORS = {kind: Validator(kind, ValidationSettings(), clock=lambda: NOW) for kind in KINDS}
ROWS = {kind: row_builder(kind) for kind in KINDS}


def valid_docs() -> list[tuple[str, dict]]:
    """One valid document per kind, plus an inline image of every raster type and one by uri."""
    docs = [(kind, DOCS[kind]()) for kind in KINDS]
    docs += [("images", inline_image_json(data, ctype)) for ctype, data, _ in SAMPLES.values()]
    docs.append(("images", uri_image_json("https://example.org/punk/1.png")))
    return docs


VALID = valid_docs()


def assert_edge_contract(kind: str, raw) -> str:
    """Decode ``raw`` as ``kind``: a record or a Rejected, nothing else. Returns what happened."""
    try:
        record = VALIDATORS[kind].decode(raw)
    except Rejected as exc:
        assert exc.reason in EDGE_REASONS, exc
        assert isinstance(exc.error, str) and exc.error
        # the error becomes a dead letter's text (no NUL) and a log line (no newline), bounded
        assert "\x00" not in exc.error and "\n" not in exc.error and len(exc.error) <= 1000, exc.error
        return exc.reason
    assert type(record) is RECORD_TYPES[kind]
    _assert_clean(kind, record)
    return "accepted"


def check(kind: str, raw) -> None:
    """The property, with what happened counted (--hypothesis-show-statistics)."""
    event(f"{kind}: {assert_edge_contract(kind, raw)}")


def _assert_clean(kind: str, record) -> None:
    assert record.ts.utcoffset().total_seconds() == 0 and record.event_id
    for name in record.__struct_fields__:
        value = getattr(record, name)
        if isinstance(value, str):
            assert not any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in value), (name, value)
    for name in ("price", "amount"):
        if hasattr(record, name):
            money = getattr(record, name)
            assert type(money) is Decimal and money.is_finite() and money >= 0
            assert len(money.as_tuple().digits) <= MAX_MONEY_DIGITS
            assert not money or -18 <= money.adjusted() <= 20
    ROWS[kind](record)  # the storage mapping takes it
    # What was accepted is accepted again as the project encodes it.
    assert VALIDATORS[kind].decode(msgspec.json.encode(record)) == record


# --- strategies ---------------------------------------------------------------------------

odd_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\u0000", "\u202e", "\u2066x", "\u061c", "\u200f", "\u0085", "\x7f", "\ud800",
                     "\udfff", "\ufeff", "\U0001f600", "\u0661\u0662", "1_000", " 12 ", "NaN", "-0", "+1", "1e5",
                     "1E-18", "0E-20000", "9" * 60, "0." + "0" * 17 + "1", "image/svg+xml", "image/png",
                     "file:///etc/shadow", "https://127.0.0.1/x", "https://example.org/x.png"]),
)
odd_ts = st.one_of(
    st.datetimes(timezones=st.sampled_from([timezone.utc, None])).map(lambda d: d.isoformat()),
    st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z",
                     "9999-12-31T23:59:59Z", "1899-12-31T23:59:59Z", "1900-01-01T00:00:00Z", "2024-06-01T12:05:01Z",
                     "2024-02-30T00:00:00Z", "2021-03-04T05:06:07+24:00", "2021-03-04T05:06:07.123456789Z",
                     "2021-03-04 05:06:07Z", "20210304T050607Z", "", "yesterday"]),
)
huge_numbers = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
)


def _deep(depth: int) -> bytes:
    # Written as bytes: json.dumps itself recurses, and gives up near 1,000.
    half = depth // 2
    return b'{"k":[' * half + b"1" + b"]}" * half


# Placeholders json.dumps writes as they are; replaced by nesting afterwards.
DEEP = {f"<deep {n}>": _deep(n) for n in (50, 2000, 100_000)}


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), huge_numbers, odd_text, odd_ts),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(odd_text, children, max_size=3)),
    max_leaves=8,
) | st.sampled_from(sorted(DEEP))
field_names = st.sampled_from(sorted({f for cls in RECORD_TYPES.values() for f in cls.__struct_fields__}
                                     | {"synthetik", "Synthetic", "synthetic ", "kind", "__proto__", ""}))


@st.composite
def mutated_doc(draw) -> tuple[str, bytes]:
    """A valid document of some kind, changed a little, then encoded."""
    own_kind, doc = draw(st.sampled_from(VALID))
    doc = dict(doc)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        op = draw(st.sampled_from(["delete", "unknown", "set", "text", "text", "swap", "ts", "money"]))
        keys = sorted(doc)
        texts = sorted(k for k, v in doc.items() if isinstance(v, str))
        if op == "delete" and keys:
            doc.pop(draw(st.sampled_from(keys)))
        elif op == "unknown":
            doc[draw(field_names | odd_text)] = draw(json_values)
        elif op == "set" and keys:
            doc[draw(st.sampled_from(keys))] = draw(json_values)
        elif op == "text" and texts:  # keeps the type, so the checks behind the decoder are reached
            doc[draw(st.sampled_from(texts))] = draw(odd_text)
        elif op == "swap" and len(keys) > 1:
            a, b = draw(st.permutations(keys))[:2]
            doc[a], doc[b] = doc[b], doc[a]
        elif op == "ts":
            doc["ts"] = draw(odd_ts)
        elif op == "money":
            doc[draw(st.sampled_from(["price", "amount"]))] = draw(odd_text | huge_numbers)
    kind = draw(st.sampled_from([own_kind] * 3 + KINDS))  # mostly its own decoder, sometimes another
    ascii_only = draw(st.booleans())
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    for marker, nested in DEEP.items():
        raw = raw.replace(f'"{marker}"'.encode(), nested)
    return kind, raw


offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))
money_text = st.decimals(min_value=0, max_value=Decimal("1e22"), allow_nan=False, allow_infinity=False).flatmap(
    lambda d: st.sampled_from([str(d), format(d, "f"), format(d, "e")]))


@st.composite
def well_typed_doc(draw) -> tuple[str, bytes]:
    """A valid document with every text, time and amount replaced by an
    arbitrary value of the right JSON type: many are accepted, so the
    accepted side of the contract (clean, round-trips) is exercised too."""
    kind, doc = draw(st.sampled_from(VALID[:4]))  # one per kind: the images' sha256 must stay right
    doc = dict(doc)
    for key, value in doc.items():
        if not draw(st.booleans()):  # keep some fields valid, so that some documents pass
            continue
        if key in ("price", "amount"):
            doc[key] = draw(money_text)
        elif key == "ts":
            doc[key] = draw(st.datetimes(min_value=datetime(1899, 12, 31), timezones=offsets)).isoformat()
        elif isinstance(value, str) and key not in ("sha256", "data", "content_type", "currency"):
            doc[key] = draw(st.text(max_size=40) | odd_text)
    return kind, json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def damaged_bytes(draw) -> tuple[str, bytes]:
    """A valid encoded document with bytes flipped, cut, inserted, dropped or repeated."""
    kind, doc = draw(st.sampled_from(VALID))
    raw = bytearray(msgspec.json.encode(doc))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        i = draw(st.integers(min_value=0, max_value=len(raw)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "drop", "repeat"]))
        if op == "flip" and i < len(raw):
            raw[i] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"\\u0000", b"\\ud800", b"\xc3", b"\xff", b"\x7f", b"\xe2\x80\xae", b"[" * 300, b"1e999999"]))
        elif op == "drop":
            del raw[i:i + draw(st.integers(min_value=1, max_value=16))]
        elif op == "repeat":
            raw[i:i] = raw[i:i + draw(st.integers(min_value=1, max_value=32))]
    return draw(st.sampled_from([kind] * 3 + KINDS)), bytes(raw)


@st.composite
def damaged_image(draw) -> bytes:
    """A real image of some type with its bytes damaged, sha256 recomputed so
    the checks of the content itself are reached."""
    ctype, data, _ = draw(st.sampled_from(list(SAMPLES.values())))
    data = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        i = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if op == "flip" and i < len(data):
            data[i] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "header":  # the bytes a size is read from
            j = draw(st.integers(min_value=0, max_value=min(40, len(data))))
            data[j:j + 4] = draw(st.binary(min_size=4, max_size=4))
    declared = draw(st.sampled_from([ctype, ctype, *image_checks.RASTER_TYPES, "image/svg+xml"]))
    doc = inline_image_json(bytes(data), declared)
    return msgspec.json.encode(doc)


# --- properties ----------------------------------------------------------------------------


@EDGE
@given(raw=st.binary(max_size=2048), kind=st.sampled_from(KINDS))
def test_arbitrary_bytes(raw, kind):
    check(kind, raw)


@EDGE
@given(case=mutated_doc())
def test_mutated_documents_of_every_kind(case):
    check(*case)


@EDGE
@given(case=well_typed_doc())
def test_well_typed_documents_with_arbitrary_values(case):
    check(*case)


@EDGE
@given(case=damaged_bytes())
def test_damaged_encodings_of_every_kind(case):
    check(*case)


@EDGE
@given(raw=damaged_image())
def test_damaged_images_reach_the_content_checks(raw):
    check("images", raw)


@EDGE
@given(content_type=st.sampled_from(image_checks.RASTER_TYPES), data=st.binary(max_size=256)
       | st.sampled_from([s[1] for s in SAMPLES.values()]).flatmap(
           lambda d: st.integers(0, len(d)).map(lambda n: d[:n])))
def test_image_size_reads_any_bytes_as_a_size_or_a_value_error(content_type, data):
    try:
        width, height = image_checks.image_size(content_type, data)
    except ValueError:
        return
    assert isinstance(width, int) and isinstance(height, int) and width >= 0 and height >= 0


@EDGE
@given(uri=st.text(max_size=80) | st.from_regex(r"\A(https?|file|ftp)://[^/]{0,30}(/.{0,20})?\Z"))
def test_check_uri_answers_any_text_with_none_or_a_value_error(uri):
    try:
        image_checks.check_uri(uri, ("https",), ())
    except ValueError:
        return
    assert uri.lower().startswith("https://")


@pytest.mark.parametrize(("kind", "doc"), VALID, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(VALID)])
def test_the_seeds_of_the_mutations_are_valid(kind, doc):
    """The mutations start from valid records (else they prove little)."""
    assert assert_edge_contract(kind, msgspec.json.encode(doc)) == "accepted"

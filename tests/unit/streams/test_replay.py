"""Unit tests of streams.replay (no broker, no network)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import msgspec
import numpy as np
import pytest

from streams.records import Bid, Image, Listing, Sale
from streams.replay.pixelart import (
    render_avatar,
    sprite_image_events,
    sprite_tile,
    load_sprite_sheet,
    synthetic_image_event,
)
from streams.replay.png import decode_png, encode_png, png_size
from streams.replay.sources import (
    ZERO_ADDRESS,
    load_auction_bids,
    load_punk_attributes,
    load_punk_sales,
    load_punk_sales_skipped,
)
from streams.replay.synthetic import SyntheticConfig, synthetic_listings, synthetic_punk_bids
from streams.replay.timeline import build_timeline, count_kinds
from streams.validation import Rejected, Validator

SPRITE = Path(__file__).resolve().parents[3].parent / "shared/data/cryptopunks/punks.png"
SPRITE_SHA256 = "ac39af4793119ee46bbff351d8cb6b5f23da60222126add4268e261199a2921b"
UTC = timezone.utc


def _encoded(timeline) -> list[tuple[str, str, bytes]]:
    return [(kind, key, msgspec.json.encode(record)) for kind, key, record in timeline]


# --- sources -----------------------------------------------------------------


def test_punk_sales_counts_order_and_fields():
    sales = load_punk_sales()
    assert len(sales) == 10_233 - 9
    assert load_punk_sales_skipped() == 9
    assert all(isinstance(s, Sale) for s in sales)
    assert all(a.ts <= b.ts for a, b in zip(sales, sales[1:]))
    assert len({s.event_id for s in sales}) == len(sales)
    assert {s.currency for s in sales} == {"ETH"}
    assert not any(s.synthetic for s in sales)
    assert {s.source for s in sales} == {"cryptopunks-sales"}
    assert sum(s.buyer == ZERO_ADDRESS for s in sales) == 1_926
    first = sales[0]
    assert (first.item_id, first.price) == ("544", Decimal("0.01"))
    assert first.seller == "0xc352b534e8b987e036a93539fd6897f53488e56a"
    assert first.ts == datetime(2017, 6, 23, 21, 5, 6, tzinfo=UTC)
    assert first.event_id == "punks-sale-" + first.tx
    # exact wei arithmetic: the tiny "0.0 ETH" rows are kept, with their exact price
    assert min(s.price for s in sales) == Decimal("1E-18")
    assert max(s.price for s in sales) == Decimal("4200")


def test_auction_bids_counts_order_and_fields():
    bids = load_auction_bids()
    assert len(bids) == 26_066
    assert all(isinstance(b, Bid) for b in bids)
    assert all(a.ts <= b.ts for a, b in zip(bids, bids[1:]))
    assert len({b.event_id for b in bids}) == len(bids)
    assert {b.currency for b in bids} == {"CNY"}
    assert {b.collection for b in bids} == {f"art-auction-house-{n}" for n in range(1, 7)}
    assert len({b.auction_id for b in bids}) == 81
    assert len({b.item_id for b in bids}) == 1_851
    assert not any(b.synthetic for b in bids)
    first = bids[0]
    # 2020-12-26T08:36:45+08:00 in UTC
    assert first.ts == datetime(2020, 12, 26, 0, 36, 45, tzinfo=UTC)
    assert (first.auction_id, first.item_id, first.bidder, first.amount) == ("5001", "1061", "562", Decimal(6500))


def test_punk_attributes():
    attrs = load_punk_attributes()
    assert len(attrs) == 10_000
    assert attrs[0]["accessories"] == ("Green Eye Shadow", "Earring", "Blonde Bob")
    assert all(a["accessory_count"] == len(a["accessories"]) for a in attrs.values())
    assert sum(a["skin_tone"] is None for a in attrs.values()) == 121


# --- synthetic -----------------------------------------------------------------


def test_synthetic_listings_precede_their_sale_and_are_labelled():
    sales = load_punk_sales()
    listings = synthetic_listings(sales, seed=7)
    assert len(listings) > len(sales) // 2
    assert all(isinstance(x, Listing) and x.synthetic for x in listings)
    assert {x.source for x in listings} == {"synthetic-listings"}
    assert {x.marketplace for x in listings} == {"larvalabs"}
    assert len({x.event_id for x in listings}) == len(listings)
    # 6 decimals; prices under 1e-3 keep 3 significant digits instead, down to 1 wei (never 0).
    assert all(x.price > 0 and -18 <= x.price.as_tuple().exponent <= -6 for x in listings)
    assert all(x.price.as_tuple().exponent == -6 for x in listings if x.price >= Decimal("0.001"))
    # Each listing lies strictly inside (previous sale of the punk, next sale by its seller).
    by_item = defaultdict(list)
    for s in sales:
        by_item[s.item_id].append(s)
    for x in listings:
        nxt = next(s for s in by_item[x.item_id] if s.ts > x.ts)
        prev = [s for s in by_item[x.item_id] if s.ts <= x.ts]
        assert nxt.seller == x.seller
        assert x.ts < nxt.ts <= x.ts + SyntheticConfig().max_lead
        assert not prev or prev[-1].ts < x.ts
        assert x.image_ref == f"cryptopunks/{x.item_id}"


def test_synthetic_punk_bids():
    sales = load_punk_sales()
    bids = synthetic_punk_bids(sales, seed=7)
    assert all(b.synthetic and b.source == "synthetic-punk-bids" for b in bids)
    assert all(b.collection == "cryptopunks" and b.amount >= 0 for b in bids)
    assert len({b.event_id for b in bids}) == len(bids)
    # One auction per sale: its bids precede the sale and rise; none is above
    # the price, and a sale made by accepting a bid ends on exactly its price.
    sale_of = {f"punks-{s.item_id}-{s.ts:%Y%m%dT%H%M%SZ}": s for s in sales}
    auctions = defaultdict(list)
    for b in bids:
        auctions[b.auction_id].append(b)
    for auction_id, session in auctions.items():
        sale = sale_of[auction_id]
        session.sort(key=lambda b: b.ts)
        amounts = [b.amount for b in session]
        assert all(b.item_id == sale.item_id and b.ts < sale.ts for b in session), auction_id
        assert amounts == sorted(amounts) and amounts[-1] <= sale.price, (auction_id, amounts, sale.price)
        if sale.buyer == ZERO_ADDRESS:
            assert amounts[-1] == sale.price, (auction_id, amounts[-1], sale.price)
        elif sale.price > Decimal("1e-12"):  # (a sale of a few wei leaves no room below it)
            assert amounts[-1] < sale.price, (auction_id, amounts[-1], sale.price)
    accepted = [s for s in sales if s.buyer == ZERO_ADDRESS]
    with_bids = sum(f"punks-{s.item_id}-{s.ts:%Y%m%dT%H%M%SZ}" in auctions for s in accepted)
    assert with_bids >= 0.99 * len(accepted)  # every accepted bid has its bid (but a sale with no window)


def test_synthetic_is_deterministic_per_seed():
    sales = load_punk_sales()[:500]
    a = msgspec.json.encode(synthetic_listings(sales, seed=1) + synthetic_punk_bids(sales, seed=1))
    b = msgspec.json.encode(synthetic_listings(sales, seed=1) + synthetic_punk_bids(sales, seed=1))
    c = msgspec.json.encode(synthetic_listings(sales, seed=2) + synthetic_punk_bids(sales, seed=2))
    assert a == b != c


# --- timeline ------------------------------------------------------------------


def test_timeline_is_deterministic_and_seeded():
    first = _encoded(build_timeline(seed=7, limit=3000))
    again = _encoded(build_timeline(seed=7, limit=3000))
    other = _encoded(build_timeline(seed=8, limit=3000))
    assert len(first) == 3000
    assert first == again
    synthetic = lambda tl: [e for e in tl if b'"synthetic":true' in e[2]]  # noqa: E731
    assert synthetic(first) != synthetic(other)
    # The real events do not depend on the seed.
    real = lambda tl: [e for e in tl if b'"synthetic":false' in e[2]]  # noqa: E731
    common = min(len(real(first)), len(real(other)))
    assert real(first)[: common // 2] == real(other)[: common // 2]


def test_timeline_order_keys_and_images():
    tl = build_timeline(seed=7, limit=3000)
    ts = [r.ts for _, _, r in tl]
    assert ts == sorted(ts)
    assert len({r.event_id for _, _, r in tl}) == len(tl)
    seen = set()
    for i, (kind, key, record) in enumerate(tl):
        assert kind == record.kind
        if kind == "bids":
            assert key == record.auction_id
        else:
            assert key == record.item_id
        if kind == "images":
            assert record.item_id not in seen
            seen.add(record.item_id)
            nxt = tl[i + 1][2] if i + 1 < len(tl) else None
            assert nxt is None or (nxt.item_id == record.item_id and nxt.ts == record.ts)
        elif record.collection == "cryptopunks":
            assert record.item_id in seen  # its image came first
    counts = count_kinds(tl)
    assert counts["images"] == len(seen) and counts["sales"] > 0 and counts["listings"] > 0


def test_every_event_the_replay_makes_passes_the_edge():
    """The whole history (real sales and bids, synthetic listings, bids and
    images) as the publisher encodes it: nothing the project produces may be
    dead-lettered by its own worker (money below 1e-6 is written 1E-18 by
    msgspec, names must be non-empty, images complete PNGs)."""
    from infra.settings import ValidationSettings

    validators = {kind: Validator(kind, ValidationSettings(), clock=lambda: 2e9)
                  for kind in ("sales", "listings", "bids", "images")}
    encode = msgspec.json.Encoder().encode
    refused: dict[str, list[str]] = defaultdict(list)
    timeline = build_timeline(seed=7)
    for kind, _key, record in timeline:
        try:
            assert validators[kind].decode(encode(record)) == record
        except Rejected as exc:
            refused[exc.error[:120]].append(record.event_id)
    assert not refused, {error: ids[:3] for error, ids in refused.items()}
    assert count_kinds(timeline)["images"] > 5000
    assert any(r.price.adjusted() < -6 for k, _, r in timeline if k == "sales"), "exercise exponent-form money"


def _identities(timeline) -> dict[str, bytes]:
    return {record.event_id: msgspec.json.encode(record) for _kind, _key, record in timeline}


def test_replays_with_different_windows_never_reuse_an_id_for_other_content():
    """Issue 8, point 6: an image is announced at its item's first event in
    the window, so --start moves its time; its id must move with it. Any id
    that two replays share must name byte-identical events."""
    runs = [
        build_timeline(seed=7, limit=4000),
        build_timeline(seed=7, limit=4000, start=datetime(2017, 6, 24, tzinfo=UTC)),
        build_timeline(seed=7, limit=4000, start=datetime(2017, 7, 1, tzinfo=UTC)),
        build_timeline(seed=7, limit=4000, start=datetime(2018, 1, 1, tzinfo=UTC)),
        build_timeline(seed=7, limit=4000, start=datetime(2020, 12, 26, tzinfo=UTC)),
        build_timeline(seed=7, limit=4000, start=datetime(2020, 12, 26, tzinfo=UTC), include=("sales", "images")),
        build_timeline(seed=7, limit=4000, end=datetime(2018, 1, 1, 0, 0, 1, tzinfo=UTC)),
    ]
    seen: dict[str, bytes] = {}
    shared = moved = 0
    image_times: dict[str, set] = defaultdict(set)
    for timeline in runs:
        for event_id, encoded in _identities(timeline).items():
            if event_id in seen:
                shared += 1
                assert seen[event_id] == encoded, f"{event_id} names two different events"
            seen[event_id] = encoded
        for kind, _key, record in timeline:
            if kind == "images":
                image_times[record.item_id].add(record.ts)
    moved = sum(len(times) > 1 for times in image_times.values())
    assert shared > 10_000, "the windows overlap: ids must repeat, with the same content"
    assert moved > 100, "the windows move some images' times: those must have new ids"
    # Same arguments, same bytes, every time.
    assert _identities(build_timeline(seed=7, limit=4000, start=datetime(2018, 1, 1, tzinfo=UTC))) == \
        _identities(runs[3])


def test_an_image_id_changes_with_its_time_and_its_bytes():
    ts = datetime(2021, 3, 1, 12, tzinfo=UTC)
    a = synthetic_image_event("7804", ts, seed=7, collection="cryptopunks")
    assert synthetic_image_event("7804", ts, seed=7, collection="cryptopunks").event_id == a.event_id
    later = synthetic_image_event("7804", ts + timedelta(seconds=1), seed=7, collection="cryptopunks")
    assert later.data == a.data and later.event_id != a.event_id
    assert synthetic_image_event("7804", ts, seed=8, collection="cryptopunks").event_id != a.event_id
    # The same instant in another zone is the same event.
    east = ts.astimezone(timezone(timedelta(hours=8)))
    assert synthetic_image_event("7804", east, seed=7, collection="cryptopunks").event_id == a.event_id


def test_timeline_start_covers_both_feeds():
    start = datetime(2020, 12, 26, tzinfo=UTC)
    tl = build_timeline(seed=7, limit=3000, start=start)
    assert all(r.ts >= start for _, _, r in tl)
    sources = {r.source for _, _, r in tl}
    assert {"cryptopunks-sales", "art-auction-bids", "synthetic-listings", "synthetic-pixelart"} <= sources
    only_auction = build_timeline(seed=7, limit=50, include=("auction_bids",))
    assert {r.source for _, _, r in only_auction} == {"art-auction-bids"}
    with pytest.raises(ValueError):
        build_timeline(seed=7, limit=1, include=("nope",))
    with pytest.raises(ValueError):
        build_timeline(seed=7, limit=1, start=datetime(2020, 1, 1))


# --- PNG and images ----------------------------------------------------------------


@pytest.mark.parametrize("filter_type", [0, 1, 2, 3, 4])
def test_png_round_trip(filter_type):
    rng = np.random.default_rng(filter_type)
    px = rng.integers(0, 256, size=(17, 23, 4), dtype=np.uint8)
    px[5:9] = px[4]  # flat areas too
    data = encode_png(px, filter_type=filter_type)
    assert png_size(data) == (23, 17)
    assert np.array_equal(decode_png(data), px)


def test_png_decoder_rejects_corruption():
    data = bytearray(encode_png(render_avatar(1)))
    data[40] ^= 0xFF
    with pytest.raises(ValueError):
        decode_png(bytes(data))
    with pytest.raises(ValueError):
        decode_png(b"GIF89a")


def test_synthetic_image_validates_as_image_record():
    ts = datetime(2021, 3, 1, 12, tzinfo=UTC)
    attrs = load_punk_attributes()[7804]
    img = synthetic_image_event("7804", ts, seed=7, collection="cryptopunks", attributes=attrs)
    decoded = msgspec.json.decode(msgspec.json.encode(img), type=Image)
    assert decoded == img
    assert decoded.synthetic and decoded.source == "synthetic-pixelart"
    assert decoded.sha256 == hashlib.sha256(decoded.data).hexdigest()
    px = decode_png(decoded.data)
    assert px.shape == (24, 24, 4)
    assert synthetic_image_event("7804", ts, seed=7, collection="cryptopunks", attributes=attrs) == img
    assert synthetic_image_event("7804", ts, seed=8).data != img.data
    default = synthetic_image_event("x", ts, seed=1)
    assert default.collection == "synthetic-pixelart"


@pytest.mark.skipif(not SPRITE.exists(), reason=f"sprite sheet not available at {SPRITE}")
def test_sprite_tiles():
    assert hashlib.sha256(SPRITE.read_bytes()).hexdigest() == SPRITE_SHA256
    sheet = load_sprite_sheet(SPRITE)
    assert sheet.shape == (2400, 2400, 4)
    ids = [0, 1, 99, 100, 7804, 9999]
    ts = datetime(2021, 1, 1, tzinfo=UTC)
    events = sprite_image_events(SPRITE, ids, ts)
    assert [e.item_id for e in events] == [str(i) for i in ids]
    for punk_id, event in zip(ids, events):
        assert not event.synthetic and event.source == "user-sprite" and event.collection == "cryptopunks"
        assert msgspec.json.decode(msgspec.json.encode(event), type=Image) == event
        tile = decode_png(event.data)
        assert tile.shape == (24, 24, 4)
        x, y = (punk_id % 100) * 24, (punk_id // 100) * 24
        assert np.array_equal(tile, sheet[y : y + 24, x : x + 24])
        assert np.array_equal(tile, sprite_tile(sheet, punk_id))
        assert tile[..., 3].any()  # not an empty cell
    assert len({e.sha256 for e in events}) == len(ids)
    # The timeline can take its images from the sprite.
    tl = build_timeline(seed=7, limit=20, sprite_path=SPRITE)
    images = [r for k, _, r in tl if k == "images"]
    assert images and all(r.source == "user-sprite" and not r.synthetic for r in images)


# --- publisher (fake producer, no broker) --------------------------------------------


class _FakeFuture:
    def add_errback(self, fn):
        return self


class _FakeProducer:
    instances: list["_FakeProducer"] = []

    def __init__(self, **config):
        self.config = config
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.flushed = self.closed = False
        _FakeProducer.instances.append(self)

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))
        return _FakeFuture()

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


class _FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kafka-python's own import warnings
def test_publish_with_fake_producer(monkeypatch):
    import kafka

    from infra.settings import TopicNames
    from streams.replay import publisher

    monkeypatch.setattr(kafka, "KafkaProducer", _FakeProducer)
    clock = _FakeClock()
    monkeypatch.setattr(publisher.time, "sleep", clock.sleep)
    monkeypatch.setattr(publisher.time, "monotonic", clock.monotonic)
    sleeps = clock.sleeps
    topics = TopicNames(sales="s", listings="l", bids="b", images="i")
    tl = build_timeline(seed=7, limit=250)
    seen: list[int] = []
    counts = publisher.publish(tl, "127.0.0.1:1", topics, progress=seen.append, progress_every=100)
    producer = _FakeProducer.instances[-1]
    assert producer.flushed and producer.closed
    assert producer.config["acks"] == "all" and producer.config["bootstrap_servers"] == "127.0.0.1:1"
    assert sum(counts.values()) == 250 and seen == [100, 200, 250]
    names = topics.inputs()
    assert counts == {names[k]: n for k, n in count_kinds(tl).items() if k in names}
    for (kind, key, record), (topic, k, v) in zip(tl, producer.sent):
        assert topic == topics.inputs()[kind] and k == key.encode() and v == msgspec.json.encode(record)
    assert not sleeps
    # Paced: gaps divided by the speed-up, each wait capped at max_sleep_s.
    publisher.publish(tl[:50], "127.0.0.1:1", topics, speedup=60.0, max_sleep_s=0.5)
    assert sleeps and max(sleeps) <= 0.5 + 1e-9
    expected = sum(publisher.pace_delay(a[2].ts, b[2].ts, 60.0, 0.5) for a, b in zip(tl[:49], tl[1:50]))
    assert sum(sleeps) == pytest.approx(expected)
    with pytest.raises(ValueError):
        publisher.publish(tl, "127.0.0.1:1", topics, speedup=0)

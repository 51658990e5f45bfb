"""A flood of malformed messages mixed with valid ones, on every input topic.

``MALFORMED`` (20,000) messages no valid producer sends (arbitrary bytes,
truncated JSON, invalid UTF-8 inside strings, nesting thousands deep, times
out of range, huge or badly written numbers, unknown and misspelt fields,
wrong types, control and bidi characters, hostile images and uris, values
just over the size limit, empty values) are spread at random among ``VALID``
(20,000) replay events on all four input topics, all published in one burst.
One worker must take it all without restarting (same pid throughout). Then
every valid event is stored exactly once and nothing else is, every
malformed message is one row in ``deadletters`` by its (topic, partition,
offset) with a reason and an error text and no valid one is, every dead
letter is on the dead-letter topic below the producer's request limit, the
rollups equal the raw tables' aggregates and the alerts are stored once,
published and keyed, with no repeat (nothing crashed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
import time
import zlib
from collections import Counter, defaultdict

import msgspec
import numpy as np
import psycopg
import pytest

from streams.replay.png import encode_png
from tests.faults.helpers import (
    EVENT_TABLES,
    MALFORMED,
    VALID,
    assert_rollups_match,
    assert_stored_exactly_once,
    check_alerts,
    ids_by_kind,
    isolated_settings,
    log_tail,
    produce,
    read_topic,
    ready,
    replay_events,
    rng,
    summarize,
    rss_kib,
    wait_drained,
)

# A hang fails the test (and its teardown still stops what it started).
pytestmark = [pytest.mark.integration, pytest.mark.broker, pytest.mark.timescale,
              pytest.mark.timeout(300 + (MALFORMED + VALID) // 100)]

LIMIT = 1_048_576  # the worker's validation.max_message_bytes (the default)
# Messages of about a megabyte are few: they cost the broker and the worker a
# megabyte each, and a handful shows whether they fit.
HEAVY_PER_TOPIC = 3
PRODUCER_LIMIT = 1_000_000  # Kafka's default request limit, which a dead letter must fit under

_encode = msgspec.json.Encoder().encode
MONEY = {"sales": "price", "listings": "price", "bids": "amount"}
TEXT = {"sales": ("collection", "buyer", "seller"), "listings": ("collection", "seller", "marketplace"),
        "bids": ("collection", "bidder"), "images": ("collection",)}


def _png(width: int = 4, height: int = 4) -> bytes:
    return encode_png(np.zeros((height, width, 4), dtype=np.uint8))


def _png_bomb() -> bytes:
    """A tiny valid PNG whose header (CRC fixed) declares 50,000 x 50,000 pixels."""
    data = bytearray(_png())
    ihdr = bytes(data[12:29])  # b"IHDR" + 13 bytes
    ihdr = ihdr[:4] + struct.pack(">II", 50_000, 50_000) + ihdr[12:]
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _image_fields(content_type: str, data: bytes) -> dict:
    return {"content_type": content_type, "data": base64.b64encode(data).decode(),
            "sha256": hashlib.sha256(data).hexdigest(), "uri": None}


class Malformed:
    """Seeded generator of malformed messages for one record kind, each a
    mutation of a valid record of that kind (or plain garbage), labelled by
    its category."""

    def __init__(self, r: random.Random, kind: str, samples: list[dict]) -> None:
        self.r, self.kind, self.samples = r, kind, samples
        self.n = 0
        self.light = [self.random_bytes, self.truncated_json, self.invalid_utf8, self.deep_nesting,
                      self.bad_timestamp, self.unknown_field, self.wrong_type, self.bad_text, self.empty,
                      self.not_an_object]
        if kind in MONEY:
            self.light.append(self.bad_number)
        if kind == "images":
            self.light.append(self.bad_image)

    def record(self) -> dict:
        d = dict(self.r.choice(self.samples))
        self.n += 1
        d["event_id"] = f"bad-{self.kind}-{self.n}"  # never a valid event's id
        return d

    def one(self) -> tuple[str, bytes | None]:
        f = self.r.choice(self.light)
        return f.__name__, f()

    def heavy(self) -> list[tuple[str, bytes]]:
        out = []
        d = self.record()
        d["source"] = ""
        d["source"] = "x" * (LIMIT + 10 - len(_encode(d)))  # 10 bytes over the limit
        out.append(("oversized", _encode(d)))
        d = self.record()
        d["padding"] = "y" * (LIMIT + 50_000)
        out.append(("oversized", _encode(d)))
        if self.kind == "images":  # under the message limit, over the inline-image limit (512 KiB)
            d = self.record()
            d.update(_image_fields("image/png", _png()[:-12] + self.r.randbytes(600 * 1024) + _png()[-12:]))
        else:  # just under the limit, one byte of it wrong
            d = self.record()
            d[MONEY[self.kind]] = "-1"
            d["source"] = ""
            d["source"] = "z" * (LIMIT - 100 - len(_encode(d)))
        out.append(("near_limit", _encode(d)))
        return out

    # -- categories ----------------------------------------------------------

    def random_bytes(self) -> bytes:
        return self.r.randbytes(self.r.randint(1, 2048))

    def truncated_json(self) -> bytes:
        raw = _encode(self.record())
        return raw[: self.r.randint(1, len(raw) - 1)]

    def invalid_utf8(self) -> bytes:
        field = self.r.choice(TEXT[self.kind] + ("event_id", "source"))
        d = self.record()
        d[field] = "@@BAD@@"
        bad = self.r.choice([b"\xff\xfe", b"ab\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80",
                             b"x\x80y"])
        return _encode(d).replace(b"@@BAD@@", bad)

    def deep_nesting(self) -> bytes:
        depth = self.r.randint(500, 5000)
        d = self.record()
        field = self.r.choice(["extra", "source", MONEY.get(self.kind, "item_id")])
        d[field] = "@@DEEP@@"
        nest = (b"[" * depth + b"]" * depth) if self.r.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)
        return _encode(d).replace(b'"@@DEEP@@"', nest)

    def bad_timestamp(self) -> bytes:
        d = self.record()
        d["ts"] = self.r.choice([
            "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1899-12-31T23:59:59Z",
            "2999-01-01T00:00:00Z", "2021-02-30T00:00:00Z", "2021-01-01T25:00:00Z", "2021-01-01T00:00:00",
            "", "yesterday", 1609459200, None, "+275760-09-13T00:00:00Z", "0000-01-01T00:00:00Z",
        ])
        return _encode(d)

    def bad_number(self) -> bytes:
        d = self.record()
        field = MONEY[self.kind]
        value = self.r.choice(["1e400", "9" * 400, "1_000", " 12 ", "\u0661\u0662\u0663", "NaN", "Infinity",
                               "-1", "-0.0001", "1e-30", "0x10", "1,5", "", "1e21", "12abc", "1.2.3",
                               "@@INT@@", "@@FLOAT@@", None, True])
        d[field] = value
        raw = _encode(d)
        return raw.replace(b'"@@INT@@"', b"1" + b"0" * 400).replace(b'"@@FLOAT@@"', b"1e999")

    def unknown_field(self) -> bytes:
        d = self.record()
        name, value = self.r.choice([("synthetik", True), ("Synthetic", False), ("extra", "x"),
                                     ("price_usd", "1.0")])
        d[name] = value
        return _encode(d)

    def wrong_type(self) -> bytes:
        d = self.record()
        choice = self.r.randrange(5)
        if choice == 0:
            d["event_id"] = 12345
        elif choice == 1:
            d["synthetic"] = "yes"
        elif choice == 2:
            d["item_id"] = None
        elif choice == 3:
            d.pop(self.r.choice([k for k in d if k not in ("synthetic", "source", "tx", "image_ref", "data", "uri")]))
        else:
            d["event_id"] = "e" * 129  # longer than an id may be
        return _encode(d)

    def bad_text(self) -> bytes:
        d = self.record()
        field = self.r.choice(TEXT[self.kind])
        d[field] = self.r.choice(["", "abc\u202egpj.exe", "a\u0007b", "nul\u0000byte", "tab\tname", "\u2066x\u2069",
                                  "c1\u0085ctl"])
        return _encode(d)

    def empty(self) -> bytes | None:
        return self.r.choice([b"", None])

    def not_an_object(self) -> bytes:
        return self.r.choice([b"[]", b"{}", b'"a string"', b"123", b"null", b"true", b"[{}]", b"{}{}", b" "])

    def bad_image(self) -> bytes:
        d = self.record()
        choice = self.r.randrange(7)
        if choice == 0:
            d.update(_image_fields("image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg">'
                                                    b"<script>alert(1)</script></svg>"))
        elif choice == 1:
            d.update(_image_fields("image/png", b"#!/bin/sh\nrm -rf / --no-preserve-root\n"))
        elif choice == 2:
            d.update(_image_fields("image/png", _png()[:40]))  # truncated
        elif choice == 3:
            d.update(_image_fields("image/png", _png_bomb()))
        elif choice == 4:
            d.update({"data": None, "uri": self.r.choice(["file:///etc/shadow", "http://169.254.169.254/latest",
                                                          "https://localhost/x.png", "gopher://x/"])})
        elif choice == 5:
            d["sha256"] = "0" * 64  # does not match the bytes
        else:
            d.update({"data": None, "uri": None})
        return _encode(d)


def _mix(r: random.Random, valid: list, bad: list) -> list:
    """``valid`` in its own order with ``bad`` scattered at random positions."""
    slots = [True] * len(valid) + [False] * len(bad)
    r.shuffle(slots)
    v, b = iter(valid), iter(bad)
    return [next(v) if s else next(b) for s in slots]


def test_a_flood_of_malformed_messages_is_deadlettered_and_the_stream_goes_on(broker, fresh_db, workers,
                                                                               tmp_path) -> None:
    settings = isolated_settings(broker, fresh_db, tmp_path / "data")
    assert settings.validation.max_message_bytes == LIMIT
    worker = ready(workers.start(settings, "worker"))
    pid = worker.proc.pid
    rss_before = rss_kib(pid)

    def alive() -> None:
        if not worker.alive() or worker.proc.pid != pid:
            pytest.fail(f"the worker exited (code {worker.proc.returncode}) in the flood\n{log_tail(worker)}")

    r = rng("flood")
    events = replay_events(VALID)
    published = ids_by_kind(events)
    valid_by_kind: dict[str, list] = defaultdict(list)
    for kind, key, rec in events:
        valid_by_kind[kind].append(("valid", rec.event_id, key.encode(), _encode(rec)))
    names = settings.topics.inputs()
    per_topic = {}
    for i, kind in enumerate(EVENT_TABLES):
        samples = [json.loads(v) for *_, v in valid_by_kind[kind][:200]]
        gen = Malformed(r, kind, samples)
        share = MALFORMED // len(EVENT_TABLES) + (i < MALFORMED % len(EVENT_TABLES))
        bad = [(cat, None, r.choice([None, b"k", r.randbytes(8)]), value) for cat, value in gen.heavy()]
        for cat, value in (gen.one() for _ in range(share - len(bad))):
            key = r.choice([None, b"k", r.randbytes(8)]) if value is not None else b"tombstone"
            bad.append((cat, None, key, value))
        per_topic[names[kind]] = _mix(r, valid_by_kind[kind], bad)
    n_bad = sum(1 for items in per_topic.values() for it in items if it[0] != "valid")
    assert n_bad == MALFORMED

    t0 = time.monotonic()
    expected_dead: dict[tuple, str] = {}
    for topic, items in per_topic.items():
        meta = produce(broker, topic, [(key, value) for _label, _id, key, value in items])
        for (label, _id, _k, _v), md in zip(items, meta):
            if label != "valid":
                expected_dead[(topic, md.partition, md.offset)] = label
    alive()
    expected = {k: len(v) for k, v in published.items()}
    wait_drained(fresh_db, worker, expected, timeout=600, deadletters=len(expected_dead), alive=alive)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        deadline = time.monotonic() + 120
        while conn.execute("SELECT count(*) FROM deadletters WHERE published_at IS NULL").fetchone()[0]:
            alive()
            assert time.monotonic() < deadline, f"dead letters left unpublished\n{log_tail(worker)}"
            time.sleep(1)
        rows = conn.execute('SELECT topic, "partition", "offset", reason, error FROM deadletters').fetchall()
    elapsed = time.monotonic() - t0
    rss_after = rss_kib(pid)
    alive()
    assert worker.stop() == 0, f"the worker did not stop cleanly after the flood\n{log_tail(worker)}"

    assert_stored_exactly_once(fresh_db, published)
    stored_dead = {(t, p, o): (reason, error) for t, p, o, reason, error in rows}
    assert len(rows) == len(stored_dead)
    missing = expected_dead.keys() - stored_dead.keys()
    extra = stored_dead.keys() - expected_dead.keys()
    assert not missing and not extra, (
        f"dead letters differ from the malformed messages: {len(missing)} malformed not dead-lettered, e.g. "
        f"{[(k, expected_dead[k]) for k in sorted(missing)[:5]]}; {len(extra)} dead letters of valid messages, "
        f"e.g. {[(k, stored_dead[k]) for k in sorted(extra)[:5]]}")
    unexplained = [(k, v) for k, v in stored_dead.items() if not v[0] or not v[1]]
    assert not unexplained, f"dead letters without a reason or error text: {unexplained[:5]}"

    reasons: dict[str, Counter] = defaultdict(Counter)
    for k, category in expected_dead.items():
        reasons[category][stored_dead[k][0]] += 1
    out = read_topic(broker, settings.topics.deadletter, at_least=len(expected_dead))
    positions = Counter()
    biggest = 0
    for rec in out:
        h = {k: v.decode() for k, v in rec.headers}
        positions[(h["x-source-topic"], int(h["x-source-partition"]), int(h["x-source-offset"]))] += 1
        biggest = max(biggest, len(rec.value or b"") + len(rec.key or b""))
    off_topic = sorted(expected_dead.keys() - positions.keys())
    assert positions.keys() == expected_dead.keys(), (
        f"the dead-letter topic holds {len(positions)} positions, {len(expected_dead)} expected; missing "
        f"{len(off_topic)}: {[(k, expected_dead[k], stored_dead[k][0]) for k in off_topic[:8]]}, not expected "
        f"{sorted(positions.keys() - expected_dead.keys())[:5]}")
    dl_repeats = sum(positions.values()) - len(positions)
    assert biggest < PRODUCER_LIMIT, f"a dead letter of {biggest} bytes is over the producer's request limit"

    assert_rollups_match(fresh_db)
    report = check_alerts(fresh_db, broker, settings.topics.alerts, [])
    summary = (f"{len(events)} valid and {MALFORMED} malformed messages handled in {elapsed:.0f}s by one worker "
               f"(RSS {rss_before} -> {rss_after} KiB); dead-letter topic: {len(out)} messages, {dl_repeats} "
               f"repeats, largest {biggest} bytes; {report}; reasons by category: "
               + "; ".join(f"{c}: {dict(n)}" for c, n in sorted(reasons.items())))
    summarize("malformed flood", summary)
    assert dl_repeats == 0, f"{dl_repeats} dead letters published twice though nothing crashed"
    assert report.repeats == 0, "alerts published twice though nothing crashed"

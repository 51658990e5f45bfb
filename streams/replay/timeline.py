"""One event-time-ordered replay of every feed, ready to publish.

:func:`build_timeline` merges

* real CryptoPunks sales (``sales``),
* synthetic listings before them (``listings``),
* synthetic punk bids (``punk_bids``) and real art-auction bids
  (``auction_bids``), together the ``bids`` topic,
* one image per punk, emitted just before the punk's first event in the
  timeline (``images``): seeded synthetic pixel art, or tiles cut from a
  user-supplied sprite sheet when ``sprite_path`` is given,

into ``(kind, key, record)`` tuples. ``kind`` is the record's topic kind
(``record.kind``); ``key`` is ``item_id`` for listings, sales and images and
``auction_id`` for bids. Order is ``(ts, kind rank, position in its feed)``
with ranks listings < punk bids < auction bids < sales, and an image always
right before the event that introduces its item, so the result is fully
deterministic for a seed.

Identity: every event keeps its ``event_id`` and ``ts`` whatever the window.
The one exception by design is an image: it takes the time of its item's
first event inside the window, so ``start`` (or ``include``) can move it; its
id is derived from that time and its bytes, so a moved image is a new event,
never an old id with another time (the store would see a conflict).

The punk feeds run 2017-06 .. 2021-04 and the auction bids 2020-12 ..
2023-07: pass ``start`` (e.g. 2020-12-26) to begin where both are live.

Examples
--------
>>> tl = build_timeline(seed=7, limit=6)
>>> [kind for kind, _, _ in tl]
['images', 'listings', 'images', 'bids', 'images', 'bids']
>>> tl[0][1] == tl[1][1] == tl[1][2].item_id, tl[3][1] == tl[3][2].auction_id
(True, True)
>>> from datetime import datetime, timezone
>>> tl = build_timeline(seed=7, limit=2000, start=datetime(2020, 12, 26, tzinfo=timezone.utc))
>>> sorted({kind for kind, _, _ in tl})
['bids', 'images', 'listings', 'sales']
>>> build_timeline(seed=7, limit=3, include=("bids",))[0][2].collection
'cryptopunks'
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime
from typing import Iterable, Iterator, Optional, Sequence, Union

from streams.records import Event, Image
from streams.replay.pixelart import load_sprite_sheet, sprite_image_events, synthetic_image_event
from streams.replay.sources import PUNKS_COLLECTION, load_auction_bids, load_punk_attributes, load_punk_sales
from streams.replay.synthetic import SyntheticConfig, synthetic_listings, synthetic_punk_bids

__all__ = [
    "DEFAULT_INCLUDE",
    "FEEDS",
    "TimelineEntry",
    "build_timeline",
    "iter_timeline",
    "count_kinds",
]

TimelineEntry = tuple[str, str, Event]

DEFAULT_INCLUDE = ("sales", "bids", "listings", "images")
#: Accepted ``include`` names; "bids" means both bid feeds.
FEEDS = ("sales", "listings", "bids", "punk_bids", "auction_bids", "images")

_RANK_LISTINGS, _RANK_PUNK_BIDS, _RANK_AUCTION_BIDS, _RANK_SALES = 1, 2, 3, 4


def _feeds(include: Iterable[str]) -> set[str]:
    wanted = set()
    for name in include:
        if name not in FEEDS:
            raise ValueError(f"unknown feed {name!r}; choose from {', '.join(FEEDS)}")
        wanted |= {"punk_bids", "auction_bids"} if name == "bids" else {name}
    return wanted


def _check_zone(name: str, value: Optional[datetime]) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone, got naive {value!r}")


def iter_timeline(
    seed: int,
    limit: Optional[int] = None,
    include: Sequence[str] = DEFAULT_INCLUDE,
    sprite_path: Union[str, os.PathLike, None] = None,
    *,
    start: Optional[datetime] = None,
    end: Optional[datetime] = None,
    config: Optional[SyntheticConfig] = None,
) -> Iterator[TimelineEntry]:
    """Lazy version of :func:`build_timeline` (same arguments, same entries).

    Images are rendered only for the entries actually yielded.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    _check_zone("start", start)
    _check_zone("end", end)
    wanted = _feeds(include)
    config = config or SyntheticConfig()
    punk_feeds = {"sales", "listings", "punk_bids"}
    # With images but no punk feed, the punk feeds still decide when each
    # punk first appears; they are walked but not emitted.
    walk = wanted | (punk_feeds if "images" in wanted and not wanted & punk_feeds else set())

    sales = load_punk_sales()
    rows: list[tuple[datetime, int, int, str, Event, bool]] = []
    if "listings" in walk:
        rows += [(r.ts, _RANK_LISTINGS, i, r.item_id, r, "listings" in wanted)
                 for i, r in enumerate(synthetic_listings(sales, seed, config))]
    if "punk_bids" in walk:
        rows += [(r.ts, _RANK_PUNK_BIDS, i, r.auction_id, r, "punk_bids" in wanted)
                 for i, r in enumerate(synthetic_punk_bids(sales, seed, config))]
    if "auction_bids" in walk:
        rows += [(r.ts, _RANK_AUCTION_BIDS, i, r.auction_id, r, True) for i, r in enumerate(load_auction_bids())]
    if "sales" in walk:
        rows += [(r.ts, _RANK_SALES, i, r.item_id, r, "sales" in wanted) for i, r in enumerate(sales)]
    rows.sort(key=lambda row: row[:3])

    images = "images" in wanted
    attributes = load_punk_attributes() if images and sprite_path is None else {}
    if images and sprite_path is not None:
        load_sprite_sheet(sprite_path)  # fail early on a bad path, decode once
    seen: set[str] = set()
    emitted = 0
    for ts, _rank, _i, key, record, emit in rows:
        if limit is not None and emitted >= limit:
            return
        if start is not None and ts < start:
            continue
        if end is not None and ts >= end:
            return
        item_id = getattr(record, "item_id", "")
        if images and item_id not in seen and getattr(record, "collection", "") == PUNKS_COLLECTION:
            seen.add(item_id)
            image: Image
            if sprite_path is not None:
                image = sprite_image_events(sprite_path, [int(item_id)], ts)[0]
            else:
                image = synthetic_image_event(
                    item_id, ts, seed, collection=PUNKS_COLLECTION, attributes=attributes.get(int(item_id))
                )
            yield image.kind, item_id, image
            emitted += 1
            if limit is not None and emitted >= limit:
                return
        if emit:
            yield record.kind, key, record
            emitted += 1


def build_timeline(
    seed: int,
    limit: Optional[int] = None,
    include: Sequence[str] = DEFAULT_INCLUDE,
    sprite_path: Union[str, os.PathLike, None] = None,
    *,
    start: Optional[datetime] = None,
    end: Optional[datetime] = None,
    config: Optional[SyntheticConfig] = None,
) -> list[TimelineEntry]:
    """Merge the real and synthetic feeds into one event-time-ordered list.

    Parameters
    ----------
    seed : int
        Seed of the synthetic listings, punk bids and pixel art. Same seed,
        same entries (and same encoded bytes).
    limit : int, optional
        Keep only the first ``limit`` entries (images included); None = all.
    include : sequence of str, optional
        Feeds to emit, from :data:`FEEDS`: ``"sales"``, ``"listings"``,
        ``"bids"`` (= ``"punk_bids"`` + ``"auction_bids"``), ``"images"``.
    sprite_path : path-like, optional
        A user-supplied 2400x2400 CryptoPunks sprite sheet; when given,
        images are its tiles (``synthetic=False``, ``source="user-sprite"``)
        instead of synthetic pixel art.
    start, end : datetime, optional
        Keep events with ``start <= ts < end`` (zone-aware). Images are
        attached to each punk's first event inside the window.
    config : SyntheticConfig, optional
        Generator settings for the synthetic feeds.

    Returns
    -------
    list of (kind, key, record)
        ``kind`` in {"listings", "bids", "sales", "images"}.
    """
    return list(
        iter_timeline(seed, limit, include, sprite_path, start=start, end=end, config=config)
    )


def count_kinds(timeline: Iterable[TimelineEntry]) -> dict[str, int]:
    """Entries per kind, plus ``"synthetic"`` and ``"real"`` totals.

    Examples
    --------
    >>> count_kinds(build_timeline(seed=7, limit=6))
    {'images': 3, 'listings': 1, 'bids': 2, 'real': 0, 'synthetic': 6}
    """
    kinds: Counter[str] = Counter()
    real = synthetic = 0
    for kind, _key, record in timeline:
        kinds[kind] += 1
        if record.synthetic:
            synthetic += 1
        else:
            real += 1
    return {**dict(kinds), "real": real, "synthetic": synthetic}

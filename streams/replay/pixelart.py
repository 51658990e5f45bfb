"""Procedural 24x24 "punk-like" pixel-art avatars, and CryptoPunks sprite tiles.

Two image sources for the ``images`` topic:

* :func:`render_avatar` / :func:`synthetic_image_event` draw a seeded avatar
  (background, head, eyes, mouth, a few accessories). These are made up:
  ``synthetic=True``, ``source="synthetic-pixelart"``. The same seed always
  gives the same pixels and the same PNG bytes.
* :func:`sprite_image_events` cuts 24x24 tiles out of a CryptoPunks sprite
  sheet that the *user* supplies (2400x2400 RGBA, punk ``id`` at
  ``x=(id % 100) * 24, y=(id // 100) * 24``). No rights are granted to that
  artwork: it is never shipped with or stored in this project; use the
  tiles for internal tests and benchmarks only. Tiles are real images:
  ``synthetic=False``, ``source="user-sprite"``.

PNG encoding/decoding is :mod:`streams.replay.png` (no imaging library).

Examples
--------
>>> px = render_avatar(7)
>>> px.shape, px.dtype.name, bool((px[..., 3] == 255).all())
((24, 24, 4), 'uint8', True)
>>> bool((render_avatar(7) == px).all()), bool((render_avatar(8) == px).all())
(True, False)
>>> from datetime import datetime, timezone
>>> img = synthetic_image_event("42", datetime(2021, 1, 1, tzinfo=timezone.utc), seed=7)
>>> img.content_type, img.synthetic, img.source, img.collection, len(img.sha256)
('image/png', True, 'synthetic-pixelart', 'synthetic-pixelart', 64)
"""

from __future__ import annotations

import hashlib
import os
import random
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from streams.records import Image
from streams.replay.png import decode_png, encode_png

__all__ = [
    "SIZE",
    "SPRITE_EPOCH",
    "SPRITE_SHEET_SIZE",
    "render_avatar",
    "avatar_png",
    "synthetic_image_event",
    "load_sprite_sheet",
    "sprite_tile",
    "sprite_tile_png",
    "sprite_image_events",
    "encode_png",
    "decode_png",
]

SIZE = 24
SPRITE_SHEET_SIZE = 2400
#: Default event time of sprite images: the day the CryptoPunks launched.
SPRITE_EPOCH = datetime(2017, 6, 23, tzinfo=timezone.utc)

Seed = Union[int, str]
RGBA = tuple[int, int, int, int]


def _hex(code: str) -> RGBA:
    return (int(code[0:2], 16), int(code[2:4], 16), int(code[4:6], 16), 255)


_BACKGROUNDS = [_hex(c) for c in ("638596", "95554f", "8ea59c", "a39a87", "6a8ec4", "b58fa8", "7f9c6e", "c9a66b")]
_SKINS = {
    "Dark": _hex("713f1d"),
    "Medium": _hex("ae8b61"),
    "Light": _hex("dbb180"),
    "Albino": _hex("ead9d9"),
    "Zombie": _hex("7da269"),
    "Ape": _hex("856f56"),
    "Alien": _hex("c8fbfb"),
}
_HAIR = [_hex(c) for c in ("000000", "51360c", "a66e2c", "e65700", "fff68e", "8119b7", "28b143", "cacaca")]
_BLACK = _hex("000000")
_WHITE = _hex("ffffff")
_GOLD = _hex("ffd926")
_ACCESSORIES = ("cap", "mohawk", "hair", "earring", "shades", "cigarette", "beard")


def _shade(color: RGBA, factor: float) -> RGBA:
    return tuple(min(255, int(round(v * factor))) for v in color[:3]) + (255,)  # type: ignore[return-value]


def _head_mask(female: bool) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    left, right = (8, 15) if female else (7, 16)  # exclusive right
    mask[6:20, left:right] = True
    mask[5, left + 1 : right - 1] = True
    mask[18:20, left] = False  # jaw
    mask[20:24, 9:14] = True  # neck to the bottom edge
    mask[11:14, left - 1] = True  # ear
    return mask


def _outline(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def _skin_for(rng: random.Random, attributes: Optional[Mapping[str, Any]]) -> RGBA:
    if attributes:
        kind = attributes.get("type") or "Human"
        if kind != "Human" and kind in _SKINS:
            return _SKINS[kind]
        tone = attributes.get("skin_tone")
        if tone in _SKINS:
            return _SKINS[tone]
    return rng.choice([_SKINS[k] for k in ("Dark", "Medium", "Light", "Albino", "Zombie", "Ape", "Alien")])


def render_avatar(seed: Seed, *, attributes: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """Draw a seeded 24x24 RGBA punk-like avatar.

    Parameters
    ----------
    seed : int or str
        Everything random (background, skin, hair colour, accessories) comes
        from ``random.Random`` seeded with this value.
    attributes : mapping, optional
        CryptoPunks-style attributes (see ``load_punk_attributes``): ``type``
        and ``skin_tone`` pick the skin, ``gender`` the head width and
        ``accessory_count`` how many accessories (at most 4) are drawn.

    Returns
    -------
    numpy.ndarray
        ``(24, 24, 4)`` uint8, fully opaque.
    """
    rng = random.Random(f"artwatch-pixelart:{seed}")
    img = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    img[:, :] = rng.choice(_BACKGROUNDS)

    female = (attributes or {}).get("gender") == "Female" if attributes else rng.random() < 0.4
    skin = _skin_for(rng, attributes)
    mask = _head_mask(female)
    img[mask] = skin
    img[_outline(mask)] = _BLACK
    left = 8 if female else 7

    # Eyes (white + pupil), nose shadow, mouth.
    for x in (left + 2, left + 6):
        img[11, x] = _WHITE if skin != _SKINS["Alien"] else _shade(skin, 0.6)
        img[11, x + 1] = _BLACK
    img[12:14, left + 5] = _shade(skin, 0.75)
    img[16, left + 3 : left + 6] = _BLACK if not female else _hex("d60000")

    if attributes and "accessory_count" in attributes:
        count = min(int(attributes["accessory_count"]), 4)
    else:
        count = rng.randint(1, 3)
    hair = rng.choice(_HAIR)
    for name in rng.sample(_ACCESSORIES, count):
        if name == "cap":
            color = rng.choice(_HAIR[1:] + [_hex("c42110"), _hex("26314a")])
            img[3:7, left : left + 8] = color
            img[6, left + 8 : left + 11] = _shade(color, 0.8)  # brim
            img[2, left + 1 : left + 7] = _BLACK
        elif name == "mohawk":
            img[1:6, left + 4 : left + 6] = hair
        elif name == "hair":
            img[4:7, left : left + 8] = hair
            img[7:14, left - 1 if not female else left] = hair
            if female:
                img[7:18, left - 1] = hair
        elif name == "earring":
            img[14, left - 1] = _GOLD
        elif name == "shades":
            img[10:12, left + 1 : left + 9] = _BLACK
            img[10, left + 2 : left + 4] = rng.choice([_hex("5a3ad8"), _hex("d33e3e"), _hex("3ad8a8")])
            img[10, left + 6 : left + 8] = img[10, left + 2]
        elif name == "cigarette":
            img[17, left + 6 : left + 11] = _WHITE
            img[17, left + 11] = _hex("e25b26")
            img[13:16, left + 11] = _hex("c8c8c8")
        elif name == "beard":
            img[15:20, left + 1 : left + 7] = hair
            img[16, left + 3 : left + 6] = _BLACK
    return img


def avatar_png(seed: Seed, *, attributes: Optional[Mapping[str, Any]] = None) -> bytes:
    """PNG bytes of :func:`render_avatar` (same seed, same bytes)."""
    return encode_png(render_avatar(seed, attributes=attributes))


def _image_id(prefix: str, collection: str, item_id: str, ts: datetime, sha256: str, *parts: object) -> str:
    """An id made of everything that defines the image event: its item, its
    time and its bytes. The timeline announces an item's image at the item's
    first event of the replayed window, so ``--start`` moves its time; an id
    without the time would name two different events (issue 8, point 6)."""
    when = ts.astimezone(timezone.utc).isoformat()
    key = "\x1f".join(str(p) for p in (collection, item_id, when, sha256, *parts))
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def synthetic_image_event(
    item_id: str,
    ts: datetime,
    seed: Seed,
    *,
    collection: str = "synthetic-pixelart",
    attributes: Optional[Mapping[str, Any]] = None,
) -> Image:
    """A synthetic pixel-art :class:`~streams.records.Image` for one item.

    Parameters
    ----------
    item_id : str
        The item the image belongs to.
    ts : datetime
        Event time (must carry a zone).
    seed : int or str
        Generator seed; the avatar depends on ``(seed, collection, item_id)``.
    collection : str, optional
        Collection of the item (``"synthetic-pixelart"`` by default; the
        timeline passes ``"cryptopunks"`` so the image joins its item).
    attributes : mapping, optional
        Passed to :func:`render_avatar`.

    Returns
    -------
    Image
        ``content_type="image/png"``, inline ``data``, its ``sha256``,
        ``synthetic=True``, ``source="synthetic-pixelart"`` and an
        ``event_id`` derived from the item, ``ts``, the bytes and the seed.
    """
    data = avatar_png(f"{seed}:{collection}:{item_id}", attributes=attributes)
    digest = hashlib.sha256(data).hexdigest()
    return Image(
        event_id=_image_id("pixelart", collection, item_id, ts, digest, seed),
        ts=ts,
        synthetic=True,
        source="synthetic-pixelart",
        item_id=item_id,
        collection=collection,
        content_type="image/png",
        sha256=digest,
        data=data,
    )


@lru_cache(maxsize=2)
def _decode_sheet(path: str, mtime_ns: int, size: int) -> np.ndarray:
    with open(path, "rb") as fh:
        px = decode_png(fh.read())
    if px.shape[:2] != (SPRITE_SHEET_SIZE, SPRITE_SHEET_SIZE):
        raise ValueError(
            f"{path}: expected a {SPRITE_SHEET_SIZE}x{SPRITE_SHEET_SIZE} sprite sheet, got {px.shape[1]}x{px.shape[0]}"
        )
    px.setflags(write=False)
    return px


def load_sprite_sheet(path: Union[str, os.PathLike]) -> np.ndarray:
    """Decode a 2400x2400 CryptoPunks sprite sheet (cached by path and mtime).

    Returns
    -------
    numpy.ndarray
        Read-only ``(2400, 2400, 4)`` uint8 RGBA array.
    """
    p = Path(path)
    st = p.stat()
    return _decode_sheet(str(p.resolve()), st.st_mtime_ns, st.st_size)


def sprite_tile(sheet: np.ndarray, punk_id: int) -> np.ndarray:
    """The 24x24 RGBA tile of punk ``punk_id`` (0..9999) in a decoded sheet."""
    punk_id = int(punk_id)
    if not 0 <= punk_id < 10_000:
        raise ValueError(f"punk id must be 0..9999, got {punk_id}")
    x, y = (punk_id % 100) * SIZE, (punk_id // 100) * SIZE
    return np.ascontiguousarray(sheet[y : y + SIZE, x : x + SIZE])


def sprite_tile_png(path: Union[str, os.PathLike], punk_id: int) -> bytes:
    """PNG bytes of one punk's tile, cut from the sprite sheet at ``path``."""
    return encode_png(sprite_tile(load_sprite_sheet(path), punk_id))


def sprite_image_events(
    path: Union[str, os.PathLike],
    ids: Iterable[int],
    ts: Union[datetime, Mapping[int, datetime], None] = None,
    *,
    collection: str = "cryptopunks",
) -> list[Image]:
    """Image events of punk tiles cut from a user-supplied sprite sheet.

    Parameters
    ----------
    path : path-like
        The 2400x2400 RGBA CryptoPunks sprite sheet. Read at call time and
        never copied; the tiles are for internal tests/benchmarks only.
    ids : iterable of int
        Punk ids (0..9999); one event per id, in this order.
    ts : datetime or mapping of id -> datetime, optional
        Event time of every tile, or per id; default :data:`SPRITE_EPOCH`.
    collection : str, optional
        ``"cryptopunks"`` by default.

    Returns
    -------
    list[Image]
        24x24 RGBA PNGs (re-encoded with :func:`encode_png`),
        ``synthetic=False``, ``source="user-sprite"``, ``item_id=str(id)``.
    """
    sheet = load_sprite_sheet(path)
    out = []
    for punk_id in ids:
        punk_id = int(punk_id)
        when = ts.get(punk_id, SPRITE_EPOCH) if isinstance(ts, Mapping) else (ts or SPRITE_EPOCH)
        data = encode_png(sprite_tile(sheet, punk_id))
        digest = hashlib.sha256(data).hexdigest()
        out.append(
            Image(
                event_id=_image_id("sprite", collection, str(punk_id), when, digest),
                ts=when,
                synthetic=False,
                source="user-sprite",
                item_id=str(punk_id),
                collection=collection,
                content_type="image/png",
                sha256=digest,
                data=data,
            )
        )
    return out

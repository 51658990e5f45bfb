"""Cheap checks of an image record's content: raster type, magic, header, end; uri policy.

Nothing here decodes pixels. The checks read the few bytes a decoder would
trust first, so that what is obviously unusable or hostile never reaches the
database or a model: a type that is not a raster (SVG carries scripts), bytes
that are not what the type says (shell text labelled ``image/png``), a header
that declares more pixels than ``image_max_pixels`` (a 50,000 x 50,000 PNG is
~40 KB compressed and 10 GB decoded) and a file cut short (no PNG ``IEND``,
no JPEG ``EOI``, no GIF trailer, a WebP shorter than its RIFF size).

Image uris are never fetched here; :func:`check_uri` refuses what a fetcher
must not be pointed at (``file:///etc/shadow``, ``https://169.254.169.254/``,
``https://localhost/``). A host name can still resolve to a private address
(DNS rebinding): whoever fetches must check the address it connects to.

Examples
--------
>>> from streams.replay.png import encode_png
>>> import numpy as np
>>> png = encode_png(np.zeros((2, 3, 4), dtype=np.uint8))
>>> image_size("image/png", png)
(3, 2)
>>> image_size("image/svg+xml", b"<svg/>")
Traceback (most recent call last):
...
ValueError: content_type 'image/svg+xml' is not a raster type (image/gif, image/jpeg, image/png, image/webp)
>>> check_uri("file:///etc/shadow", ("https",), ())
Traceback (most recent call last):
...
ValueError: uri scheme 'file' is not allowed (allowed: https)
"""

from __future__ import annotations

import re
import struct
from typing import Callable, Sequence
from urllib.parse import urlsplit

__all__ = ["RASTER_TYPES", "image_size", "check_inline", "check_uri"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IHDR = b"\x00\x00\x00\x0dIHDR"  # the first chunk, always 13 bytes long
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # empty chunk, fixed CRC
# Frame headers (SOFn) carry the size; C4 (DHT), C8 (reserved) and CC (DAC) do not.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
# Real files have a dozen segments before the frame header; a crafted one
# made of 4-byte segments would otherwise cost a Python loop per 4 bytes.
_JPEG_MAX_SEGMENTS = 256


def _png(data: bytes) -> tuple[int, int]:
    if not data.startswith(_PNG_MAGIC):
        raise ValueError("bytes are not a PNG (no PNG signature)")
    if len(data) < 8 + 25 + 12 or data[8:16] != _PNG_IHDR:
        raise ValueError("PNG has no IHDR header where it must start")
    if not data.endswith(_PNG_IEND):
        raise ValueError("PNG is truncated (it does not end with an IEND chunk)")
    width, height = struct.unpack_from(">II", data, 16)
    return width, height


def _jpeg(data: bytes) -> tuple[int, int]:
    if not data.startswith(b"\xff\xd8\xff"):
        raise ValueError("bytes are not a JPEG (no SOI marker)")
    if not data.endswith(b"\xff\xd9"):
        raise ValueError("JPEG is truncated (it does not end with an EOI marker)")
    i, n = 2, len(data)
    for _ in range(_JPEG_MAX_SEGMENTS):
        if i + 4 > n or data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            break
        if marker in _JPEG_SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ValueError("JPEG has no readable frame header (SOF) before its image data")


def _gif(data: bytes) -> tuple[int, int]:
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 14:
        raise ValueError("bytes are not a GIF (no GIF87a/GIF89a header)")
    if data[-1] != 0x3B:
        raise ValueError("GIF is truncated (it does not end with a trailer byte 0x3B)")
    width, height = struct.unpack_from("<HH", data, 6)  # the logical screen
    return width, height


def _webp(data: bytes) -> tuple[int, int]:
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("bytes are not a WebP (no RIFF/WEBP header)")
    declared = struct.unpack_from("<I", data, 4)[0] + 8
    if declared != len(data):
        raise ValueError(f"WebP is {len(data)} bytes but its RIFF header says {declared} (truncated or padded)")
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame's start code
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("WebP VP8 frame has no start code")
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature, then 14-bit sizes minus one
        if data[20] != 0x2F:
            raise ValueError("WebP VP8L stream has no signature")
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit canvas sizes minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ValueError(f"WebP starts with an unknown chunk {chunk!r}")


_READERS: dict[str, Callable[[bytes], tuple[int, int]]] = {
    "image/png": _png, "image/jpeg": _jpeg, "image/webp": _webp, "image/gif": _gif,
}
RASTER_TYPES = tuple(sorted(_READERS))


def check_content_type(content_type: str) -> None:
    if content_type not in _READERS:
        raise ValueError(f"content_type {content_type!r} is not a raster type ({', '.join(RASTER_TYPES)})")


def image_size(content_type: str, data: bytes) -> tuple[int, int]:
    """Declared ``(width, height)`` of ``data``, after checking that it is a
    complete file of ``content_type``; ValueError says what is wrong."""
    check_content_type(content_type)
    return _READERS[content_type](data)


def check_inline(content_type: str, data: bytes, max_pixels: int) -> None:
    """Refuse inline bytes that are not a complete raster of a sane size."""
    width, height = image_size(content_type, data)
    if not width or not height:
        raise ValueError(f"{content_type} declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(f"{content_type} declares {width}x{height} = {width * height:,} pixels,"
                         f" above the limit of {max_pixels:,} (image_max_pixels)")


# RFC 3986 characters only: no spaces, backslashes, quotes or non-ASCII, on
# which uri parsers disagree (``https://good\@evil`` differs between them).
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+\Z")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
# A last label that is a number makes the whole host an IPv4 address for
# browsers and curl (``127.1``, ``2130706433``, ``0x7f.1``).
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")
_LOCAL_NAMES = ("localhost", "localdomain", "local", "internal", "home.arpa", "lan")


def _default_host_problem(host: str) -> str | None:
    """Why ``host`` is no public DNS name (None when it is one)."""
    if ":" in host:
        return "is a literal IPv6 address"
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        return "is a literal IP address"
    if not all(_LABEL.match(label) for label in labels) or len(host) > 253:
        return "is not a valid DNS host name (ASCII letters, digits, hyphens; IDNs as xn--)"
    if any(host == n or host.endswith("." + n) for n in _LOCAL_NAMES):
        return "is a local or internal name"
    if len(labels) < 2:
        return "is a single-label (intranet) name"
    return None


def _listed(host: str, hosts: Sequence[str]) -> bool:
    # "example.org" matches itself only; "*.example.org" its subdomains only.
    return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in hosts)


def check_uri(uri: str, schemes: Sequence[str], hosts: Sequence[str]) -> None:
    """Refuse an image uri outside ``schemes`` and ``hosts``.

    ``hosts`` empty means any public DNS name: never an IP literal,
    localhost, a single-label or a ``.local``/``.internal``-style name.
    User credentials in the uri are always refused.
    """
    if not _URI_CHARS.match(uri):
        raise ValueError("uri holds characters outside RFC 3986 (spaces, backslashes, quotes or non-ASCII)")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - validates the port (ValueError when not a number in range)
    except ValueError as exc:
        raise ValueError(f"uri cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ValueError(f"uri scheme {scheme!r} is not allowed (allowed: {', '.join(schemes) or 'none'})")
    if "@" in parts.netloc:
        raise ValueError("uri must not carry user credentials (user@host)")
    host = (parts.hostname or "").removesuffix(".")
    if not host:
        raise ValueError("uri has no host")
    if hosts:
        if not _listed(host, hosts):
            raise ValueError(f"uri host {host!r} is not in image_uri_hosts")
    elif problem := _default_host_problem(host):
        raise ValueError(f"uri host {host!r} {problem}")

"""A minimal PNG codec: 8-bit RGBA (and RGB) non-interlaced images only.

Enough for 24x24 avatars and the 2400x2400 CryptoPunks sprite sheet without
an imaging library. The encoder writes one IDAT chunk; every row uses the
same filter (0 = None by default). The decoder checks chunk CRCs, joins the
IDAT chunks and reverses all five row filters (None, Sub, Up, Average,
Paeth): None/Sub/Up rows are vectorised with numpy, Average/Paeth rows run
a per-byte Python loop (~5 ms per 2400-pixel row).

Examples
--------
>>> import numpy as np
>>> px = np.zeros((2, 3, 4), dtype=np.uint8); px[..., 0] = 255; px[..., 3] = 255
>>> data = encode_png(px)
>>> data[:8] == PNG_SIGNATURE, png_size(data)
(True, (3, 2))
>>> bool((decode_png(data) == px).all())
True
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["PNG_SIGNATURE", "encode_png", "decode_png", "png_size"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {6: 4, 2: 3}  # colour type -> channels (RGBA, RGB)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _filter_rows(rows: np.ndarray, filter_type: int, bpp: int) -> np.ndarray:
    """Apply one PNG filter to every row of ``rows`` (h, stride) uint8."""
    if filter_type == 0:
        return rows
    cur = rows.astype(np.int16)
    left = np.zeros_like(cur)
    left[:, bpp:] = cur[:, :-bpp]
    up = np.zeros_like(cur)
    up[1:] = cur[:-1]
    upleft = np.zeros_like(cur)
    upleft[:, bpp:] = up[:, :-bpp]
    if filter_type == 1:
        pred = left
    elif filter_type == 2:
        pred = up
    elif filter_type == 3:
        pred = (left + up) // 2
    elif filter_type == 4:
        p = left + up - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    else:
        raise ValueError(f"PNG filter type must be 0..4, got {filter_type}")
    return ((cur - pred) & 0xFF).astype(np.uint8)


def encode_png(pixels: np.ndarray, *, filter_type: int = 0, level: int = 9) -> bytes:
    """Encode an ``(height, width, 4)`` uint8 RGBA array as PNG bytes.

    Parameters
    ----------
    pixels : numpy.ndarray
        RGBA pixels, shape (h, w, 4), dtype uint8, row 0 at the top.
    filter_type : int, optional
        PNG row filter used for every row (0 None, 1 Sub, 2 Up, 3 Average,
        4 Paeth); 0 by default. The others exist to exercise decoders.
    level : int, optional
        zlib compression level.

    Returns
    -------
    bytes
        A complete PNG (signature, IHDR, one IDAT, IEND), colour type 6,
        bit depth 8, no interlace. Same input, same bytes.
    """
    px = np.ascontiguousarray(pixels)
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] != 4:
        raise ValueError(f"expected an (h, w, 4) uint8 array, got {px.dtype} {px.shape}")
    height, width = px.shape[:2]
    if not (height and width):
        raise ValueError("an image needs at least one pixel")
    rows = _filter_rows(px.reshape(height, width * 4), filter_type, 4)
    raw = np.empty((height, width * 4 + 1), dtype=np.uint8)
    raw[:, 0] = filter_type
    raw[:, 1:] = rows
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", ihdr),
            _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)),
            _chunk(b"IEND", b""),
        )
    )


def _chunks(data: bytes):
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG (bad signature)")
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        if len(payload) != length:
            raise ValueError(f"truncated {kind!r} chunk")
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"CRC mismatch in {kind!r} chunk")
        yield kind, payload
        if kind == b"IEND":
            return
        pos += 12 + length
    raise ValueError("PNG ends without an IEND chunk")


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR, without decoding the pixels."""
    kind, payload = next(_chunks(data))
    if kind != b"IHDR":
        raise ValueError("first PNG chunk is not IHDR")
    width, height = struct.unpack(">II", payload[:8])
    return width, height


def _unfilter_slow(ftype: int, line: bytearray, prior: bytes, bpp: int) -> None:
    n = len(line)
    if ftype == 3:
        for i in range(n):
            a = line[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + ((a + prior[i]) >> 1)) & 0xFF
    else:  # 4, Paeth
        for i in range(n):
            if i >= bpp:
                a, c = line[i - bpp], prior[i - bpp]
            else:
                a = c = 0
            line[i] = (line[i] + _paeth(a, prior[i], c)) & 0xFF


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGBA or RGB, non-interlaced PNG.

    Parameters
    ----------
    data : bytes
        The PNG file's bytes.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 4)`` uint8 RGBA pixels (RGB input gets alpha 255).

    Raises
    ------
    ValueError
        On a bad signature or CRC, a truncated stream, or an unsupported
        format (palette, grey, 16-bit, interlaced).
    """
    header = None
    idat = []
    for kind, payload in _chunks(data):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
    if header is None:
        raise ValueError("PNG has no IHDR chunk")
    width, height, depth, color, _compression, _filter, interlace = header
    if depth != 8 or color not in _COLOR_TYPES or interlace != 0:
        raise ValueError(
            f"unsupported PNG: bit depth {depth}, colour type {color}, interlace {interlace}"
            " (only 8-bit RGBA/RGB, non-interlaced)"
        )
    bpp = _COLOR_TYPES[color]
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    if len(raw) != height * (stride + 1):
        raise ValueError(f"IDAT holds {len(raw)} bytes, expected {height * (stride + 1)}")
    buf = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    ftypes = buf[:, 0]
    if int(ftypes.max(initial=0)) > 4:
        raise ValueError(f"unknown PNG filter type {int(ftypes.max())}")
    out = buf[:, 1:].copy()
    if (ftypes == 0).all():
        pass  # common case (the CryptoPunks sheet): nothing to undo
    else:
        zero = np.zeros(stride, dtype=np.uint8)
        for y in range(height):
            ftype = int(ftypes[y])
            prior = out[y - 1] if y else zero
            if ftype == 0:
                continue
            if ftype == 1:
                # Sub: running sum per channel, wrapping mod 256 in uint8.
                out[y] = np.cumsum(out[y].reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
            elif ftype == 2:
                out[y] += prior
            else:
                line = bytearray(out[y].tobytes())
                _unfilter_slow(ftype, line, prior.tobytes(), bpp)
                out[y] = np.frombuffer(line, dtype=np.uint8)
    px = out.reshape(height, width, bpp)
    if bpp == 3:
        px = np.concatenate([px, np.full((height, width, 1), 255, dtype=np.uint8)], axis=2)
    return px

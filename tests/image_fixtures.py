"""Image files made byte by byte for the image tests: TIFFs OpenCV does not write (big-endian,
BigTIFF), and headers that declare a size far larger than the file holds."""

from __future__ import annotations

import struct
import zlib
from typing import List, Optional, Tuple

import numpy as np

_SHORT, _LONG, _LONG8 = 3, 4, 16


def tiff_bytes(pixels: Optional[np.ndarray] = None, size: Optional[Tuple[int, int]] = None,
               big_endian: bool = False, bigtiff: bool = False) -> bytes:
    """An uncompressed one-strip TIFF of ``pixels`` (HxW or HxWx3 RGB, uint8 or float32), or with
    ``pixels`` None a file whose header declares ``size`` (width, height) and holds no image data."""
    order = ">" if big_endian else "<"
    if pixels is None:
        width, height = size
        channels, data, bits, float_samples = 3, b"", 8, False
    else:
        height, width = pixels.shape[:2]
        channels = 1 if pixels.ndim == 2 else pixels.shape[2]
        float_samples = pixels.dtype.kind == "f"
        data = pixels.astype(order + ("f4" if float_samples else "u1")).tobytes()
        bits = 32 if float_samples else 8
    header = 16 if bigtiff else 8
    entries: List[Tuple[int, int, List[int]]] = [
        (256, _LONG, [width]), (257, _LONG, [height]), (258, _SHORT, [bits] * channels), (259, _SHORT, [1]),
        (262, _SHORT, [2 if channels == 3 else 1]), (273, _LONG, [header]), (277, _SHORT, [channels]),
        (278, _LONG, [height]), (279, _LONG, [len(data)]), (284, _SHORT, [1]),
    ]
    if float_samples:
        entries.append((339, _SHORT, [3] * channels))
    count_format, entry_format, inline = ("Q", "HHQ", 8) if bigtiff else ("H", "HHI", 4)
    ifd = header + len(data)
    ifd += ifd % 2
    extra_at = ifd + struct.calcsize(order + count_format) + len(entries) * (struct.calcsize(order + entry_format)
                                                                             + inline) + inline
    table, extra = b"", b""
    for tag, kind, values in entries:
        if bigtiff and kind == _LONG:
            kind = _LONG8
        packed = struct.pack(order + {_SHORT: "H", _LONG: "I", _LONG8: "Q"}[kind] * len(values), *values)
        if len(packed) <= inline:
            field = packed.ljust(inline, b"\0")
        else:
            field = struct.pack(order + ("Q" if bigtiff else "I"), extra_at + len(extra))
            extra += packed
        table += struct.pack(order + entry_format, tag, kind, len(values)) + field
    start = (b"MM" if big_endian else b"II") + (struct.pack(order + "HHHQ", 43, 8, 0, ifd) if bigtiff
                                                 else struct.pack(order + "HI", 42, ifd))
    body = start + data + b"\0" * (ifd - header - len(data))
    return body + struct.pack(order + count_format, len(entries)) + table + b"\0" * inline + extra


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def declared_only(kind: str, width: int, height: int) -> bytes:
    """A small file of format ``kind`` whose header declares ``width`` x ``height`` (no image data to speak of)."""
    if kind == "png":
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    if kind == "jpg":
        sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
        return b"\xff\xd8" + sof + b"\xff\xd9"
    if kind == "tif":
        return tiff_bytes(size=(width, height))
    if kind == "tif-be":
        return tiff_bytes(size=(width, height), big_endian=True)
    if kind == "bigtiff":
        return tiff_bytes(size=(width, height), bigtiff=True)
    if kind == "bmp":
        info = struct.pack("<IiiHHIIiiII", 40, width, -height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + len(info) + 64, 0, 0, 14 + len(info)) + info + b"\0" * 64
    if kind == "webp":
        chunk = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") \
            + (height - 1).to_bytes(3, "little")
        return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk
    if kind == "ppm":
        return f"P6\n# a comment\n{width} {height}\n255\n".encode() + b"\0" * 64
    raise ValueError(kind)

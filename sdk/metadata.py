"""A photo's colour profile and EXIF, carried from the input file to its cleaned output.

OpenCV reads and writes pixels only. A phone photo's ICC profile says what its RGB values mean
(Display P3 on many phones: shown without it, as sRGB, its colours look duller), and its EXIF holds
the capture time, camera and place that photo libraries sort and search by. So they are taken from
the input file's bytes and put into the encoded output's:

* read from JPEG (APP1 ``Exif``; APP2 ``ICC_PROFILE``, in one or more parts) and PNG (``eXIf``,
  ``iCCP``); written into JPEG and PNG outputs; the other formats are written without them;
* a JPEG's EXIF orientation is set to 1 (upright), since the reader has already turned the pixels
  (a PNG's is kept: its pixels are written as stored); the thumbnail EXIF may link (a small copy of
  the photo *with* its reflection) is unlinked;
* a profile is carried only to an output of its kind (an RGB profile to colour, a grey one to grey);
* anything malformed is left out, silently: metadata never stops a photo from being cleaned.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

_EXIF_HEADER = b"Exif\x00\x00"
_ICC_HEADER = b"ICC_PROFILE\x00"
#: What one JPEG segment holds: 65535 bytes less the length field and each kind's header.
_EXIF_MAX = 65535 - 2 - len(_EXIF_HEADER)
_ICC_PART_MAX = 65535 - 2 - len(_ICC_HEADER) - 2
#: A compressed iCCP chunk inflating past this is refused (real profiles are well under 1 MB).
_ICC_INFLATED_MAX = 16 << 20
_ORIENTATION_TAG = 0x0112
_SHORT = 3


@dataclass
class Metadata:
    """An input photo's ICC profile and EXIF (the TIFF-structured block, ``II*`` or ``MM*``), as
    they will be written, each None when absent."""

    icc: Optional[bytes] = None
    exif: Optional[bytes] = None

    def __bool__(self) -> bool:
        return self.icc is not None or self.exif is not None


def read_metadata(data: bytes, kind: str) -> Optional[Metadata]:
    """The metadata of an encoded image of format ``kind`` (as ``imageio.read_header`` names it),
    ready to write: None when it has none, or when its format is neither JPEG nor PNG."""
    if kind == "JPEG":
        icc, exif = _from_jpeg(data)
    elif kind == "PNG":
        icc, exif = _from_png(data)
    else:
        return None
    icc = icc if icc is not None and _icc_space(icc) is not None else None
    exif = _prepared_exif(exif, upright=kind == "JPEG") if exif is not None else None
    found = Metadata(icc=icc, exif=exif)
    return found or None


def embed_metadata(encoded: bytes, ext: str, metadata: Optional[Metadata], grey: bool) -> bytes:
    """``encoded`` (a JPEG or PNG as OpenCV wrote it, ``ext`` its extension) with ``metadata`` put
    in; other formats, and no metadata, come back unchanged."""
    if not metadata:
        return encoded
    icc = metadata.icc if metadata.icc is not None and _icc_space(metadata.icc) == ("GRAY" if grey else "RGB") \
        else None
    ext = ext.lower()
    if ext in (".jpg", ".jpeg"):
        return _into_jpeg(encoded, icc, metadata.exif)
    if ext == ".png":
        return _into_png(encoded, icc, metadata.exif)
    return encoded


# -- reading ---------------------------------------------------------------------------------------

def _jpeg_segments(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """(marker, payload start, payload end) of each header segment, up to the first scan."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        end = pos + 2 + length
        if length < 2 or end > len(data):
            return
        yield marker, pos + 4, end
        pos = end


def _from_jpeg(data: bytes) -> Tuple[Optional[bytes], Optional[bytes]]:
    exif: Optional[bytes] = None
    parts: Dict[int, bytes] = {}
    count = 0
    for marker, start, end in _jpeg_segments(data):
        payload = data[start:end]
        if marker == 0xE1 and exif is None and payload.startswith(_EXIF_HEADER):
            exif = payload[len(_EXIF_HEADER):]
        elif marker == 0xE2 and payload.startswith(_ICC_HEADER) and len(payload) > len(_ICC_HEADER) + 2:
            sequence, count = payload[len(_ICC_HEADER)], payload[len(_ICC_HEADER) + 1]
            parts[sequence] = payload[len(_ICC_HEADER) + 2:]
    whole = count > 0 and sorted(parts) == list(range(1, count + 1))
    return (b"".join(parts[i] for i in sorted(parts)) if whole else None), exif


def _png_chunks(data: bytes) -> Iterator[Tuple[bytes, bytes]]:
    """(type, data) of each chunk before the image data."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind in (b"IDAT", b"IEND") or pos + 12 + length > len(data):
            return
        yield kind, data[pos + 8:pos + 8 + length]
        pos += 12 + length


def _from_png(data: bytes) -> Tuple[Optional[bytes], Optional[bytes]]:
    icc = exif = None
    for kind, chunk in _png_chunks(data):
        if kind == b"eXIf":
            exif = chunk
        elif kind == b"iCCP":
            name_end = chunk.find(b"\x00")
            if 0 < name_end and chunk[name_end + 1:name_end + 2] == b"\x00":  # method 0: zlib
                inflate = zlib.decompressobj()
                try:
                    profile = inflate.decompress(chunk[name_end + 2:], _ICC_INFLATED_MAX)
                except zlib.error:
                    continue
                if inflate.eof:
                    icc = profile
    return icc, exif


def _icc_space(icc: bytes) -> Optional[str]:
    """"RGB" or "GRAY" for a profile whose header is whole (its size field, its signature), else None."""
    if len(icc) < 128 or icc[36:40] != b"acsp" or struct.unpack(">I", icc[:4])[0] != len(icc):
        return None
    return {b"RGB ": "RGB", b"GRAY": "GRAY"}.get(icc[16:20])


def _prepared_exif(exif: bytes, upright: bool) -> Optional[bytes]:
    """``exif`` with its thumbnail unlinked and, when ``upright``, orientation 1; None when its first
    directory cannot be read (or it would not fit one JPEG segment)."""
    if len(exif) > _EXIF_MAX or exif[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if exif[:2] == b"II" else ">"
    block = bytearray(exif)
    try:
        (first,) = struct.unpack_from(order + "I", block, 4)
        (entries,) = struct.unpack_from(order + "H", block, first)
        next_link = first + 2 + 12 * entries
        if first < 8 or next_link + 4 > len(block):
            return None
        for entry in range(first + 2, next_link, 12):
            tag, kind, count = struct.unpack_from(order + "HHI", block, entry)
            if upright and tag == _ORIENTATION_TAG and kind == _SHORT and count == 1:
                struct.pack_into(order + "H", block, entry + 8, 1)
        struct.pack_into(order + "I", block, next_link, 0)
    except struct.error:
        return None
    return bytes(block)


# -- writing ---------------------------------------------------------------------------------------

def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _into_jpeg(encoded: bytes, icc: Optional[bytes], exif: Optional[bytes]) -> bytes:
    added = b""
    if exif is not None:
        added += _segment(0xE1, _EXIF_HEADER + exif)
    if icc is not None:
        parts = [icc[i:i + _ICC_PART_MAX] for i in range(0, len(icc), _ICC_PART_MAX)]
        if len(parts) <= 255:
            added += b"".join(_segment(0xE2, _ICC_HEADER + bytes((n, len(parts))) + part)
                              for n, part in enumerate(parts, 1))
    # After the JFIF segment OpenCV writes first, which readers expect right after the start marker.
    at = 2
    for marker, _, end in _jpeg_segments(encoded):
        if marker == 0xE0:
            at = end
        break
    return encoded[:at] + added + encoded[at:]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _into_png(encoded: bytes, icc: Optional[bytes], exif: Optional[bytes]) -> bytes:
    added = b""
    if icc is not None:
        added += _chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc))
    if exif is not None:
        added += _chunk(b"eXIf", exif)
    at = 8 + 12 + 13  # the signature and IHDR, which must come first
    return encoded[:at] + added + encoded[at:]

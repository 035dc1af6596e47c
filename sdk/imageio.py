"""Reading, validating and writing images for the runtime.

Everything the networks see is RGB float32 in [0, 1], HxWx3. The conversions are explicit:

* **Grey** (HxW or HxWx1) is replicated to three channels; results are written back as grey
  (ITU-R BT.601 luma of the RGB result), so a grey photo stays grey.
* **Alpha** (HxWx4) is kept aside, untouched, and re-attached to the result: by
  :func:`from_float_rgb` for arrays, and by :func:`write_image` when the output format stores
  alpha (PNG, TIFF, WebP); JPEG and BMP outputs drop it.
* **16-bit** images are scaled by 1/65535; they are written back as 16-bit where the output
  format supports it (PNG, TIFF) and as 8-bit otherwise.
* **Float images** (arrays, and float TIFFs: one rule for both, :func:`check_image`) must lie
  in [0, 1]. Excursions up to ``FLOAT_TOLERANCE`` (resampling and colour-conversion overshoot)
  are clipped silently; anything further out is an InputError, because it usually means 0-255
  data in a float image, which clipping would ruin. NaN and infinity are always errors. They are
  written back as float32 in [0, 1] where the output format stores floats (TIFF) and as 8-bit
  otherwise.
* **PNM** outputs: ``.pgm`` stores grey only, so a colour image is refused (InputError, from
  :func:`output_layout` before any work); ``.ppm`` stores colour only, so a grey image is written
  as three equal channels; ``.pnm`` stores either.
* **Huge images** over ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``, 100 MP) are refused from
  the size their header declares, before decoding, for every format read (PNG, JPEG, TIFF and
  BigTIFF in either byte order, BMP, WebP, PPM/PGM/PBM), so a hostile or mistaken file cannot
  exhaust memory; pass a larger ``max_pixels`` (``--max-pixels`` on the command line) to accept
  them. Content in any other format is refused, whatever its extension.
* **Colour profile and EXIF** of JPEG and PNG files are kept in :attr:`ImageInfo.metadata` and
  written into JPEG and PNG outputs (:mod:`dereflect.metadata`: orientation reset to upright, the
  thumbnail unlinked).
* **JPEG** files must reach their end-of-image marker (a cut file is refused: some OpenCV builds
  would return it half grey); data after that marker (a phone's "motion photo" video) is ignored.

Large images are validated and converted in row strips (:func:`rgb_rows`), so that neither
costs a full-size float copy. Writes check the output path first (:func:`check_output_path`),
are atomic (a hidden temporary file in the same folder, then a rename) and never replace the
input file; an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Set, Tuple, Union

import cv2
import numpy as np

from .errors import InputError
from .metadata import Metadata, embed_metadata, read_metadata

DEFAULT_MAX_PIXELS = 100_000_000
FLOAT_TOLERANCE = 0.02
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
_SIXTEEN_BIT_FORMATS = (".png", ".tif", ".tiff")
_FLOAT_FORMATS = (".tif", ".tiff")
_ALPHA_FORMATS = (".png", ".tif", ".tiff", ".webp")
_COLOUR_ORDERS = ("RGB", "BGR")
#: Rows are validated and converted this many pixels at a time, so a large image never needs a
#: full-size float copy (about 12 MB of float RGB per chunk).
CHUNK_PIXELS = 1 << 20
#: What POSIX file systems allow when ``pathconf`` cannot say.
_NAME_MAX = 255
_PATH_MAX = 4096

PathLike = Union[str, os.PathLike]


@dataclass
class ImageInfo:
    """What :func:`to_float_rgb` / :func:`read_image` converted away, so it can be restored.

    ``dtype`` and ``channels`` describe the original (1, 3 or 4 channels; ``squeeze`` is True
    when a grey original had no channel axis); ``alpha`` is the original alpha channel
    (float32 HxW in [0, 1]) or None; ``path`` is the file it came from, if any; ``metadata`` its
    colour profile and EXIF (JPEG and PNG files), which :func:`write_image` carries to JPEG and PNG
    outputs (set it to None to write without).
    """

    dtype: np.dtype
    channels: int
    alpha: Optional[np.ndarray] = None
    squeeze: bool = False
    path: Optional[Path] = None
    metadata: Optional[Metadata] = None

    @property
    def bit_depth(self) -> int:
        return int(np.dtype(self.dtype).itemsize * 8)

    @property
    def grey(self) -> bool:
        return self.channels == 1


def opencv_logging() -> Any:
    """OpenCV's logging module (``setLogLevel``, ``LOG_LEVEL_SILENT``), or None where the build does not
    expose it to Python: OpenCV's log lines only repeat the one-line errors the SDK raises itself."""
    return getattr(getattr(cv2, "utils", None), "logging", None)


@contextlib.contextmanager
def opencv_log_level(level: str) -> Iterator[None]:
    """OpenCV's log level set to ``level`` (a name such as ``"LOG_LEVEL_ERROR"``) inside, the previous one
    after; nothing where the build has no logging module. Process-wide: callers on several threads hold
    a lock around it."""
    logging = opencv_logging()
    if logging is None:
        yield
        return
    previous = logging.getLogLevel()
    logging.setLogLevel(getattr(logging, level))
    try:
        yield
    finally:
        logging.setLogLevel(previous)


def _check_colour_order(colour_order: str) -> str:
    order = str(colour_order).upper()
    if order not in _COLOUR_ORDERS:
        raise InputError(f"colour_order must be 'RGB' or 'BGR', not {colour_order!r}")
    return order


def row_chunks(height: int, width: int, pixels: Optional[int] = None) -> Sequence[Tuple[int, int]]:
    """(top, bottom) row ranges of about ``pixels`` (default ``CHUNK_PIXELS``) pixels each covering ``height`` rows."""
    rows = max(1, (pixels or CHUNK_PIXELS) // max(width, 1))
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def _layout(array: np.ndarray, name: str) -> Tuple[int, bool]:
    """(channels, squeeze) of an image array; InputError when it is not one."""
    if not isinstance(array, np.ndarray):
        hint = " (cv2.imread gives None for a file it cannot read)" if array is None else ""
        raise InputError(f"{name} must be a numpy array, not {type(array).__name__}{hint}")
    squeeze = array.ndim == 2
    shape = array.shape + (1,) if squeeze else array.shape
    if len(shape) != 3 or shape[2] not in (1, 3, 4):
        raise InputError(
            f"{name} has shape {array.shape}; expected HxWx3 (or HxW grey, HxWx1, HxWx4 with alpha)"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(f"{name} is empty (shape {array.shape})")
    if _native(array.dtype) not in (np.uint8, np.uint16) and array.dtype.kind != "f":
        raise InputError(f"{name} has dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    return shape[2], squeeze


def _check_float_values(array: np.ndarray, name: str) -> None:
    """NaN, infinity and values outside [0, 1] (beyond the tolerance), checked in row chunks."""
    bad, low, high = 0, np.inf, -np.inf
    for top, bottom in row_chunks(array.shape[0], array.shape[1]):
        chunk = array[top:bottom].astype(np.float32)
        finite = np.isfinite(chunk)
        if not finite.all():
            bad += int((~finite).sum())
            continue
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if bad:
        raise InputError(f"{name} contains {bad} NaN or infinite value(s); float images must hold finite values "
                         "in [0, 1]")
    if low < -FLOAT_TOLERANCE or high > 1.0 + FLOAT_TOLERANCE:
        hint = " (it looks like 0-255 data: divide by 255, or use 8- or 16-bit integers)" if high > 2.0 else ""
        raise InputError(f"{name} has values in [{low:.4g}, {high:.4g}]; float images must be in [0, 1]{hint}")


def check_image(array: np.ndarray, colour_order: str = "RGB", name: str = "image") -> ImageInfo:
    """Validate ``array`` as an image without converting it; the :class:`ImageInfo` to restore it.

    The one rule for arrays passed to the API and for decoded files (see the module notes):
    shape, dtype and, for floats, finite values in [0, 1]. ``alpha`` is left None (it is read
    with :func:`alpha_rows`).
    """
    _check_colour_order(colour_order)
    channels, squeeze = _layout(array, name)
    if array.dtype.kind == "f":
        _check_float_values(array, name)
    return ImageInfo(dtype=array.dtype, channels=channels, squeeze=squeeze)


def _native(dtype: np.dtype) -> np.dtype:
    """``dtype`` in this machine's byte order: a big-endian ``>u2`` array is a uint16 image too."""
    return dtype.newbyteorder("=")


def _convert(source: np.ndarray, out: np.ndarray) -> None:
    """``source`` (uint8, uint16 or float, already validated) as float32 in [0, 1], written into ``out``."""
    if _native(source.dtype) == np.uint8:
        np.multiply(source, np.float32(1.0 / 255.0), out=out, dtype=np.float32)
    elif _native(source.dtype) == np.uint16:
        np.multiply(source, np.float32(1.0 / 65535.0), out=out, dtype=np.float32)
    else:
        out[...] = source
        np.clip(out, 0.0, 1.0, out=out)


def rgb_rows(array: np.ndarray, colour_order: str = "RGB", top: int = 0, bottom: Optional[int] = None,
             left: int = 0, right: Optional[int] = None) -> np.ndarray:
    """Rows ``top:bottom`` and columns ``left:right`` of a validated image as RGB float32 in [0, 1].

    Grey is replicated to three channels and alpha left out; this is what :func:`to_float_rgb`
    returns for the whole image, a window at a time.
    """
    view = array[top:bottom, left:right]
    if view.ndim == 2:
        view = view[:, :, None]
    out = np.empty(view.shape[:2] + (3,), np.float32)
    if view.shape[2] == 1:
        _convert(view, out[:, :, :1])
        out[:, :, 1:] = out[:, :, :1]
        return out
    colour = view[:, :, 2::-1] if _check_colour_order(colour_order) == "BGR" else view[:, :, :3]
    _convert(colour, out)
    return out


def alpha_rows(array: np.ndarray, top: int = 0, bottom: Optional[int] = None) -> Optional[np.ndarray]:
    """The alpha channel of rows ``top:bottom`` as float32 HxW in [0, 1], or None without one."""
    if array.ndim != 3 or array.shape[2] != 4:
        return None
    view = array[top:bottom, :, 3]
    out = np.empty(view.shape, np.float32)
    _convert(view, out)
    return out


def to_float_rgb(
    array: np.ndarray, colour_order: str = "RGB", name: str = "image"
) -> Tuple[np.ndarray, ImageInfo]:
    """Validate ``array`` and convert it to RGB float32 HxWx3 in [0, 1], plus what was converted."""
    info = check_image(array, colour_order, name)
    info.alpha = alpha_rows(array)
    return rgb_rows(array, colour_order), info


def as_float_rgb(array: np.ndarray, colour_order: str = "RGB") -> np.ndarray:
    """Validate an array passed to the API and return it as RGB float32 HxWx3 in [0, 1].

    Accepts HxWx3, HxW / HxWx1 grey (replicated) and HxWx4 (alpha dropped; use
    :func:`to_float_rgb` to keep it); uint8, uint16 or float in [0, 1] (see the module notes).
    """
    return to_float_rgb(array, colour_order)[0]


def _quantise(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    for integer, top in ((np.uint8, 255.0), (np.uint16, 65535.0)):
        if _native(dtype) == integer:
            # clip(v, 0, 1) * top + 0.5, rounded down: the same values, scaled and clipped in one buffer
            # (a 720p frame's conversion back was a fifth of remove's time).
            scale = values.dtype.type(top)
            scaled = values * scale
            scaled += scale.dtype.type(0.5)
            np.clip(scaled, scale.dtype.type(0.5), scale.dtype.type(top + 0.5), out=scaled)
            return scaled.astype(dtype)  # the input's own byte order
    return np.clip(values, 0.0, 1.0).astype(dtype)


def _luma(rgb: np.ndarray) -> np.ndarray:
    # BT.601, OpenCV's own RGB-to-grey: a grey file's output is what cv2.cvtColor makes of the colour one.
    return rgb[:, :, 0] * 0.299 + rgb[:, :, 1] * 0.587 + rgb[:, :, 2] * 0.114


def from_float_rgb(rgb: np.ndarray, info: ImageInfo, colour_order: str = "RGB") -> np.ndarray:
    """Inverse of :func:`to_float_rgb`: the original dtype, channel count, order and alpha."""
    order = _check_colour_order(colour_order)
    rgb = np.asarray(rgb, dtype=np.float32)
    if info.channels == 1:
        grey = _luma(rgb)
        out = grey if info.squeeze else grey[:, :, None]
        return _quantise(out, info.dtype)
    colour = rgb[:, :, ::-1] if order == "BGR" else rgb
    if info.channels == 4:
        alpha = info.alpha if info.alpha is not None else np.ones(rgb.shape[:2], np.float32)
        colour = np.concatenate([colour, alpha[:, :, None]], axis=2)
    return _quantise(colour, info.dtype)


# -- headers: the declared size of every format read, before decoding -------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: In JPEG entropy-coded data 0xFF is followed by 0x00 (stuffing) or a restart marker; any other
#: byte after it starts a marker (EOI, or the tables and header of the next progressive scan).
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_STANDALONE = {0x01, 0xD8} | set(range(0xD0, 0xD8))


def _jpeg_size(data: bytes, name: str) -> Tuple[int, int]:
    """Width and height from the frame header, after checking that the image data reaches EOI."""
    size: Optional[Tuple[int, int]] = None
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > len(data):
            raise InputError(f"{name}: JPEG file is truncated (no end-of-image marker); re-export or re-copy it")
        if data[pos] != 0xFF:
            raise InputError(f"{name}: corrupt JPEG (no marker at byte {pos}); re-export or re-copy it")
        marker = data[pos + 1]
        if marker == 0xD9:
            if size is None:
                raise InputError(f"{name}: corrupt JPEG (it ends before any image data)")
            return size
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > len(data):
            raise InputError(f"{name}: JPEG file is truncated (no end-of-image marker); re-export or re-copy it")
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise InputError(f"{name}: JPEG file is truncated (no end-of-image marker); re-export or re-copy it")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and size is None:
            if length < 7:
                raise InputError(f"{name}: corrupt JPEG frame header")
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (width, height)
        if marker != 0xDA:
            pos = end
            continue
        if size is None:
            raise InputError(f"{name}: corrupt JPEG (image data before the frame header)")
        found = _JPEG_MARKER.search(data, end)
        if found is None:
            raise InputError(f"{name}: JPEG file is truncated (no end-of-image marker); re-export or re-copy it")
        pos = found.start()


def _tiff_size(data: bytes, name: str) -> Tuple[int, int]:
    """ImageWidth and ImageLength of the first IFD (what OpenCV decodes), classic TIFF or BigTIFF."""
    order = "<" if data[:2] == b"II" else ">"
    truncated = InputError(f"{name}: TIFF header is truncated or corrupt")
    if len(data) < 16:
        raise truncated
    (version,) = struct.unpack(order + "H", data[2:4])
    if version == 42:
        (offset,) = struct.unpack(order + "I", data[4:8])
        count_format, entry_size, value_at = "H", 12, 8
    else:
        (offset,) = struct.unpack(order + "Q", data[8:16])
        count_format, entry_size, value_at = "Q", 20, 12
    count_size = struct.calcsize(count_format)
    if offset + count_size > len(data):
        raise truncated
    (count,) = struct.unpack(order + count_format, data[offset:offset + count_size])
    first = offset + count_size
    if first + count * entry_size > len(data):
        raise truncated
    found: Dict[int, int] = {}
    value_formats = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
    for index in range(count):
        entry = first + index * entry_size
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257) and kind in value_formats:
            fmt = order + value_formats[kind]
            (found[tag],) = struct.unpack(fmt, data[entry + value_at:entry + value_at + struct.calcsize(fmt)])
    if 256 not in found or 257 not in found:
        raise InputError(f"{name}: TIFF header declares no image size")
    return found[256], found[257]


def _bmp_size(data: bytes, name: str) -> Tuple[int, int]:
    if len(data) < 26:
        raise InputError(f"{name}: BMP header is truncated")
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # a negative height means top-down rows


def _webp_size(data: bytes, name: str) -> Tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise InputError(f"{name}: WebP header is truncated or corrupt")


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*(?:\n|$))*(\d+)")


def _pnm_size(data: bytes, name: str) -> Tuple[int, int]:
    sizes = []
    pos = 2
    for _ in range(2):
        match = _PNM_TOKEN.match(data, pos)
        if match is None or match.end() == len(data):
            raise InputError(f"{name}: PNM header is truncated or corrupt")
        sizes.append(int(match.group(1)))
        pos = match.end()
    return sizes[0], sizes[1]


def read_header(data: bytes, name: str = "image") -> Tuple[str, int, int]:
    """(format, width, height) that the header of the encoded image ``data`` declares, without decoding.

    Raises InputError naming ``name`` when the content is none of the formats read (whatever the
    file's extension) or its header is cut or corrupt; JPEGs are also checked to reach their
    end-of-image marker.
    """
    head = data[:16]
    if head[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise InputError(f"{name}: PNG header is truncated or corrupt")
        found = ("PNG",) + struct.unpack(">II", data[16:24])
    elif head[:2] == b"\xff\xd8":
        found = ("JPEG",) + _jpeg_size(data, name)
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        found = ("TIFF",) + _tiff_size(data, name)
    elif head[:2] == b"BM":
        found = ("BMP",) + _bmp_size(data, name)
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        found = ("WebP",) + _webp_size(data, name)
    elif re.match(rb"P[1-6]\s", head):
        found = ("PNM",) + _pnm_size(data, name)
    else:
        raise InputError(
            f"{name}: not a readable image (unknown or unsupported format; supported: {', '.join(IMAGE_EXTENSIONS)})"
        )
    kind, width, height = found
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: {kind} header declares an empty image ({width}x{height})")
    return kind, int(width), int(height)


def _check_pixels(path: Path, width: int, height: int, max_pixels: Optional[int]) -> None:
    if max_pixels and width * height > max_pixels:
        if max_pixels % 1_000_000:
            # Not a whole number of megapixels (a small limit, say): exact counts, which always compare.
            size, limit = f"{width * height:,} pixels", f"{max_pixels:,} pixels"
        else:
            size, limit = f"{width * height / 1e6:.1f} MP", f"{max_pixels // 1_000_000} MP"
        raise InputError(
            f"{path}: image is {width}x{height} ({size}), over the limit of {limit}; raise it with "
            "max_pixels=... (--max-pixels on the command line) if you have the memory"
        )


def read_array(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, ImageInfo]:
    """Read an image file as OpenCV stores it, validated: BGR, BGRA or grey; uint8, uint16 or float32.

    What :func:`read_image` converts to float; the command line passes this array straight to
    :meth:`dereflect.Remover.remove` (``colour_order="BGR"``), so a large image never exists as a
    full-size float copy. The size is checked against ``max_pixels`` (None or 0: no limit) from
    the header before decoding; a float image must pass :func:`check_image`. Raises InputError
    naming the file when it is missing, empty, truncated, not an image in a supported format,
    too large or out of range. JPEG EXIF orientation is applied.
    """
    path = Path(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not data:
        raise InputError(f"{path}: file is empty (0 bytes)")
    kind, width, height = read_header(data, str(path))
    _check_pixels(path, width, height, max_pixels)
    metadata = read_metadata(data, kind)
    # IMREAD_UNCHANGED keeps alpha and 16 bits but ignores EXIF orientation, which only
    # JPEGs carry in practice (and they have neither alpha nor 16 bits).
    flags = cv2.IMREAD_ANYCOLOR if kind == "JPEG" else cv2.IMREAD_UNCHANGED
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error:
        decoded = None
    del data  # the encoded file (tens of MB for a large photo) is not needed while validating
    if decoded is None:
        raise InputError(f"{path}: not a readable image (truncated or corrupt {kind} data)")
    if decoded.dtype not in (np.uint8, np.uint16) and decoded.dtype.kind != "f":
        raise InputError(f"{path}: unsupported sample type {decoded.dtype}; use 8- or 16-bit images")
    info = check_image(decoded, "BGR", name=str(path))
    info.path = path
    info.metadata = metadata
    return decoded, info


def read_image(
    path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> Tuple[np.ndarray, ImageInfo]:
    """Read an image file as RGB float32 HxWx3 in [0, 1] and the :class:`ImageInfo` to restore it.

    The checks of :func:`read_array`; its errors name the file.
    """
    array, info = read_array(path, max_pixels)
    rgb = rgb_rows(array, "BGR")
    info.alpha = alpha_rows(array)
    return rgb, info


# -- writing ----------------------------------------------------------------------------------

def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder, name))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer for this file system
        return default


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` allows."""
    return _limit(folder, "PC_NAME_MAX", _NAME_MAX)


def staging_name(path: Path, longest: int = _NAME_MAX, ending: Optional[str] = None) -> Path:
    """A hidden, unique sibling of ``path`` to write before renaming it into place, never longer than
    the file system allows: ``.STEM.TOKEN`` and ``ending`` (default: ``path``'s suffix and ``.tmp``;
    a video writer needs its container's suffix last)."""
    token = uuid.uuid4().hex[:16]
    ending = f"{path.suffix}.tmp" if ending is None else ending
    fixed = len(os.fsencode(f"..{token}{ending}"))
    stem = os.fsencode(path.stem)[:max(longest - fixed, 1)].decode("utf-8", "ignore") or "out"
    return path.with_name(f".{stem}.{token}{ending}")


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A hidden, unique sibling of ``path`` (not yet created) to write; it replaces ``path`` when the
    block ends without an error and is removed otherwise, so ``path`` is never half-written and no
    other file is touched (a fixed ``NAME.tmp`` could be the user's). The caller creates the file,
    so it gets the permissions the user's umask gives any new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_name(path, name_max(path.parent))
    try:
        yield staged
        os.replace(staged, path)
    except BaseException:
        if os.path.lexists(staged):
            os.unlink(staged)
        raise


@contextlib.contextmanager
def staged_folder(out: Path, replace: bool = False) -> Iterator[Path]:
    """A new hidden folder beside ``out`` to fill; it becomes ``out`` when the block ends without an
    error, and is removed otherwise, so ``out`` is never half-written and an existing one survives a
    failure. An empty folder at ``out`` (made for the purpose) counts as none; anything else there
    is replaced only with ``replace`` (else InputError), and kept until the new folder is in place."""
    out = Path(out)
    check_output_location(out, folder=True)  # a clear error, not an OSError from mkdir, for a bad place
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staged
        _put_in_place(staged, out, replace)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_free_folder(out: Path) -> bool:
    """Whether :func:`staged_folder` puts its folder at ``out`` without replacing anything: nothing is
    there, or an empty folder (made for the purpose). Commands check it before their work begins."""
    out = Path(out)
    return not os.path.lexists(out) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir()))


def check_new_folder(out: Path) -> None:
    """InputError unless ``out`` may become a new folder of outputs (a writable place, nothing there or an
    empty folder: see :func:`is_free_folder`); commands that write a whole folder check it first."""
    out = Path(out)
    check_output_location(out, folder=True)
    if not is_free_folder(out):
        raise InputError(f"{out} exists and is not an empty folder; choose a new folder")


def _put_in_place(staged: Path, out: Path, replace: bool) -> None:
    if is_free_folder(out):
        if out.is_dir():
            out.rmdir()
        os.replace(staged, out)
        return
    if not replace:
        raise InputError(f"{out} exists; nothing was written")
    # The old one steps aside first and goes only once the new one is in place.
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    backup.rmdir()
    os.replace(out, backup)
    try:
        os.replace(staged, out)
    except OSError:
        os.replace(backup, out)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as anything, a broken link included)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


#: Folders a probe file was written in: a folder of 10,000 outputs (on a network share, say) is
#: probed once, not once per image. A folder that turns read-only later fails at the write itself.
_WRITABLE_FOLDERS: Set[Path] = set()


def check_output_location(path: Path, folder: bool = False, example: str = "clean.png") -> Path:
    """The checks every output (image, folder of images, video) shares, before any work; returns the
    nearest existing folder, where the output will be created.

    InputError naming the problem when a name is longer than the file system allows (checked first:
    the system refuses to even look up such a name), so is the whole path, ``path`` is an existing
    folder (a file is wanted; ``example`` names one inside it) or, with ``folder``, an existing file,
    a part of the path is a file or a broken link, or nothing can be written in the nearest existing
    folder. Leaves nothing behind.
    """
    existing = nearest_existing(path if folder else path.parent)
    longest = name_max(existing)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > longest:
            what = "file name" if part == path.name and not folder else f"folder name {part[:24]!r}..."
            raise InputError(f"{path}: the {what} is {size} bytes; this file system allows {longest}")
    if len(os.fsencode(os.path.abspath(path))) >= _limit(existing, "PC_PATH_MAX", _PATH_MAX):
        raise InputError(f"{path}: the path is longer than this file system allows")
    # os.path's tests, not Path's: they answer False instead of raising where a look-up fails.
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: exists and is not a folder")
    if not folder and os.path.isdir(path):
        raise InputError(f"{path}: is a folder; name the output file, e.g. {path / example}")
    if os.path.islink(existing) and not os.path.exists(existing):
        raise InputError(f"{path}: {existing} is a broken symbolic link, not a folder")
    if not os.path.isdir(existing):
        raise InputError(f"{path}: {existing} is a file, not a folder")
    if existing not in _WRITABLE_FOLDERS:
        try:
            # A real file, not os.access: root passes os.access everywhere, yet cannot write to a read-only mount.
            handle, probe = tempfile.mkstemp(dir=existing, prefix=".dereflect-probe-")
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            raise InputError(f"{path}: cannot write in {existing} ({exc.strerror})") from None
        _WRITABLE_FOLDERS.add(existing)
    return existing


def check_output_path(path: PathLike, folder: bool = False) -> Path:
    """Check, before any work, that an image file (or with ``folder``, a folder of images) can be written at ``path``.

    InputError naming the problem when ``path`` (a file) has no extension of a format OpenCV
    writes, or for any of :func:`check_output_location`'s reasons (the hidden temporary name of
    the atomic write is kept within the file-name limit when it is made). Returns ``path``.
    """
    path = Path(path)
    if not folder and (path.suffix.lower() not in IMAGE_EXTENSIONS or not cv2.haveImageWriter(str(path))):
        what = f"no image format written as {path.suffix!r}" if path.suffix else "no extension"
        raise InputError(f"{path}: not an image file name ({what}); use one of {', '.join(IMAGE_EXTENSIONS)}")
    check_output_location(path, folder)
    return path


def _stored(array: np.ndarray, target: ImageInfo, colour_order: str, alpha: Optional[np.ndarray]) -> np.ndarray:
    """``array`` as the file will store it: OpenCV's channel order, ``target``'s dtype and channels.

    ``alpha`` (float HxW) is re-attached when the target keeps alpha and ``array`` has none of its own.
    """
    channels, _ = _layout(array, "output image")
    if (array.dtype == target.dtype and array.dtype.kind != "f"
            and (channels == target.channels or (channels, target.channels) == (4, 3))):
        # Already the stored values: no float round trip, only the channel order (and a dropped alpha).
        # Floats take the round trip, which clips them to [0, 1] as every other output is.
        if channels == 1:
            return array
        if _check_colour_order(colour_order) == "RGB":
            return array[:, :, [2, 1, 0, 3][:target.channels]]
        return np.ascontiguousarray(array[:, :, :target.channels])
    height, width = array.shape[:2]
    out: Optional[np.ndarray] = None
    for top, bottom in row_chunks(height, width):
        rows_alpha = alpha_rows(array, top, bottom) if channels == 4 else (
            alpha[top:bottom] if alpha is not None else None)
        strip = ImageInfo(dtype=target.dtype, channels=target.channels, alpha=rows_alpha, squeeze=True)
        rows = from_float_rgb(rgb_rows(array, colour_order, top, bottom), strip, "BGR")
        if out is None:
            out = np.empty((height,) + rows.shape[1:], rows.dtype)
        out[top:bottom] = rows
    return out


def output_layout(path: PathLike, info: Optional[ImageInfo] = None) -> ImageInfo:
    """The sample type and channel count :func:`write_image` stores an image described by ``info``
    (None: 8-bit colour) as, in the format ``path``'s extension names.

    The original's where the format holds it; else 8-bit (16-bit and float sources), no alpha, three
    channels for a grey image in ``.ppm``. InputError when the format cannot hold the image at all
    (a colour image as ``.pgm``), so that a caller can refuse before the work that makes it.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if info is None:
        info = ImageInfo(dtype=np.dtype(np.uint8), channels=3)
    dtype = np.dtype(info.dtype)
    if dtype.kind == "f":
        dtype = np.dtype(np.float32 if ext in _FLOAT_FORMATS else np.uint8)
    elif dtype == np.uint16 and ext not in _SIXTEEN_BIT_FORMATS:
        dtype = np.dtype(np.uint8)
    channels = 3 if info.channels == 4 and ext not in _ALPHA_FORMATS else info.channels
    if ext == ".pgm" and channels != 1:
        raise InputError(f"{path}: .pgm stores grey images only and this image is colour; name the output "
                         ".ppm, .pnm or .png instead")
    if ext == ".ppm" and channels == 1:
        channels = 3  # OpenCV writes .ppm from colour only; three equal channels keep the grey exactly
    return ImageInfo(dtype=dtype, channels=channels, squeeze=True)


def write_image(
    path: PathLike, image: np.ndarray, info: Optional[ImageInfo] = None, overwrite: bool = False,
    colour_order: str = "RGB",
) -> Path:
    """Write an image (float in [0, 1] or uint8/uint16) atomically; return the path.

    ``image`` is in ``colour_order`` (RGB, or BGR as from :func:`read_array`). With ``info``
    from :func:`read_image` / :func:`read_array` the original sample type (16-bit, float),
    grey-ness and alpha are restored where the format stores them (:func:`output_layout`; an
    integer array that already holds them is written as it is), and its colour profile and EXIF
    (``info.metadata``) go into JPEG and PNG outputs. The path is checked first
    (:func:`check_output_path`). Never replaces ``info.path`` (the input file); replaces another
    existing file only when ``overwrite``.
    """
    path = check_output_path(path)
    ext = path.suffix.lower()
    if info is not None and info.path is not None and (
        _same_file(path, info.path) or path.resolve() == Path(info.path).resolve()
    ):
        raise InputError(f"{path}: refusing to overwrite the input image; choose another output path")
    if os.path.lexists(path) and not overwrite:
        raise InputError(f"{path}: file exists; pass overwrite=True (--overwrite) to replace it")
    target = output_layout(path, info)
    alpha = info.alpha if info is not None else None
    ok, encoded = cv2.imencode(ext, _stored(np.asarray(image), target, colour_order, alpha))
    if not ok:
        raise InputError(f"{path}: OpenCV could not encode the image as {ext}")
    data: Union[bytes, np.ndarray] = encoded.ravel()
    if info is not None and info.metadata:  # spliced into a copy of the encoded bytes; else written as it is
        data = embed_metadata(encoded.tobytes(), ext, info.metadata, grey=target.channels == 1)
    try:
        with staged_file(path) as staged, open(staged, "xb") as handle:
            handle.write(data)
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return path


def is_image_file(path: PathLike) -> bool:
    """True when ``path``'s extension is one the runtime reads."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_visible_image(path: Path) -> bool:
    """A regular, non-hidden file with an image extension (what folder listings pick up)."""
    return path.is_file() and not path.name.startswith(".") and is_image_file(path)


def one_line_error(exc: BaseException, *paths: PathLike) -> str:
    """``exc`` as one line that names the file it is about: the first of ``paths`` when the message
    names none of them (a skipped image in a run over many)."""
    message = str(exc) if not isinstance(exc, MemoryError) else "out of memory"
    message = " ".join(message.split()) or type(exc).__name__
    return message if any(str(path) in message for path in paths) else f"{paths[0]}: {message}"


def some_names(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` (sorted) and how many more: for error messages."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def images_by_stem(folder: Path) -> Dict[str, Path]:
    """Images directly in ``folder`` by stem; two files with one stem raise InputError."""
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_visible_image(path):
            continue
        if path.stem in found:
            raise InputError(
                f"{folder} holds two images named {path.stem!r} ({found[path.stem].name}, {path.name}); "
                "images are paired by name, keep one"
            )
        found[path.stem] = path
    return found

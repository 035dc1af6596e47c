"""Reading, validating and writing images for the runtime.

Everything the networks see is RGB float32 in [0, 1], HxWx3. The conversions are explicit:

* **Grey** (HxW or HxWx1) is replicated to three channels; results are written back as grey
  (ITU-R BT.601 luma of the RGB result), so a grey photo stays grey.
* **Alpha** (HxWx4) is kept aside, untouched, and re-attached to the result: by
  :func:`from_float_rgb` for arrays, and by :func:`write_image` when the output format stores
  alpha (PNG, TIFF, WebP); JPEG and BMP outputs drop it.
* **16-bit** images are scaled by 1/65535; they are written back as 16-bit where the output
  format supports it (PNG, TIFF) and as 8-bit otherwise.
* **Float arrays** must lie in [0, 1]. Excursions up to ``FLOAT_TOLERANCE`` (resampling and
  colour-conversion overshoot) are clipped silently; anything further out is an InputError,
  because it usually means 0-255 data in a float array, which clipping would ruin. NaN and
  infinity are always errors.
* **Huge images** over ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``, 100 MP) are refused
  before decoding where the header can be read (PNG, JPEG), so a hostile or mistaken file
  cannot exhaust memory; pass a larger ``max_pixels`` (``--max-pixels`` on the command line)
  to accept them.

Writes are atomic (a temporary file in the same folder, then a rename) and never replace the
input file; an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .errors import InputError

DEFAULT_MAX_PIXELS = 100_000_000
FLOAT_TOLERANCE = 0.02
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
_SIXTEEN_BIT_FORMATS = (".png", ".tif", ".tiff")
_ALPHA_FORMATS = (".png", ".tif", ".tiff", ".webp")
_COLOUR_ORDERS = ("RGB", "BGR")

PathLike = Union[str, os.PathLike]


@dataclass
class ImageInfo:
    """What :func:`to_float_rgb` / :func:`read_image` converted away, so it can be restored.

    ``dtype`` and ``channels`` describe the original (1, 3 or 4 channels; ``squeeze`` is True
    when a grey original had no channel axis); ``alpha`` is the original alpha channel
    (float32 HxW in [0, 1]) or None; ``path`` is the file it came from, if any.
    """

    dtype: np.dtype
    channels: int
    alpha: Optional[np.ndarray] = None
    squeeze: bool = False
    path: Optional[Path] = None

    @property
    def bit_depth(self) -> int:
        return int(np.dtype(self.dtype).itemsize * 8)

    @property
    def grey(self) -> bool:
        return self.channels == 1


def _check_colour_order(colour_order: str) -> str:
    order = str(colour_order).upper()
    if order not in _COLOUR_ORDERS:
        raise InputError(f"colour_order must be 'RGB' or 'BGR', not {colour_order!r}")
    return order


def _to_float(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) * np.float32(1.0 / 255.0)
    if array.dtype == np.uint16:
        return array.astype(np.float32) * np.float32(1.0 / 65535.0)
    if array.dtype.kind == "f":
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise InputError(f"{name} contains {bad} NaN or infinite value(s); pass finite values in [0, 1]")
        low, high = float(out.min()), float(out.max())
        if low < -FLOAT_TOLERANCE or high > 1.0 + FLOAT_TOLERANCE:
            hint = " (it looks like 0-255 data: divide by 255 or pass uint8)" if high > 2.0 else ""
            raise InputError(
                f"{name} has values in [{low:.4g}, {high:.4g}]; float images must be in [0, 1]{hint}"
            )
        return np.clip(out, 0.0, 1.0, out=out)
    raise InputError(f"{name} has dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")


def to_float_rgb(
    array: np.ndarray, colour_order: str = "RGB", name: str = "image"
) -> Tuple[np.ndarray, ImageInfo]:
    """Validate ``array`` and convert it to RGB float32 HxWx3 in [0, 1], plus what was converted."""
    order = _check_colour_order(colour_order)
    if not isinstance(array, np.ndarray):
        raise InputError(f"{name} must be a numpy array, not {type(array).__name__}")
    squeeze = array.ndim == 2
    if squeeze:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(
            f"{name} has shape {array.shape}; expected HxWx3 (or HxW grey, HxWx1, HxWx4 with alpha)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {array.shape})")
    channels = array.shape[2]
    values = _to_float(array, name)
    alpha = None
    if channels == 4:
        alpha = values[:, :, 3].copy()
        values = values[:, :, :3]
    if channels == 1:
        rgb = np.repeat(values, 3, axis=2)
    elif order == "BGR":
        rgb = values[:, :, ::-1]
    else:
        rgb = values
    info = ImageInfo(dtype=array.dtype, channels=channels, alpha=alpha, squeeze=squeeze)
    return np.ascontiguousarray(rgb, dtype=np.float32), info


def as_float_rgb(array: np.ndarray, colour_order: str = "RGB") -> np.ndarray:
    """Validate an array passed to the API and return it as RGB float32 HxWx3 in [0, 1].

    Accepts HxWx3, HxW / HxWx1 grey (replicated) and HxWx4 (alpha dropped; use
    :func:`to_float_rgb` to keep it); uint8, uint16 or float in [0, 1] (see the module notes).
    """
    return to_float_rgb(array, colour_order)[0]


def _quantise(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    values = np.clip(values, 0.0, 1.0)
    if dtype == np.uint8:
        return (values * 255.0 + 0.5).astype(np.uint8)
    if dtype == np.uint16:
        return (values * 65535.0 + 0.5).astype(np.uint16)
    return values.astype(dtype)


def _luma(rgb: np.ndarray) -> np.ndarray:
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


def _png_size(head: bytes) -> Optional[Tuple[int, int]]:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    return None


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """Width and height from the first start-of-frame marker, without decoding."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        is_sof = 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)
        if is_sof and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        pos += 2 + length
    return None


def _check_pixels(path: Path, width: int, height: int, max_pixels: Optional[int]) -> None:
    if max_pixels and width * height > max_pixels:
        raise InputError(
            f"{path}: image is {width}x{height} ({width * height / 1e6:.1f} MP), over the limit of "
            f"{max_pixels / 1e6:.0f} MP; raise it with max_pixels=... (--max-pixels on the command line) "
            "if you have the memory"
        )


def read_image(
    path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
) -> Tuple[np.ndarray, ImageInfo]:
    """Read an image file as RGB float32 HxWx3 in [0, 1] and the :class:`ImageInfo` to restore it.

    Raises InputError naming the file when it is missing, empty, truncated, not an image
    OpenCV can decode, or larger than ``max_pixels`` (None or 0: no limit). JPEG EXIF
    orientation is applied.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not data:
        raise InputError(f"{path}: file is empty (0 bytes)")
    size = _png_size(data[:32]) or _jpeg_size(data)
    if size:
        _check_pixels(path, size[0], size[1], max_pixels)
    is_jpeg = data[:2] == b"\xff\xd8"
    # Older OpenCV builds return a partially decoded JPEG (grey bottom) instead of failing;
    # a JPEG stream ends with the EOI marker, so its absence means the file was cut short.
    if is_jpeg and b"\xff\xd9" not in data[-1024:]:
        raise InputError(f"{path}: JPEG file is truncated (no end-of-image marker); re-export or re-copy it")
    # IMREAD_UNCHANGED keeps alpha and 16 bits but ignores EXIF orientation, which only
    # JPEGs carry in practice (and they have neither alpha nor 16 bits).
    flags = cv2.IMREAD_ANYCOLOR if is_jpeg else cv2.IMREAD_UNCHANGED
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if decoded is None:
        raise InputError(
            f"{path}: not a readable image (truncated, corrupt or an unsupported format; "
            f"supported: {', '.join(IMAGE_EXTENSIONS)})"
        )
    _check_pixels(path, decoded.shape[1], decoded.shape[0], max_pixels)
    if decoded.dtype not in (np.uint8, np.uint16) and decoded.dtype.kind != "f":
        raise InputError(f"{path}: unsupported sample type {decoded.dtype}; use 8- or 16-bit images")
    if decoded.dtype.kind == "f":
        decoded = np.clip(np.nan_to_num(decoded, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    rgb, info = to_float_rgb(decoded, "BGR", name=str(path))
    info.path = path
    return rgb, info


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_image(
    path: PathLike, rgb: np.ndarray, info: Optional[ImageInfo] = None, overwrite: bool = False
) -> Path:
    """Write an RGB image (float in [0, 1] or uint8/uint16) atomically; return the path.

    With ``info`` from :func:`read_image` the original bit depth (where the format allows),
    grey-ness and alpha (where the format stores it) are restored. Never replaces
    ``info.path`` (the input file); replaces another existing file only when ``overwrite``.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if not ext or not cv2.haveImageWriter(str(path)):
        raise InputError(f"{path}: cannot write this image format; use one of {', '.join(IMAGE_EXTENSIONS)}")
    if info is not None and info.path is not None and (
        _same_file(path, info.path) or path.resolve() == Path(info.path).resolve()
    ):
        raise InputError(f"{path}: refusing to overwrite the input image; choose another output path")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: file exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_dir():
        raise InputError(f"{path}: is a folder")
    array = np.asarray(rgb)
    if array.dtype.kind != "f":
        array, _ = to_float_rgb(array, "RGB", name="output image")
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"output image has shape {array.shape}; expected HxWx3")
    if info is None:
        info = ImageInfo(dtype=np.dtype(np.uint8), channels=3)
    dtype = info.dtype
    if np.dtype(dtype) not in (np.uint8, np.uint16):
        dtype = np.dtype(np.uint8)
    if np.dtype(dtype) == np.uint16 and ext not in _SIXTEEN_BIT_FORMATS:
        dtype = np.dtype(np.uint8)
    channels = info.channels
    if channels == 4 and ext not in _ALPHA_FORMATS:
        channels = 3
    target = ImageInfo(dtype=dtype, channels=channels, alpha=info.alpha, squeeze=info.squeeze)
    out = from_float_rgb(array, target, "BGR")
    ok, encoded = cv2.imencode(ext, out)
    if not ok:
        raise InputError(f"{path}: OpenCV could not encode the image as {ext}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A uniquely named sibling opened with "xb" (not mkstemp, whose files are private 0600), so
    # the output gets the permissions the user's umask gives any new file.
    tmp_name = str(path.parent / f".{path.stem}.{uuid.uuid4().hex}{ext}.tmp")
    try:
        with open(tmp_name, "xb") as tmp:
            tmp.write(encoded.tobytes())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def is_image_file(path: PathLike) -> bool:
    """True when ``path``'s extension is one the runtime reads."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_visible_image(path: Path) -> bool:
    """A regular, non-hidden file with an image extension (what folder listings pick up)."""
    return path.is_file() and not path.name.startswith(".") and is_image_file(path)


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

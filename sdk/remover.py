"""The reflection-removal pipeline: one object for RM2S (two networks + middle step) and CRRN.

::

    from dereflect import Remover
    remover = Remover.load("exports/rm2s-lite")              # ONNX Runtime on the CPU
    clean = remover.remove(frame)                             # an OpenCV (BGR) uint8 frame in, same out

**Colour order.** Arrays are taken, and given back, in OpenCV's channel order, BGR, by default
(what ``cv2.imread`` and ``cv2.VideoCapture`` give): the convention of the OpenCV ecosystem's
libraries. Pass ``colour_order="RGB"`` for arrays from Pillow, imageio, matplotlib or torchvision.
The networks themselves always see RGB.

**Any size.** The exported graphs pad to their stride internally, so any H x W runs as is up
to ``max_side`` (default: the side the model's manifest records, else :data:`DEFAULT_MAX_SIDE`; never
more than a TensorRT engine's profile allows).
Larger images are handled by one of two strategies (``large_image=``):

* ``"guided"`` (default): run the networks once on the image scaled to fit, take the
  predicted reflection layer ``R = I - B`` and bring it to full resolution with a fast guided
  filter (He & Sun 2015) whose guide is the full-resolution input, then ``B = I - R``. The
  middle step's 2-means threshold is a *global* statistic of the frame; at reduced resolution
  it is computed once over the whole frame, exactly as the networks were trained to see it,
  and the cost is one network pass whatever the size. Reflections are mostly smooth, so
  their layer survives the downscale; the guide restores the input's full-resolution detail,
  which plain upsampling of ``B`` would lose.
* ``"tile"``: run overlapping tiles of at most ``max_side`` at full resolution and blend the
  seams with linear ramps. Keeps every network at native resolution, but each tile gets its
  own 2-means threshold (tiles that hold only background or only reflection split their
  edges differently) and the cost grows with the tile count.

**Memory.** Both strategies work on the full-resolution image in strips of about
``STRIP_PIXELS`` pixels (guided: the downscale, the upsampled filter coefficients and the
result; tile: one band of tiles), converting the caller's array a strip at a time and writing
the result straight into the caller's type. So besides the input and the output arrays, a
large image costs the networks' pass at ``max_side`` and a few strips, whatever its size: no
full-size float copy is made. The resampling is OpenCV's ``INTER_AREA`` / ``INTER_LINEAR``
arithmetic done strip by strip (:func:`shrink_area`, :func:`resize_linear_rows`).

**Threads.** A Remover may be shared between threads: inference is serialised by a lock,
so sharing is safe but gives no parallel speed-up. For parallel throughput create one
Remover per thread (each holds its own sessions / execution contexts).
"""

from __future__ import annotations

import inspect
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NoReturn, Optional, Tuple, Union

import cv2
import numpy as np
from dereflect.backends.base import HostExecutor, open_backend
from dereflect.errors import DereflectError, InputError
from dereflect.imageio import ImageInfo, alpha_rows, check_image, from_float_rgb, rgb_rows, row_chunks
from dereflect.manifest import DEFAULT_MAX_SIDE, Manifest, check_max_side
from dereflect.methods.base import NULL_TIMER, Executor, Layers, MiddleStepOutput, Timer, get_method

LARGE_IMAGE_STRATEGIES = ("guided", "tile")
TILE_OVERLAP = 64
GUIDED_RADIUS = 2
GUIDED_EPS = 1e-4
#: Pixels per strip of a large image (about 24 MB per float RGB strip); with the networks' pass
#: at ``max_side``, what bounds the memory a large image needs beyond its input and output. A frame
#: up to 1080p is one strip, resized by OpenCV itself (``shrink_area``, ``resize_linear_rows``).
STRIP_PIXELS = 1 << 21
#: The image-like Result fields besides ``background`` (what ``remove_with_intermediates`` returns
#: beside it, in order), and all of them.
INTERMEDIATE_LAYERS = ("reflection", "stage1", "confidence", "mask_background", "mask_reflection", "gradient")
INTERMEDIATES = INTERMEDIATE_LAYERS + ("thresholds",)
_PLANES = ("confidence", "mask_background", "mask_reflection", "gradient")
_MASKS = ("mask_background", "mask_reflection")
#: The strengths a Remover takes: 0 gives the input back, 1 the model's output (the default),
#: above 1 the model's change amplified (more of what it removes, and more of its errors).
STRENGTH_RANGE = (0.0, 2.0)
#: ``progress(done, total)``: told after each tile of a tiled large image.
Progress = Callable[[int, int], None]


@dataclass
class Result(Layers):
    """A removal with its intermediates at the resolution the networks ran at: :class:`Layers` with
    the caller's dtype and colour order, plus where they were computed (``scale``, ``tiles``).

    ``background`` is what :meth:`Remover.remove` returns (the input's dtype, shape and colour
    order), always at full resolution. Image-like intermediates are float32 HxWx3 in the
    caller's colour order: ``reflection`` (``I - B``, signed; CRRN: the network's reflection
    output) and ``stage1`` (RM2S). ``confidence`` (float32 HxW), ``mask_background`` /
    ``mask_reflection`` (bool HxW) and ``thresholds`` (the 2-means centres ``(low, high)``) are
    RM2S's middle step; ``gradient`` (float32 HxW) is CRRN's.

    The intermediates are full size when the image fits ``max_side`` and with the ``tile``
    strategy (blended from the tiles, each with its own thresholds: ``tiles`` > 1 and
    ``thresholds`` None). With the ``guided`` strategy (``scale`` < 1) they are the networks'
    own outputs at the reduced size, ``scale`` times the input's (resize them if you need them
    full size): upsampling them would only interpolate, and full-size copies of a 100 MP image
    cost gigabytes.
    """

    scale: float = 1.0
    tiles: int = 1


def _box(x: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    return cv2.boxFilter(x, -1, (size, size), normalize=True, borderType=cv2.BORDER_REFLECT)


def _linear_taps(dst: int, src: int) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR source index and float32 weight for each of ``dst`` positions over ``src``."""
    scale = 1.0 / (dst / src)
    position = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    index = np.floor(position)
    return index.astype(np.int64), position - index


def _resize_columns_linear(rows: np.ndarray, width: int) -> np.ndarray:
    index, weight = _linear_taps(width, rows.shape[1])
    last = rows.shape[1] - 1
    weight[(index < 0) | (index >= last)] = 0.0  # OpenCV clamps the position at both edges
    index = np.clip(index, 0, last)
    following = np.minimum(index + 1, last)
    return rows[:, index] * (np.float32(1.0) - weight)[None, :, None] + rows[:, following] * weight[None, :, None]


def resize_linear_rows(image: np.ndarray, height: int, width: int, top: int, bottom: int) -> np.ndarray:
    """Rows ``top:bottom`` of ``image`` (h x w x C float32) resized bilinearly to ``height`` x ``width``.

    OpenCV's own INTER_LINEAR arithmetic (half-pixel centres, clamped edges, a horizontal then a
    vertical pass with float32 weights), so a layer can be upsampled a strip at a time. Bit for
    bit ``cv2.resize`` where OpenCV runs its own code; builds with Intel IPP (the x86 PyPI
    wheel) resize slightly differently (up to about 1e-5). All rows at once (a frame within one
    strip: every video frame up to 720p) is ``cv2.resize`` itself, some 20 times faster.
    """
    if top == 0 and bottom == height:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, -1)
    index, weight = _linear_taps(height, image.shape[0])
    index, weight = index[top:bottom], weight[top:bottom]
    first = np.clip(index, 0, image.shape[0] - 1)  # rows are clamped, the weights kept (as OpenCV does)
    second = np.clip(index + 1, 0, image.shape[0] - 1)
    low, high = int(first.min()), int(second.max()) + 1
    rows = _resize_columns_linear(image[low:high], width)
    return (rows[first - low] * (np.float32(1.0) - weight)[:, None, None]
            + rows[second - low] * weight[:, None, None])


def _area_tab(src: int, dst: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights for shrinking ``src`` positions to ``dst``: (dst index, src index,
    float32 weight), in its order (by destination, then source)."""
    scale = 1.0 / (dst / src)
    entries = []
    for d in range(dst):
        start = d * scale
        end = start + scale
        cell = min(scale, src - start)
        first, last = int(np.ceil(start)), int(np.floor(end))
        last = min(last, src - 1)
        first = min(first, last)
        if first - start > 1e-3:
            entries.append((d, first - 1, (first - start) / cell))
        entries.extend((d, s, 1.0 / cell) for s in range(first, last))
        if end - last > 1e-3:
            entries.append((d, last, min(min(end - last, 1.0), cell) / cell))
    dst_index, src_index, weight = zip(*entries)
    return np.array(dst_index), np.array(src_index), np.array(weight, np.float32)


def _shrink_columns_area(rows: np.ndarray, tab: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The horizontal INTER_AREA pass: each output column sums its source columns in OpenCV's order."""
    dst_index, src_index, weight = tab
    counts = np.bincount(dst_index)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = None
    for k in range(int(counts.max())):
        # Columns with fewer sources add 0 * a pixel, which leaves their sums exactly as they are.
        has = counts > k
        entry = np.minimum(starts + k, len(src_index) - 1)
        term = rows[:, np.where(has, src_index[entry], 0)] * np.where(has, weight[entry], 0)[None, :, None]
        out = term if out is None else out + term
    return out


def shrink_area(frame: Any, height: int, width: int) -> np.ndarray:
    """``frame`` (a :class:`_Frame`) shrunk to ``height`` x ``width`` as ``cv2.resize(..., INTER_AREA)`` does
    on its float RGB, bit for bit, reading it a strip at a time."""
    src_h, src_w = frame.height, frame.width
    if src_h * src_w <= STRIP_PIXELS:
        # Within one strip the whole frame is read at once: OpenCV itself, some 10 times faster.
        return cv2.resize(frame.rgb(), (width, height), interpolation=cv2.INTER_AREA)
    if src_h % height == 0 and src_w % width == 0:
        # OpenCV's block-average path: an output row depends only on its own block of input rows.
        step = src_h // height
        rows = max(1, STRIP_PIXELS // (src_w * step)) * step
        return np.concatenate([
            cv2.resize(frame.rgb(top, top + rows), (width, (min(top + rows, src_h) - top) // step),
                       interpolation=cv2.INTER_AREA)
            for top in range(0, src_h, rows)])
    columns = _area_tab(src_w, width)
    dst_rows, src_rows, weights = _area_tab(src_h, height)
    out = np.empty((height, width, 3), np.float32)
    begun = np.zeros(height, bool)
    for top, bottom in row_chunks(src_h, src_w, STRIP_PIXELS):
        shrunk = _shrink_columns_area(frame.rgb(top, bottom), columns)
        for j in range(*np.searchsorted(src_rows, [top, bottom])):
            term = weights[j] * shrunk[src_rows[j] - top]
            if begun[dst_rows[j]]:
                out[dst_rows[j]] += term
            else:
                out[dst_rows[j]], begun[dst_rows[j]] = term, True
    return out


def guided_coefficients(value: np.ndarray, guide_low: np.ndarray, radius: int = GUIDED_RADIUS,
                        eps: float = GUIDED_EPS) -> Tuple[np.ndarray, np.ndarray]:
    """The fast guided filter's smoothed coefficients ``(a, b)`` at low resolution (``value ~ a * guide + b``)."""
    value = np.asarray(value, dtype=np.float32)
    guide_low = np.asarray(guide_low, dtype=np.float32)
    mean_i = _box(guide_low, radius)
    mean_p = _box(value, radius)
    cov = _box(guide_low * value, radius) - mean_i * mean_p
    var = _box(guide_low * guide_low, radius) - mean_i * mean_i
    a = cov / (var + np.float32(eps))
    b = mean_p - a * mean_i
    return _box(a, radius), _box(b, radius)


def guided_upsample_rows(coefficients: Tuple[np.ndarray, np.ndarray], guide: np.ndarray, height: int,
                         top: int = 0) -> np.ndarray:
    """Rows ``top:top + len(guide)`` of the fast guided filter's output, at full resolution.

    The local linear model ``value ~ a * guide + b`` fitted at low resolution (``coefficients``, from
    :func:`guided_coefficients`) is upsampled bilinearly to ``height`` x the guide's width, only the
    rows asked for, and applied to ``guide``: those rows of the full-resolution guide (H x W x C), so
    edges come from the guide rather than from interpolation. ``top=0`` with every row of the guide
    is the whole image; the Remover goes a strip at a time, so no full-size coefficients exist.
    """
    a, b = coefficients
    bottom, width = top + guide.shape[0], guide.shape[1]
    return (resize_linear_rows(a, height, width, top, bottom) * np.asarray(guide, np.float32)
            + resize_linear_rows(b, height, width, top, bottom))


def with_strength(image: np.ndarray, background: np.ndarray, strength: float) -> np.ndarray:
    """``image + strength * (background - image)`` clipped to [0, 1]: the model's change scaled.

    ``image`` and ``background`` are float RGB of one shape: how much a Remover changes a photo
    (its ``strength`` option).
    """
    return np.clip(image + np.float32(strength) * (background - image), 0.0, 1.0).astype(np.float32)


def check_strength(strength: Any) -> float:
    """``strength`` as a float, or InputError when it is not a number in :data:`STRENGTH_RANGE`."""
    low, high = STRENGTH_RANGE
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)) \
            or not low <= float(strength) <= high:
        raise InputError(f"strength must be a number from {low:g} to {high:g} (0: the input unchanged, 1: the "
                         f"model's output, above 1: its change amplified), not {strength!r}")
    return float(strength) + 0.0  # -0.0 is 0.0 (it would print as "-0")


def at_strength(strength: Optional[float]) -> str:
    """" at strength K" where a model's change is scaled, else "" (names in reports and reprs)."""
    return f" at strength {strength:g}" if strength not in (None, 1.0) else ""


def fit_size(height: int, width: int, max_hw: Tuple[int, int]) -> Tuple[int, int, float]:
    """The largest size with the same aspect that fits ``max_hw``; returns (h, w, scale)."""
    scale = min(max_hw[0] / height, max_hw[1] / width, 1.0)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


def model_max_side(max_side: Union[int, None, str], manifest: Manifest) -> Optional[int]:
    """The side a Remover's ``max_side`` option means: "model" is the one ``manifest`` records, else
    :data:`DEFAULT_MAX_SIDE`; None or 0 is no limit (None). InputError for anything but those and a
    whole number of at least :data:`~dereflect.manifest.MIN_MAX_SIDE`."""
    if isinstance(max_side, str) and max_side == "model":
        max_side = manifest.max_side or DEFAULT_MAX_SIDE
    return check_max_side(max_side, no_limit=True)


def network_max_hw(max_side: Optional[int], engine_max: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    """The largest H x W the networks run at: ``max_side`` on each side (None: no limit), within a TensorRT
    engine profile's largest input ``engine_max`` (None: none). None when neither limits it."""
    limits = [hw for hw in (engine_max, (max_side, max_side) if max_side else None) if hw]
    return (min(h for h, _ in limits), min(w for _, w in limits)) if limits else None


def scaled_to_fit(rgb: np.ndarray, max_hw: Optional[Tuple[int, int]]) -> np.ndarray:
    """An HxWx3 float32 RGB image as the networks see it with the ``guided`` strategy (the default): as it
    is when it fits ``max_hw`` (None: no limit), else shrunk to :func:`fit_size` as :meth:`Remover.remove`
    shrinks it (:func:`shrink_area`)."""
    if max_hw is None:
        return rgb
    height, width, scale = fit_size(rgb.shape[0], rgb.shape[1], max_hw)
    return rgb if scale >= 1.0 else shrink_area(_Frame(rgb, converted=True), height, width)


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _ramp(length: int, overlap: int) -> np.ndarray:
    """Blend weights along one tile side: rising over ``overlap`` pixels at each end, never zero."""
    position = np.arange(length, dtype=np.float32)
    edge = np.minimum(position + 1, length - position)
    return np.minimum(edge / float(max(overlap, 1) + 1), 1.0)


class _Frame:
    """An image to process, read as RGB float32 a window at a time, so that a large image never
    exists as one full-size float copy. ``converted``: the array is RGB float32 in [0, 1] already.
    A frame within one strip is read whole, several times (downscale, upsampling, strength): its
    conversion is kept after the first."""

    def __init__(self, array: np.ndarray, colour_order: str = "RGB", converted: bool = False) -> None:
        self.array = array
        self.colour_order = colour_order
        self.converted = converted
        self.height, self.width = array.shape[:2]
        self._whole: Optional[np.ndarray] = None

    def rgb(self, top: int = 0, bottom: Optional[int] = None, left: int = 0,
            right: Optional[int] = None) -> np.ndarray:
        if self.converted:
            return self.array[top:bottom, left:right]
        if (top, left) == (0, 0) and bottom in (None, self.height) and right in (None, self.width):
            if self._whole is None:
                self._whole = rgb_rows(self.array, self.colour_order)
            return self._whole
        return rgb_rows(self.array, self.colour_order, top, bottom, left, right)


class _Background:
    """Where the full-resolution background goes, strip by strip: its change from the frame scaled
    by ``strength`` (:func:`with_strength`), then converted to the caller's type (``info``: dtype,
    channels, the frame's colour order and alpha) or, without ``info``, float32 RGB."""

    def __init__(self, frame: _Frame, info: Optional[ImageInfo] = None, strength: float = 1.0) -> None:
        self.frame = frame
        self.info = info
        self.strength = strength
        self.array: Optional[np.ndarray] = None

    def put(self, top: int, bottom: int, rows: np.ndarray) -> None:
        if self.strength != 1.0:
            rows = with_strength(self.frame.rgb(top, bottom), rows, self.strength)
        if self.info is not None:
            strip = ImageInfo(dtype=self.info.dtype, channels=self.info.channels, squeeze=self.info.squeeze,
                              alpha=alpha_rows(self.frame.array, top, bottom))
            rows = from_float_rgb(rows, strip, self.frame.colour_order)
        if top == 0 and bottom == self.frame.height:
            self.array = rows
            return
        if self.array is None:
            self.array = np.empty((self.frame.height,) + rows.shape[1:], rows.dtype)
        self.array[top:bottom] = rows


class _BatchExecutor(Executor):
    """The host executor over N frames of one size: each network runs once on N x C x H x W, RM2S's
    middle step frame by frame (its 2-means is per frame), ``download`` gives N x H x W x C."""

    def __init__(self, host: HostExecutor) -> None:
        self.host = host

    def upload(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)

    def network(self, name: str, x: np.ndarray) -> Dict[str, np.ndarray]:
        return self.host.network(name, x)

    def clip(self, x: np.ndarray) -> np.ndarray:
        return self.host.clip(x)

    def middle_step(self, image: np.ndarray, stage1: np.ndarray, settings: Any,
                    intermediates: bool) -> MiddleStepOutput:
        parts = [self.host.middle_step(image[i:i + 1], stage1[i:i + 1], settings, False).stage2_input
                 for i in range(image.shape[0])]
        return MiddleStepOutput(stage2_input=np.concatenate(parts))

    def download(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)


class Remover:
    """Removes reflections from images with a model (see the module docstring).

    Open one with :meth:`load` (a bundled model's name, an export directory or a training
    checkpoint; :func:`dereflect.models.open_model` is the same route). ``backend``:
    "onnxruntime" (default for exports), "tensorrt" or "torch" (default for checkpoints);
    ``device`` and ``precision`` are the backend's, and its own options (``threads`` for
    onnxruntime, ``checkpoint``/``use_cupy`` for torch, ``use_graph`` for TensorRT) are checked:
    an option the backend does not take raises InputError. ``max_side`` (default "model": the
    side the model's manifest recommends, else :data:`DEFAULT_MAX_SIDE`; None or 0: no limit;
    see :func:`model_max_side`) and ``large_image`` ("guided" or "tile") handle large images;
    ``threshold`` is the CPU middle step's 2-means ("exact" sort, or "histogram", the CUDA kernel's
    algorithm); ``c1``/``c2`` default to the manifest's. With ``device_middle_step`` (default) a
    backend that can keep the frame on the GPU (TensorRT, torch on CUDA) does so for
    :meth:`remove`; that path's 2-means is the CUDA kernel's histogram one (TensorRT, and torch
    with CuPy) or, on torch without CuPy, the exact one computed with torch ops. ``strength`` (0 to 2,
    default 1) scales the model's change to the photo at full resolution (:func:`with_strength`):
    below 1 it changes less, above 1 more; the intermediates are the networks' own. It may be set
    between calls (a live control in a video application), checked as at construction.

    Arrays are BGR by default (OpenCV's order; ``colour_order="RGB"`` for others), in
    :meth:`remove`, :meth:`remove_batch` and :meth:`remove_with_intermediates` alike.
    """

    def __init__(
        self,
        manifest: Manifest,
        backend: str = "onnxruntime",
        device: str = "auto",
        precision: str = "auto",
        max_side: Union[int, None, str] = "model",
        large_image: str = "guided",
        threshold: Optional[str] = None,
        c1: Optional[float] = None,
        c2: Optional[float] = None,
        device_middle_step: bool = True,
        strength: float = 1.0,
        **backend_options: Any,
    ) -> None:
        if not isinstance(manifest, Manifest):
            raise InputError(f"Remover() takes a Manifest, not {type(manifest).__name__}; open a model by name "
                             "or path with Remover.load (for example Remover.load('crrn-lite'))")
        if large_image not in LARGE_IMAGE_STRATEGIES:
            raise InputError(
                f"large_image must be one of {', '.join(LARGE_IMAGE_STRATEGIES)}, not {large_image!r}"
            )
        max_side = model_max_side(max_side, manifest)
        self.strength = strength
        self.manifest = manifest
        self.method = get_method(manifest.method)
        overrides = {k: v for k, v in (("c1", c1), ("c2", c2), ("threshold", threshold)) if v is not None}
        self.settings = self.method.settings(manifest.settings, **overrides)
        self.large_image = large_image
        self._lock = threading.Lock()
        self._closed = False
        #: whether the networks took a batch (None: not tried yet; see remove_batch)
        self._batches: Optional[bool] = None
        self._backend = open_backend(manifest, self.method, backend, REMOVER_OPTIONS, device=device,
                                     precision=precision, **backend_options)
        self.backend = self._backend.name
        self._host = self._backend.host_executor()
        self._device = self._backend.device_executor(self.settings) if device_middle_step else None
        self.min_hw, engine_max = self._backend.input_limits()
        self.max_hw = network_max_hw(max_side, engine_max)

    @classmethod
    def load(cls, model: Union[str, os.PathLike, None] = None, **options: Any) -> Remover:
        """A bundled model by name, an export directory, a training checkpoint, or (``None``) the default
        (:func:`dereflect.models.open_model`, the one route that opens a model)."""
        from dereflect.models import open_model

        return open_model(model, **options)

    @property
    def strength(self) -> float:
        """How much of the model's change the outputs carry (see :func:`with_strength`)."""
        return self._strength

    @strength.setter
    def strength(self, value: Any) -> None:
        self._strength = check_strength(value)

    @property
    def executor(self) -> Any:
        """The executor :meth:`remove` runs the method's sequence on (the device one when there is one)."""
        return self._device or self._host

    def close(self) -> None:
        """Free the networks (sessions, engines, device memory); the Remover is then closed for good
        (a later call raises InputError rather than quietly loading the networks again).
        Waits for a frame in progress on another thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            closer = getattr(self._device, "close", None)
            if closer is not None:
                closer()
            self._backend.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (every later call that runs the networks raises InputError)."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"{self!r} is closed; open the model again (Remover.load) to go on")

    def __enter__(self) -> Remover:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> NoReturn:
        # Its sessions (and a GPU's context) cannot travel to another process, and a copy would share
        # them with the original (closing one would close both): refuse with the way to do it.
        raise TypeError(f"{self!r} cannot be pickled or copied: load a Remover in each process "
                        "(Remover.load(model) in a pool's initializer)")

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return (f"<Remover {self.manifest.name!r} ({self.method.name}) on {self.backend}"
                f"{at_strength(self.strength)}{closed}>")

    def describe(self) -> Any:
        """Where the networks run and at what precision (:class:`~dereflect.backends.base.BackendDescription`)."""
        return self._backend.describe()

    # -- network passes -------------------------------------------------------------------

    def run_once(self, rgb: np.ndarray, intermediates: bool = False, timer: Timer = NULL_TIMER,
                 settings: Any = None) -> Layers:
        """One pass of the method's sequence at ``rgb``'s size (HxWx3 float32 RGB), each stage timed.

        What :meth:`remove` runs for every frame or tile, and what ``dereflect bench`` times.
        Below an engine profile's minimum the frame is edge-padded and the results cropped back.
        ``settings`` replaces the method's settings for this pass (a video's frame-to-frame state).
        """
        self._check_open()
        height, width = rgb.shape[:2]
        settings = self.settings if settings is None else settings
        stateful = getattr(settings, "centre_filter", None) is not None
        # Frame-to-frame state lives in the CPU middle step (device kernels compute their own centres).
        executor = self._host if intermediates or stateful or self._device is None else self._device
        if self.min_hw is None or (height >= self.min_hw[0] and width >= self.min_hw[1]):
            return executor.run(self.method, rgb, settings, timer, intermediates)
        pad_h, pad_w = max(self.min_hw[0] - height, 0), max(self.min_hw[1] - width, 0)
        padded = cv2.copyMakeBorder(rgb, 0, pad_h, 0, pad_w, cv2.BORDER_REPLICATE)
        layers = executor.run(self.method, padded, settings, timer, intermediates)
        for key, value in vars(layers).items():
            if isinstance(value, np.ndarray):
                setattr(layers, key, np.ascontiguousarray(value[:height, :width]))
        layers.reflection = rgb - layers.background if not intermediates else layers.reflection
        return layers

    def _fits(self, height: int, width: int) -> bool:
        return self.max_hw is None or (height <= self.max_hw[0] and width <= self.max_hw[1])

    def network_size(self, height: int, width: int) -> Tuple[int, int]:
        """The size the networks run at for an H x W frame with the default ``guided`` strategy: the frame's
        when it fits ``max_hw``, else scaled down to fit (:func:`fit_size`)."""
        if self._fits(height, width):
            return height, width
        net_height, net_width, _ = fit_size(height, width, self.max_hw)
        return net_height, net_width

    def _guided(self, frame: _Frame, size: Tuple[int, int], out: _Background, intermediates: bool,
                settings: Any = None, timer: Timer = NULL_TIMER) -> Dict[str, Any]:
        with timer.stage("downscale"):
            small = shrink_area(frame, size[0], size[1])
        low = self.run_once(small, intermediates, timer, settings)
        with timer.stage("upsample"):
            coefficients = guided_coefficients(small - low.background, small)
            for top, bottom in row_chunks(frame.height, frame.width, STRIP_PIXELS):
                guide = frame.rgb(top, bottom)
                reflection = guided_upsample_rows(coefficients, guide, frame.height, top)
                out.put(top, bottom, np.clip(guide - reflection, 0.0, 1.0))
        return {key: getattr(low, key) for key in INTERMEDIATES}

    def _tiled(self, frame: _Frame, out: _Background, intermediates: bool,
               settings: Any = None, progress: Optional[Progress] = None) -> Tuple[Dict[str, Any], int]:
        """Tiles in rows ("bands"); a band's sums cover only its rows, and the rows no later band
        reaches are blended and handed on as soon as the band is done. ``progress(done, total)``
        after each tile."""
        height, width = frame.height, frame.width
        tile_h, tile_w = min(self.max_hw[0], height), min(self.max_hw[1], width)
        overlap = min(TILE_OVERLAP, tile_h // 4, tile_w // 4)
        tops, lefts = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
        weight = (_ramp(tile_h, overlap)[:, None] * _ramp(tile_w, overlap)[None, :])[:, :, None]
        keys = ("background",) + INTERMEDIATE_LAYERS if intermediates else ("background",)
        sums: Dict[str, np.ndarray] = {}
        weights = np.zeros((tile_h, width, 1), np.float32)
        full: Dict[str, np.ndarray] = {}
        count = 0
        for band, top in enumerate(tops):
            if band:
                # Rows the previous band shares with this one keep their sums so far.
                shift = top - tops[band - 1]
                for total in list(sums.values()) + [weights]:
                    total[:tile_h - shift] = total[shift:].copy()
                    total[tile_h - shift:] = 0.0
            for left in lefts:
                window = (slice(0, tile_h), slice(left, left + tile_w))
                tile = np.ascontiguousarray(frame.rgb(top, top + tile_h, left, left + tile_w))
                layers = self.run_once(tile, intermediates, settings=settings)
                weights[window] += weight
                count += 1
                if progress is not None:
                    progress(count, len(tops) * len(lefts))
                for key in keys:
                    value = getattr(layers, key)
                    if value is None:
                        continue
                    value = value.astype(np.float32)
                    if value.ndim == 2:
                        value = value[:, :, None]
                    if key not in sums:
                        sums[key] = np.zeros((tile_h, width, value.shape[2]), np.float32)
                    sums[key][window] += value * weight
            done = (tops[band + 1] if band + 1 < len(tops) else height) - top
            for key, total in sums.items():
                blended = total[:done] / weights[:done]
                if key == "background":
                    out.put(top, top + done, blended)
                    continue
                if key in _PLANES:
                    blended = blended[:, :, 0] > 0.5 if key in _MASKS else blended[:, :, 0]
                if key not in full:
                    full[key] = np.empty((height, width) + blended.shape[2:], blended.dtype)
                full[key][top:top + done] = blended
        return full, count

    def _process(self, frame: _Frame, out: _Background, intermediates: bool, settings: Any = None,
                 progress: Optional[Progress] = None, timer: Timer = NULL_TIMER) -> Tuple[Dict[str, Any], float, int]:
        """Run ``frame`` at whatever size it needs; its full-resolution background goes to ``out``.

        Returns the intermediates (the :data:`INTERMEDIATES` at the resolution the networks ran
        at; see :class:`Result`), that resolution's scale and the tile count.
        """
        if self._fits(frame.height, frame.width):
            layers = self.run_once(frame.rgb(), intermediates, timer, settings)
            out.put(0, frame.height, layers.background)
            return {key: getattr(layers, key) for key in INTERMEDIATES}, 1.0, 1
        if self.large_image == "tile":
            extras, count = self._tiled(frame, out, intermediates, settings, progress)
            return extras, 1.0, count
        small_h, small_w, scale = fit_size(frame.height, frame.width, self.max_hw)
        return self._guided(frame, (small_h, small_w), out, intermediates, settings, timer), scale, 1

    def process(self, rgb: np.ndarray, settings: Any = None, timer: Timer = NULL_TIMER) -> Layers:
        """The layers of one HxWx3 float32 RGB frame at full size (what :meth:`remove` returns, before
        the conversion back to the input's type), with ``settings`` replacing the method's for it.
        ``timer`` times the method's stages and, for a frame larger than the networks take with the
        guided strategy, its "downscale" and "upsample" (what ``dereflect bench`` reports)."""
        background = self.background_of(rgb, settings, timer)
        return Layers(background=background, reflection=rgb - background)

    def background_of(self, rgb: np.ndarray, settings: Any = None, timer: Timer = NULL_TIMER) -> np.ndarray:
        """:meth:`process`'s background alone (a video frame's loop needs no reflection layer: one
        frame-sized array less to fill per frame)."""
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.float32 and rgb.ndim == 3 and rgb.shape[2] == 3):
            # Only what costs nothing to check: remove() validates values too, process() is the fast path.
            what = f"{rgb.dtype} {'x'.join(map(str, rgb.shape))}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise InputError(f"process and background_of take an HxWx3 float32 RGB frame in [0, 1], not {what} "
                             "(dereflect.imageio.as_float_rgb converts an image; remove() takes any)")
        frame = _Frame(rgb, converted=True)
        out = _Background(frame, strength=self.strength)
        with self._lock:
            self._process(frame, out, intermediates=False, settings=settings, timer=timer)
        return out.array

    # -- public API -----------------------------------------------------------------------

    def remove(self, image: np.ndarray, colour_order: str = "BGR", progress: Optional[Progress] = None) -> np.ndarray:
        """The background of ``image``, with the input's dtype, shape and colour order.

        ``image``: HxWx3 (or HxW grey, HxWx4 with alpha kept), uint8, uint16 or float in [0, 1];
        ``colour_order``: "BGR" (default: OpenCV's order, as ``cv2.imread`` and ``cv2.VideoCapture``
        give) or "RGB" (Pillow, imageio, matplotlib). With :mod:`dereflect.imageio`:
        :func:`~dereflect.imageio.read_array` gives BGR (this default; write the result with
        ``write_image(path, result, info, colour_order="BGR")``), :func:`~dereflect.imageio.read_image`
        gives float RGB (pass ``colour_order="RGB"``). Both orders have three channels, so a mix-up
        cannot be detected: it swaps red and blue.
        ``progress(done, total)`` is called after each tile of a large image with ``large_image="tile"``
        (a progress bar's hook; nothing else reports).
        """
        return self._remove(image, check_image(image, colour_order), colour_order, progress)

    def _remove(self, image: np.ndarray, info: ImageInfo, colour_order: str,
                progress: Optional[Progress] = None) -> np.ndarray:
        frame = _Frame(image, colour_order)
        out = _Background(frame, info, self.strength)
        with self._lock:
            self._process(frame, out, intermediates=False, progress=progress)
        return out.array

    def remove_batch(
        self, images: Union[Iterable[np.ndarray], np.ndarray], colour_order: str = "BGR"
    ) -> Union[List[np.ndarray], np.ndarray]:
        """:meth:`remove` for each image (any mix of sizes; a list, or any iterable, of arrays gives a
        list); an NxHxWxC array gives an array back.

        Frames of one size that the networks take whole (not a large image) run as one batch
        through each network: exported graphs have a dynamic batch axis, and RM2S's middle step
        runs frame by frame between the networks. The results are :meth:`remove`'s, up to float
        rounding. The frames run one at a time instead (a loop over :meth:`remove`) when their
        sizes differ, when they are larger than ``max_side``, on a backend that keeps the frame
        on the GPU (TensorRT, torch on CUDA: their executors take one frame) or with an engine
        profile's minimum size, and for a graph exported with a fixed batch of 1 (found at the
        first batch, which then runs again frame by frame, as do the later ones).
        ``colour_order`` as in :meth:`remove` (BGR by default).
        """
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise InputError(f"a batch array must be NxHxWxC, got shape {images.shape}")
        elif isinstance(images, Iterable) and not isinstance(images, (str, bytes)):
            images = list(images)  # the frames are read twice below: a generator would be empty the second time
        else:
            raise InputError(f"remove_batch takes a list of images or an NxHxWxC array, not {type(images).__name__}")
        infos = [check_image(image, colour_order, f"image {i}") for i, image in enumerate(images)]
        frames = [_Frame(image, colour_order) for image in images]
        if not frames:
            return images[:0].copy() if isinstance(images, np.ndarray) else []
        backgrounds = None
        sizes = {(frame.height, frame.width) for frame in frames}
        if (len(frames) > 1 and len(sizes) == 1 and self._fits(*next(iter(sizes))) and self._batches is not False
                and self._device is None and self.min_hw is None):
            with self._lock:
                backgrounds = self._run_batch(np.stack([frame.rgb() for frame in frames]))
        if backgrounds is None:
            outs = [self._remove(image, info, colour_order) for image, info in zip(images, infos)]
        else:
            outs = []
            for frame, info, background in zip(frames, infos, backgrounds):
                out = _Background(frame, info, self.strength)
                out.put(0, frame.height, background)
                outs.append(out.array)
        return np.stack(outs) if isinstance(images, np.ndarray) else outs

    def _run_batch(self, batch: np.ndarray) -> Optional[np.ndarray]:
        """The backgrounds of an N x H x W x 3 RGB batch, or None when the networks refuse a batch."""
        self._check_open()
        try:
            layers = self.method.run(_BatchExecutor(self._host), batch, self.settings)
        except DereflectError:
            if self._batches:
                raise  # batches ran before: this is a real error
            self._batches = False  # a fixed batch of 1; a real error comes back frame by frame
            return None
        self._batches = True
        return layers.background

    def remove_with_intermediates(self, image: np.ndarray, colour_order: str = "BGR",
                                  progress: Optional[Progress] = None) -> Result:
        """:meth:`remove` plus the intermediates (see :class:`Result` for their resolution); always the
        CPU middle step. ``colour_order`` and ``progress`` as in :meth:`remove` (BGR by default); the
        image-like intermediates come in the same order."""
        info = check_image(image, colour_order)
        frame = _Frame(image, colour_order)
        out = _Background(frame, info, self.strength)
        with self._lock:
            extras, scale, tiles = self._process(frame, out, intermediates=True, progress=progress)
        return _to_result(out.array, extras, colour_order, scale, tiles)


#: The options Remover.load takes besides the backend's (for the error that names a misspelt one).
REMOVER_OPTIONS = tuple(name for name, parameter in inspect.signature(Remover.__init__).parameters.items()
                        if name not in ("self", "manifest", "device", "precision")
                        and parameter.kind is not inspect.Parameter.VAR_KEYWORD)


def _to_result(background: np.ndarray, extras: Dict[str, Any], colour_order: str, scale: float,
               tiles: int) -> Result:
    def order(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if x is None:
            return None
        x = x.astype(np.float32)
        return np.ascontiguousarray(x[:, :, ::-1]) if colour_order.upper() == "BGR" else x

    return Result(
        background=background,
        reflection=order(extras.get("reflection")),
        stage1=order(extras.get("stage1")),
        confidence=extras.get("confidence"),
        mask_background=extras.get("mask_background"),
        mask_reflection=extras.get("mask_reflection"),
        gradient=extras.get("gradient"),
        thresholds=extras.get("thresholds") if tiles == 1 else None,
        scale=scale,
        tiles=tiles,
    )

"""The reflection-removal pipeline: one object for RM2S (two networks + middle step) and CRRN.

::

    from dereflect import Remover
    remover = Remover.from_dir("exports/rm2s-lite")          # ONNX Runtime on the CPU
    clean = remover.remove(frame, colour_order="BGR")         # uint8 in -> uint8 out

**Any size.** The exported graphs pad to their stride internally, so any H x W runs as is up
to ``max_side`` (default 1024, and never more than a TensorRT engine's profile allows).
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

**Threads.** A Remover may be shared between threads: inference is serialised by a lock,
so sharing is safe but gives no parallel speed-up. For parallel throughput create one
Remover per thread (each holds its own sessions / execution contexts).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from dereflect.backends.base import open_backend
from dereflect.errors import InputError
from dereflect.imageio import ImageInfo, from_float_rgb, to_float_rgb
from dereflect.manifest import Manifest, load_manifest
from dereflect.methods.base import NULL_TIMER, Layers, Timer, get_method
from dereflect.models import BUNDLED_MODELS

DEFAULT_MAX_SIDE = 1024
LARGE_IMAGE_STRATEGIES = ("guided", "tile")
TILE_OVERLAP = 64
GUIDED_RADIUS = 2
GUIDED_EPS = 1e-4


@dataclass
class Result:
    """A removal with its intermediates, all at the input's full resolution.

    ``background`` is what :meth:`Remover.remove` returns (the input's dtype, shape and colour
    order). Image-like intermediates are float32 HxWx3 in the caller's colour order:
    ``reflection`` (``I - B``, signed; CRRN: the network's reflection output) and ``stage1``
    (RM2S). ``confidence`` (float32 HxW), ``mask_background`` / ``mask_reflection`` (bool HxW)
    and ``thresholds`` (the 2-means centres ``(low, high)``) are RM2S's middle step;
    ``gradient`` (float32 HxW) is CRRN's. When the networks ran at reduced resolution
    (``scale < 1``) the intermediates are resized from that resolution; ``tiles`` > 1 means
    they were blended from tiles, each with its own thresholds (``thresholds`` is then None).
    """

    background: np.ndarray
    reflection: np.ndarray
    stage1: Optional[np.ndarray] = None
    confidence: Optional[np.ndarray] = None
    mask_background: Optional[np.ndarray] = None
    mask_reflection: Optional[np.ndarray] = None
    gradient: Optional[np.ndarray] = None
    thresholds: Optional[Tuple[float, float]] = None
    scale: float = 1.0
    tiles: int = 1


def _box(x: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    return cv2.boxFilter(x, -1, (size, size), normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_upsample(
    value: np.ndarray, guide_low: np.ndarray, guide_high: np.ndarray,
    radius: int = GUIDED_RADIUS, eps: float = GUIDED_EPS,
) -> np.ndarray:
    """Fast guided filter: ``value`` (h x w x C) brought to ``guide_high``'s size (H x W x C).

    Per channel, the local linear model ``value ~ a * guide + b`` is fitted on ``radius`` boxes
    at low resolution, its coefficients are smoothed and upsampled bilinearly, and applied
    to the full-resolution guide, so edges come from the guide rather than from interpolation.
    """
    value = np.asarray(value, dtype=np.float32)
    guide_low = np.asarray(guide_low, dtype=np.float32)
    guide_high = np.asarray(guide_high, dtype=np.float32)
    mean_i = _box(guide_low, radius)
    mean_p = _box(value, radius)
    cov = _box(guide_low * value, radius) - mean_i * mean_p
    var = _box(guide_low * guide_low, radius) - mean_i * mean_i
    a = cov / (var + np.float32(eps))
    b = mean_p - a * mean_i
    height, width = guide_high.shape[:2]
    a_high = cv2.resize(_box(a, radius), (width, height), interpolation=cv2.INTER_LINEAR)
    b_high = cv2.resize(_box(b, radius), (width, height), interpolation=cv2.INTER_LINEAR)
    return a_high * guide_high + b_high


def fit_size(height: int, width: int, max_hw: Tuple[int, int]) -> Tuple[int, int, float]:
    """The largest size with the same aspect that fits ``max_hw``; returns (h, w, scale)."""
    scale = min(max_hw[0] / height, max_hw[1] / width, 1.0)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


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


class Remover:
    """Removes reflections from images with a model (see the module docstring).

    Open one with :meth:`load` (a bundled model's name, an export directory or a training
    checkpoint; :func:`dereflect.models.open_model` is the same route). ``backend``:
    "onnxruntime" (default for exports), "tensorrt" or "torch" (default for checkpoints);
    ``device`` and ``precision`` are the backend's, and its own options (``threads`` for
    onnxruntime, ``checkpoint``/``use_cupy`` for torch, ``use_graph`` for TensorRT) are checked:
    an option the backend does not take raises InputError. ``max_side`` (None or 0: no limit)
    and ``large_image`` ("guided" or "tile") handle large images; ``threshold`` is the CPU middle
    step's 2-means ("exact" sort, or "histogram", the CUDA kernel's algorithm); ``c1``/``c2``
    default to the manifest's. With ``device_middle_step`` (default) a backend that can keep the
    frame on the GPU (TensorRT, torch on CUDA) does so for :meth:`remove`; that path uses the
    kernel's histogram 2-means.
    """

    def __init__(
        self,
        manifest: Manifest,
        backend: str = "onnxruntime",
        device: str = "auto",
        precision: str = "auto",
        max_side: Optional[int] = DEFAULT_MAX_SIDE,
        large_image: str = "guided",
        threshold: Optional[str] = None,
        c1: Optional[float] = None,
        c2: Optional[float] = None,
        device_middle_step: bool = True,
        **backend_options: Any,
    ) -> None:
        if large_image not in LARGE_IMAGE_STRATEGIES:
            raise InputError(
                f"large_image must be one of {', '.join(LARGE_IMAGE_STRATEGIES)}, not {large_image!r}"
            )
        if max_side is not None and (isinstance(max_side, bool) or int(max_side) < 0):
            raise InputError(f"max_side must be positive (or 0 / None for no limit), not {max_side}")
        self.manifest = manifest
        self.method = get_method(manifest.method)
        overrides = {k: v for k, v in (("c1", c1), ("c2", c2), ("threshold", threshold)) if v is not None}
        self.settings = self.method.settings(manifest.settings, **overrides)
        self.large_image = large_image
        self._lock = threading.Lock()
        self._backend = open_backend(manifest, self.method, backend, device=device, precision=precision,
                                     **backend_options)
        self.backend = self._backend.name
        self._host = self._backend.host_executor()
        self._device = self._backend.device_executor(self.settings) if device_middle_step else None
        self.min_hw, engine_max = self._backend.input_limits()
        limits = [hw for hw in (engine_max, (int(max_side), int(max_side)) if max_side else None) if hw]
        self.max_hw: Optional[Tuple[int, int]] = (
            (min(h for h, _ in limits), min(w for _, w in limits)) if limits else None)

    @classmethod
    def from_dir(cls, export_dir: Union[str, Path], **options: Any) -> Remover:
        """Load the export directory ``export_dir`` (its ``manifest.json`` and the files it names)."""
        return cls(load_manifest(export_dir), **options)

    @classmethod
    def default(cls, name: Optional[str] = None, **options: Any) -> Remover:
        """A model shipped with the package: ``name`` from :data:`BUNDLED_MODELS` (default: the first)."""
        from dereflect.models import bundled_model_dir

        return cls.load(bundled_model_dir(name or BUNDLED_MODELS[0]), **options)

    @classmethod
    def load(cls, model: Union[str, Path, None] = None, **options: Any) -> Remover:
        """A bundled model by name, an export directory, a training checkpoint, or (``None``) the default."""
        from dereflect.models import open_model

        return open_model(model, **options)

    @property
    def executor(self) -> Any:
        """The executor :meth:`remove` runs the method's sequence on (the device one when there is one)."""
        return self._device or self._host

    def close(self) -> None:
        """Free the networks (sessions, engines, device memory)."""
        closer = getattr(self._device, "close", None)
        if closer is not None:
            closer()
        self._backend.close()

    def __enter__(self) -> Remover:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Remover {self.manifest.name!r} ({self.method.name}) on {self.backend}>"

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

    def _guided(self, rgb: np.ndarray, size: Tuple[int, int], intermediates: bool, settings: Any = None) -> Layers:
        height, width = rgb.shape[:2]
        small = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        low = self.run_once(small, intermediates, settings=settings)
        residual = small - low.background
        reflection = guided_upsample(residual, small, rgb)
        background = np.clip(rgb - reflection, 0.0, 1.0)

        def up(x: Optional[np.ndarray], nearest: bool = False) -> Optional[np.ndarray]:
            if x is None:
                return None
            mode = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
            if x.dtype == bool:
                return cv2.resize(x.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
            return cv2.resize(x, (width, height), interpolation=mode)

        return Layers(
            background=background,
            reflection=up(low.reflection) if low.gradient is not None else rgb - background,
            stage1=up(low.stage1),
            confidence=up(low.confidence, nearest=True),
            mask_background=up(low.mask_background),
            mask_reflection=up(low.mask_reflection),
            gradient=up(low.gradient),
            thresholds=low.thresholds,
        )

    def _tiled(self, rgb: np.ndarray, intermediates: bool, settings: Any = None) -> Tuple[Layers, int]:
        height, width = rgb.shape[:2]
        tile_h, tile_w = min(self.max_hw[0], height), min(self.max_hw[1], width)
        overlap = min(TILE_OVERLAP, tile_h // 4, tile_w // 4)
        sums: Dict[str, np.ndarray] = {}
        weights = np.zeros((height, width, 1), np.float32)
        count = 0
        for top in tile_starts(height, tile_h, overlap):
            for left in tile_starts(width, tile_w, overlap):
                window = (slice(top, top + tile_h), slice(left, left + tile_w))
                layers = self.run_once(np.ascontiguousarray(rgb[window]), intermediates, settings=settings)
                weight = (_ramp(tile_h, overlap)[:, None] * _ramp(tile_w, overlap)[None, :])[:, :, None]
                weights[window] += weight
                count += 1
                for key in ("background", "reflection", "stage1", "confidence", "mask_background",
                            "mask_reflection", "gradient"):
                    value = getattr(layers, key)
                    if value is None:
                        continue
                    value = value.astype(np.float32)
                    if value.ndim == 2:
                        value = value[:, :, None]
                    if key not in sums:
                        sums[key] = np.zeros((height, width, value.shape[2]), np.float32)
                    sums[key][window] += value * weight
        blended = {key: total / weights for key, total in sums.items()}
        for key in ("confidence", "mask_background", "mask_reflection", "gradient"):
            if key in blended:
                blended[key] = blended[key][:, :, 0]
        for key in ("mask_background", "mask_reflection"):
            if key in blended:
                blended[key] = blended[key] > 0.5
        return Layers(**blended), count

    def _process(self, rgb: np.ndarray, intermediates: bool, settings: Any = None) -> Tuple[Layers, float, int]:
        height, width = rgb.shape[:2]
        if self.max_hw is None or (height <= self.max_hw[0] and width <= self.max_hw[1]):
            return self.run_once(rgb, intermediates, settings=settings), 1.0, 1
        if self.large_image == "tile":
            layers, count = self._tiled(rgb, intermediates, settings)
            return layers, 1.0, count
        small_h, small_w, scale = fit_size(height, width, self.max_hw)
        return self._guided(rgb, (small_h, small_w), intermediates, settings), scale, 1

    def process(self, rgb: np.ndarray, settings: Any = None) -> Layers:
        """The layers of one HxWx3 float32 RGB frame at full size (what :meth:`remove` returns, before
        the conversion back to the input's type), with ``settings`` replacing the method's for it."""
        with self._lock:
            layers, _, _ = self._process(rgb, intermediates=False, settings=settings)
        return layers

    # -- public API -----------------------------------------------------------------------

    def remove(self, image: np.ndarray, colour_order: str = "RGB") -> np.ndarray:
        """The background of ``image``, with the input's dtype, shape and colour order.

        ``image``: HxWx3 (or HxW grey, HxWx4 with alpha kept), uint8, uint16 or float in [0, 1];
        ``colour_order``: "RGB" or "BGR" (OpenCV frames). See :mod:`dereflect.imageio`.
        """
        rgb, info = to_float_rgb(image, colour_order)
        with self._lock:
            layers, _, _ = self._process(rgb, intermediates=False)
        return from_float_rgb(layers.background, info, colour_order)

    def remove_batch(
        self, images: Union[Sequence[np.ndarray], np.ndarray], colour_order: str = "RGB"
    ) -> Union[List[np.ndarray], np.ndarray]:
        """:meth:`remove` for each image (any mix of sizes); an NxHxWxC array gives an array back.

        Images run one at a time: exported graphs may fix the batch dimension to 1, and
        frames of different sizes cannot share a batch.
        """
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise InputError(f"a batch array must be NxHxWxC, got shape {images.shape}")
            return np.stack([self.remove(image, colour_order) for image in images])
        return [self.remove(image, colour_order) for image in images]

    def remove_with_intermediates(self, image: np.ndarray, colour_order: str = "RGB") -> Result:
        """:meth:`remove` plus the intermediates (see :class:`Result`); always the CPU middle step."""
        rgb, info = to_float_rgb(image, colour_order)
        with self._lock:
            layers, scale, tiles = self._process(rgb, intermediates=True)
        return _to_result(layers, info, colour_order, scale, tiles)


def _to_result(layers: Layers, info: ImageInfo, colour_order: str, scale: float, tiles: int) -> Result:
    def order(x: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if x is None:
            return None
        x = x.astype(np.float32)
        return np.ascontiguousarray(x[:, :, ::-1]) if colour_order.upper() == "BGR" else x

    return Result(
        background=from_float_rgb(layers.background, info, colour_order),
        reflection=order(layers.reflection),
        stage1=order(layers.stage1),
        confidence=layers.confidence,
        mask_background=layers.mask_background,
        mask_reflection=layers.mask_reflection,
        gradient=layers.gradient,
        thresholds=layers.thresholds if tiles == 1 else None,
        scale=scale,
        tiles=tiles,
    )

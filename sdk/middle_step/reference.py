"""The RM2S middle step, specified once in plain NumPy.

Between the two networks, RM2S turns the input ``I`` and the stage-1 estimate ``B1`` into
a 9-channel stage-2 input:

1. ``G_I = |Sobel(gray(I))|``, ``G_B = |Sobel(gray(B1))|``, ``G_R = |Sobel(gray(I) - gray(B1))|``
   (5x5 Sobel exactly as OpenCV ``ksize=5``, borders reflected as BORDER_REFLECT_101);
2. ``M = G_I > 1`` and the confidence ``C = log(G_R / (G_B + eps) + 1) * M``;
3. an exact 1-D 2-means of the non-zero values of ``C`` gives centres ``low < high``;
4. reflection edges ``C > high - c1 (high - low)``, background edges
   ``0 < C < low + c2 (high - low)``;
5. stage-2 input ``[I, I * mask_background, I * mask_reflection]``.

Everything else (the OpenCV CPU path, the torch training path, the CUDA kernel) is tested
against this module. It favours clarity over speed.

Degenerate maps: with no non-zero confidence both centres are 0; with a single distinct
non-zero value ``v`` both centres are ``v``. Both masks are then empty, never NaN.

Histogram precision contract (``two_means_threshold_histogram``, the algorithm of the CUDA
kernel and the fast CPU path): values ``v > 0`` fall in bin ``min(floor(v * (bins / max)), bins - 1)``
of ``bins`` equal bins over ``[0, max]`` (width ``w = max / bins``, float32 arithmetic as on
the GPU). The split is the exact 2-means optimum among the partitions that cut *between
bins*; the centres are the exact means of the values on each side (per-bin sums, not bin
centres). Hence the within-cluster sum of squares exceeds the exact optimum by at most
``2 w (high - low) n_b``, ``n_b`` the count of the bin holding the exact boundary; unless
another split scores within that margin of the optimum, the decision boundary
``(low + high) / 2`` lies within one bin width of the exact one (the tests check both on
random and image-derived maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
from dereflect.errors import InputError

#: The grey image the confidence map's gradients are taken of (the RM2S code's weights), here and
#: in the networks' own grey inputs. An output written back as a grey file uses BT.601 instead
#: (``imageio``), as OpenCV's own conversion does.
LUMA = (0.2125, 0.7154, 0.0721)
HISTOGRAM_BINS = 4096
GRADIENT_THRESHOLD = 1.0
# C is float32 throughout: in float16 1e-7 is a subnormal, G_B + eps rounds back to G_B for any
# G_B above about 2e-4, and G_R / eps overflows float16 (max 65504) where G_B is 0.
EPS = 1e-7


def validate_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` as float32 HxWx3 after checking shape and finiteness."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"{name} must be an HxWx3 RGB array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"{name} must have at least one pixel, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(
            f"{name} must be a float array in [0, 1], got dtype {arr.dtype}; convert with img / 255.0"
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or infinite values")
    return arr


def validate_pair(image: np.ndarray, stage1: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Validate the input image and the stage-1 output together (same HxWx3 shape)."""
    img = validate_image(image, "image")
    b1 = validate_image(stage1, "stage1")
    if img.shape != b1.shape:
        raise InputError(f"image {img.shape} and stage1 {b1.shape} must have the same shape")
    return img, b1


def gray(img: np.ndarray) -> np.ndarray:
    """Luma of a float32 HxWx3 RGB image, HxW float32."""
    img = np.asarray(img, dtype=np.float32)
    r, g, b = (np.float32(weight) for weight in LUMA)
    return (r * img[..., 0] + g * img[..., 1] + b * img[..., 2]).astype(np.float32)


def _shifted(padded: np.ndarray, axis: int, length: int) -> Tuple[np.ndarray, ...]:
    """The five views ``v0..v4`` of a 2-pixel padded array along ``axis`` (tap k at offset k - 2)."""
    index = [slice(None)] * padded.ndim
    views = []
    for k in range(5):
        index[axis] = slice(k, k + length)
        views.append(padded[tuple(index)])
    return tuple(views)


def _smooth5(v: Tuple[np.ndarray, ...]) -> np.ndarray:
    # OpenCV getDerivKernels(ksize=5) order 0, [1 4 6 4 1] as a correlation, summed
    # symmetrically as OpenCV's small symmetric filters do.
    return np.float32(6.0) * v[2] + np.float32(4.0) * (v[1] + v[3]) + (v[0] + v[4])


def _deriv5(v: Tuple[np.ndarray, ...]) -> np.ndarray:
    # Order 1, [-1 -2 0 2 1] as a correlation, summed as differences: exactly 0 on flat regions in every
    # implementation, which matters because G_B is divided by G_B + 1e-7.
    return np.float32(2.0) * (v[3] - v[1]) + (v[4] - v[0])


def sobel_xy(g: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(gx, gy)`` of ``cv2.Sobel(g, CV_32F, 1, 0, ksize=5)`` and ``(0, 1)``, reflect-101 borders.

    Separable like OpenCV: taps along rows (axis 1) first, then along columns. The CUDA kernel
    and the torch version use the same operations in the same order.
    """
    g = np.asarray(g, dtype=np.float32)
    h, w = g.shape
    # np.pad's "reflect" is BORDER_REFLECT_101 (edge not repeated), also for tiny sides.
    padded = np.pad(g, 2, mode="reflect")
    rows = _shifted(padded, axis=1, length=w)
    gx = _smooth5(_shifted(_deriv5(rows), axis=0, length=h))
    gy = _deriv5(_shifted(_smooth5(rows), axis=0, length=h))
    return gx.astype(np.float32), gy.astype(np.float32)


def sobel_magnitude(g: np.ndarray) -> np.ndarray:
    """Gradient magnitude ``sqrt(gx^2 + gy^2)`` of the 5x5 Sobel of an HxW image, float32."""
    gx, gy = sobel_xy(g)
    return np.sqrt(gx * gx + gy * gy).astype(np.float32)


def confidence_from_gradients(
    g_i: np.ndarray,
    g_b: np.ndarray,
    g_r: np.ndarray,
    gradient_threshold: float = GRADIENT_THRESHOLD,
    eps: float = EPS,
) -> Tuple[np.ndarray, np.ndarray]:
    """``(C, M)`` from the three gradient magnitudes (float32, see the module docstring)."""
    mask = g_i > np.float32(gradient_threshold)
    ratio = g_r / (g_b + np.float32(eps))
    conf = np.where(mask, np.log1p(ratio), np.float32(0.0)).astype(np.float32)
    return conf, mask


def confidence_map(
    image: np.ndarray,
    stage1: np.ndarray,
    gradient_threshold: float = GRADIENT_THRESHOLD,
    eps: float = EPS,
) -> Tuple[np.ndarray, np.ndarray]:
    """Confidence ``C`` (HxW float32) and gradient mask ``M`` (HxW bool) of RM2S."""
    img, b1 = validate_pair(image, stage1)
    gray_i = gray(img)
    gray_b = gray(b1)
    g_i = sobel_magnitude(gray_i)
    g_b = sobel_magnitude(gray_b)
    g_r = sobel_magnitude(gray_i - gray_b)
    return confidence_from_gradients(g_i, g_b, g_r, gradient_threshold, eps)


def _nonzero_values(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size and not np.all(np.isfinite(arr)):
        raise InputError("confidence values contain NaN or infinite values")
    flat = arr.reshape(-1)
    return flat[flat != 0].astype(np.float64)


def two_means_objective(values: np.ndarray, low: float, high: float) -> float:
    """Within-cluster sum of squares of the non-zero ``values`` assigned to the nearer centre."""
    v = _nonzero_values(values)
    return float(np.minimum((v - low) ** 2, (v - high) ** 2).sum())


def _best_split(counts_left: np.ndarray, sums_left: np.ndarray, count: float, total: float) -> int:
    """Index of the split maximising ``S_L^2/n_L + S_R^2/n_R`` (-1 when none has both sides)."""
    counts_right = count - counts_left
    valid = (counts_left > 0) & (counts_right > 0)
    if not np.any(valid):
        return -1
    sums_right = total - sums_left
    with np.errstate(divide="ignore", invalid="ignore"):
        # Minimising the within-cluster sum of squares = maximising this (sum of x^2 is fixed).
        score = sums_left**2 / counts_left + sums_right**2 / counts_right
    score = np.where(valid, score, -np.inf)
    return int(np.argmax(score))


def two_means_threshold(values: np.ndarray) -> Tuple[float, float]:
    """Exact, globally optimal 2-means centres ``(low, high)`` of the non-zero ``values``.

    In 1-D the optimal clusters are contiguous in sorted order, so every split between two
    distinct sorted values is scored from prefix sums; ties go to the lowest split.
    Degenerate inputs: no non-zero values gives ``(0.0, 0.0)``; a single distinct value ``v``
    gives ``(v, v)``.
    """
    v = np.sort(_nonzero_values(values))
    n = v.size
    if n == 0:
        return 0.0, 0.0
    prefix = np.cumsum(v)
    total = float(prefix[-1])
    # Candidate split after sorted index k (left = v[:k+1]) only between distinct values.
    distinct = v[:-1] < v[1:]
    counts_left = np.arange(1, n, dtype=np.float64)
    sums_left = np.where(distinct, prefix[:-1], 0.0)
    counts_left = np.where(distinct, counts_left, 0.0)
    k = _best_split(counts_left, sums_left, float(n), total)
    if k < 0:
        mean = total / n
        return mean, mean
    left_sum = float(prefix[k])
    return left_sum / (k + 1), (total - left_sum) / (n - k - 1)


def histogram_bin_index(values: np.ndarray, max_value: float, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Bin of each value over ``[0, max_value]``: ``min(floor(v * (bins / max)), bins - 1)`` in float32.

    float32 like the CUDA kernel, so both put every value in the same bin; clamped before the
    integer conversion, as there, so an infinite product (subnormal max) lands in the last bin.
    """
    with np.errstate(over="ignore"):
        scale = np.float32(bins) / np.float32(max_value)
        position = np.asarray(values, dtype=np.float32) * scale
    return np.clip(position, 0, bins - 1).astype(np.int64)


def two_means_threshold_histogram(
    values: np.ndarray, bins: int = HISTOGRAM_BINS, max_value: Optional[float] = None
) -> Tuple[float, float]:
    """2-means centres ``(low, high)`` of the non-zero ``values`` to bin precision.

    The split is restricted to bin edges of ``bins`` equal bins over ``[0, max_value]``
    (default: the largest value); centres are exact means from per-bin sums. See the
    module docstring for the precision contract. Degenerate inputs behave as in
    :func:`two_means_threshold`; values above ``max_value`` go to the last bin.
    """
    if int(bins) < 1:
        raise InputError(f"bins must be a positive integer, got {bins}")
    bins = int(bins)
    v = _nonzero_values(values)
    if v.size == 0:
        return 0.0, 0.0
    top = float(v.max()) if max_value is None else float(max_value)
    if not top > 0:
        raise InputError(f"max_value must be positive, got {max_value}")
    idx = histogram_bin_index(v, top, bins)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    sums = np.bincount(idx, weights=v, minlength=bins)
    count = float(counts.sum())
    total = float(sums.sum())
    # Split k (1 <= k < bins) puts bins [0, k) on the left.
    k = _best_split(np.cumsum(counts)[:-1], np.cumsum(sums)[:-1], count, total)
    if k < 0:
        mean = total / count
        return mean, mean
    left_count = float(counts[: k + 1].sum())
    left_sum = float(sums[: k + 1].sum())
    return left_sum / left_count, (total - left_sum) / (count - left_count)


def edge_thresholds(low: float, high: float, c1: float = 0.5, c2: float = 0.5) -> Tuple[float, float]:
    """``(background_upper, reflection_lower)``: ``low + c2 (high - low)`` and ``high - c1 (high - low)``."""
    spread = high - low
    return low + c2 * spread, high - c1 * spread


def edge_masks(
    confidence: np.ndarray, low: float, high: float, c1: float = 0.5, c2: float = 0.5
) -> Tuple[np.ndarray, np.ndarray]:
    """``(mask_background, mask_reflection)`` bool HxW from the confidence and 2-means centres."""
    conf = np.asarray(confidence, dtype=np.float32)
    background_upper, reflection_lower = edge_thresholds(low, high, c1, c2)
    # Thresholds are compared in float32, as every other implementation does.
    mask_reflection = conf > np.float32(reflection_lower)
    mask_background = (conf > 0) & (conf < np.float32(background_upper))
    return mask_background, mask_reflection


def stage2_input(image: np.ndarray, mask_background: np.ndarray, mask_reflection: np.ndarray) -> np.ndarray:
    """HxWx9 float32 ``[I, I * mask_background, I * mask_reflection]``."""
    img = np.asarray(image, dtype=np.float32)
    mb = np.asarray(mask_background, dtype=np.float32)[..., None]
    mr = np.asarray(mask_reflection, dtype=np.float32)[..., None]
    if mb.shape[:2] != img.shape[:2] or mr.shape[:2] != img.shape[:2]:
        raise InputError(f"masks {mb.shape[:2]}, {mr.shape[:2]} must match the image {img.shape[:2]}")
    return np.concatenate([img, img * mb, img * mr], axis=2)


@dataclass
class MiddleStepResult:
    """Everything the middle step computes for one HxWx3 image."""

    confidence: np.ndarray
    gradient_mask: np.ndarray
    low: float
    high: float
    mask_background: np.ndarray
    mask_reflection: np.ndarray
    stage2_input: np.ndarray


def middle_step_from_confidence(
    image: np.ndarray,
    confidence: np.ndarray,
    gradient_mask: np.ndarray,
    c1: float,
    c2: float,
    threshold: str,
    build_stage2: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] = stage2_input,
    smooth_centres: Optional[Callable[[float, float], Tuple[float, float]]] = None,
) -> MiddleStepResult:
    """Steps 3-5 (threshold, masks, stage-2 input) shared by the reference and the CPU path.

    ``smooth_centres`` (video): maps this frame's 2-means centres to the ones the masks use, e.g.
    carried across frames (:class:`dereflect.temporal.CentreFilter`).
    """
    if threshold == "exact":
        low, high = two_means_threshold(confidence)
    elif threshold == "histogram":
        low, high = two_means_threshold_histogram(confidence)
    else:
        raise InputError(f"threshold must be 'exact' or 'histogram', got {threshold!r}")
    if smooth_centres is not None:
        low, high = smooth_centres(low, high)
    mask_background, mask_reflection = edge_masks(confidence, low, high, c1, c2)
    return MiddleStepResult(
        confidence=confidence,
        gradient_mask=gradient_mask,
        low=low,
        high=high,
        mask_background=mask_background,
        mask_reflection=mask_reflection,
        stage2_input=build_stage2(image, mask_background, mask_reflection),
    )


def middle_step_reference(
    image: np.ndarray, stage1: np.ndarray, c1: float = 0.5, c2: float = 0.5
) -> MiddleStepResult:
    """The whole middle step for one HxWx3 image with the exact 2-means threshold."""
    img, b1 = validate_pair(image, stage1)
    conf, mask = confidence_map(img, b1)
    return middle_step_from_confidence(img, conf, mask, c1, c2, "exact")

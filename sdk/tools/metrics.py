"""Image quality metrics in NumPy: PSNR, SSIM, SI and their regional variants.

SSIM follows the definition of ``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``: local means and
(population) variances come from an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma),
the image borders are extended by symmetric reflection (``dcba|abcd``), C1 = (0.01 L)^2 and
C2 = (0.03 L)^2 with L the data range, and the global score is the mean of the SSIM map with a
5-pixel border cropped away, averaged over channels.

SI (structure index, CRRN) is the structure-only part of SSIM:
``SI = (2 sigma_xy + c) / (sigma_x^2 + sigma_y^2 + c)`` with c = C2, on the same window.

The regional variants (SSIMr / SIr) average the full-size map over the pixels of a mask; the
map there is not cropped, so masks may touch the border.

``reflection_mask`` marks where a pair's input carries its reflection (the region of SSIMr / SIr
for ``dereflect eval --masks auto``, and of the training loss's reflection emphasis).

Images are HxW or HxWxC arrays; channels are scored separately and averaged. Arrays are
converted to float64, so ``data_range`` must match the values (1.0 for images in [0, 1],
255 for uint8 images).
"""

from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np
from dereflect.errors import InputError

SIGMA = 1.5
TRUNCATE = 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # 5, as scipy.ndimage computes it: an 11x11 window
WINDOW = 2 * RADIUS + 1
K1 = 0.01
K2 = 0.03


def gaussian_kernel_1d(sigma: float = SIGMA, radius: int = RADIUS) -> np.ndarray:
    """The normalised 1-D Gaussian taps (length 2 radius + 1) that scipy.ndimage uses."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _check_pair(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise InputError(f"expected an HxW or HxWxC image, got shape {a.shape}")
    if min(a.shape[:2]) < WINDOW:
        raise InputError(f"images must be at least {WINDOW}x{WINDOW} pixels for SSIM/SI, got {a.shape[:2]}")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
        b = b[:, :, None]
    return a, b


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of an HxWxN float64 array; borders ``dcba|abcd`` (scipy's 'reflect')."""
    k = gaussian_kernel_1d()
    out = cv2.sepFilter2D(x, cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT)
    return out.reshape(x.shape)  # OpenCV drops a trailing axis of length 1


def _moments(a: np.ndarray, b: np.ndarray):
    """Local means and (population) variances/covariance of two HxWxC float64 images."""
    c = a.shape[2]
    # One filter call over all 5 C planes (OpenCV handles up to 512 channels).
    blurred = _blur(np.concatenate([a, b, a * a, b * b, a * b], axis=2))
    ux, uy, uxx, uyy, uxy = (blurred[:, :, i * c : (i + 1) * c] for i in range(5))
    return ux, uy, uxx - ux * ux, uyy - uy * uy, uxy - ux * uy


def _ssim_full(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    ux, uy, vx, vy, vxy = _moments(a, b)
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _si_full(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    _, _, vx, vy, vxy = _moments(a, b)
    c2 = (K2 * data_range) ** 2
    return (2 * vxy + c2) / (vx + vy + c2)


def _cropped_mean(m: np.ndarray) -> float:
    return float(m[RADIUS:-RADIUS, RADIUS:-RADIUS].mean(dtype=np.float64))


def _region_mean(m: np.ndarray, mask: np.ndarray) -> float:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.shape != m.shape[:2]:
        raise InputError(f"mask shape {mask.shape} does not match the image size {m.shape[:2]}")
    sel = mask.astype(bool)
    if not sel.any():
        raise InputError("the region mask is empty: no pixel to score")
    return float(m.mean(axis=2)[sel].mean(dtype=np.float64))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Full-size SSIM map (HxW, averaged over channels), borders reflected."""
    a, b = _check_pair(a, b)
    return _ssim_full(a, b, data_range).mean(axis=2)


def si_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Full-size SI map (HxW, averaged over channels), borders reflected."""
    a, b = _check_pair(a, b)
    return _si_full(a, b, data_range).mean(axis=2)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM, equal to skimage's ``structural_similarity`` with Gaussian weights (see module doc)."""
    a, b = _check_pair(a, b)
    return _cropped_mean(_ssim_full(a, b, data_range))


def si(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structure index (CRRN's SI), border cropped as for :func:`ssim`."""
    a, b = _check_pair(a, b)
    return _cropped_mean(_si_full(a, b, data_range))


def ssim_region(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """SSIMr: mean of the SSIM map over the pixels where ``mask`` (HxW) is true."""
    a, b = _check_pair(a, b)
    return _region_mean(_ssim_full(a, b, data_range), mask)


def si_region(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """SIr: mean of the SI map over the pixels where ``mask`` (HxW) is true."""
    a, b = _check_pair(a, b)
    return _region_mean(_si_full(a, b, data_range), mask)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"images must have the same shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


#: The range a fitted channel gain is held to (a photo darker or brighter than its clean layer by more
#: than a factor of two is not a colour change).
CHANNEL_GAIN_RANGE = (0.5, 2.0)


def best_channel_gains(output: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The three factors g (RGB) minimising sum over pixels of (g * output - target)^2, each held to
    :data:`CHANNEL_GAIN_RANGE`: how far an image is from its target in global colour and brightness
    alone. ``output`` and ``target``: HxWx3 in [0, 1]."""
    output, target = np.asarray(output), np.asarray(target)
    if output.shape != target.shape or output.ndim != 3 or output.shape[2] != 3:
        raise InputError(f"two HxWx3 images of one size needed, got {output.shape} and {target.shape}")
    flat_o, flat_t = output.reshape(-1, 3).astype(np.float64), target.reshape(-1, 3).astype(np.float64)
    gains = (flat_o * flat_t).sum(0) / np.maximum((flat_o * flat_o).sum(0), 1e-6)
    return np.clip(gains, *CHANNEL_GAIN_RANGE).astype(np.float32)


#: reflection_mask's settings: how much brighter (mean over channels, on [0, 1]) the input must be,
#: the blur that tolerates real pairs' misalignment (sigma, px) and the opening that drops specks (px).
AUTO_MASK_LEVEL, AUTO_MASK_BLUR, AUTO_MASK_OPEN = 12 / 255, 3.0, 5


def reflection_mask(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Where a pair's input carries its reflection: bool HxW, True where the input is brighter than
    the ground truth by more than 12/255 (mean over channels, after a Gaussian blur of sigma 3 px,
    which tolerates the slight misalignment of real pairs), specks smaller than 5x5 px removed.

    Reflected light adds, so the reflection is where the photo is brighter than its clean layer;
    a colour cast over the whole frame (real captures have one) marks the whole frame.
    """
    difference = cv2.GaussianBlur((image - target).mean(axis=2), (0, 0), AUTO_MASK_BLUR)
    mask = (difference > AUTO_MASK_LEVEL).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((AUTO_MASK_OPEN, AUTO_MASK_OPEN), np.uint8)) > 0

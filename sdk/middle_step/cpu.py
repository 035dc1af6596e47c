"""Fast CPU middle step for the runtime: OpenCV Sobel plus vectorised NumPy.

Same definition as :mod:`dereflect.middle_step.reference` (the reference it is tested against); only
the grey conversion and the 5x5 Sobel go through OpenCV, whose rounding differs from the
reference's by about 1e-7 relative. C is ill-conditioned where the stage-1 output is flat
to float32 rounding (G_B around 1e-6, close to the 1e-7 epsilon): there C can differ from the
reference by O(1), though such pixels sit high in the reflection cluster either way. The
CUDA kernel and the torch version follow the reference's arithmetic and agree there too.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import cv2
import numpy as np
from dereflect.middle_step.reference import (
    EPS,
    GRADIENT_THRESHOLD,
    LUMA,
    MiddleStepResult,
    confidence_from_gradients,
    middle_step_from_confidence,
    validate_pair,
)

# cv2.transform takes one row per output channel; the weights multiply R, G, B in order.
_LUMA_ROW = np.array([LUMA], dtype=np.float32)


def _gray_cv(img: np.ndarray) -> np.ndarray:
    return cv2.transform(img, _LUMA_ROW)


def _sobel_magnitude_cv(g: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=5, borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=5, borderType=cv2.BORDER_REFLECT_101)
    return cv2.magnitude(gx, gy)


def _stage2_input_cv(img: np.ndarray, mask_background: np.ndarray, mask_reflection: np.ndarray) -> np.ndarray:
    # cv2.merge writes the interleaved 9 channels in one pass, about twice NumPy's speed.
    weight_b = mask_background.astype(np.float32)
    weight_r = mask_reflection.astype(np.float32)
    return cv2.merge(
        [img, cv2.multiply(img, cv2.merge([weight_b] * 3)), cv2.multiply(img, cv2.merge([weight_r] * 3))]
    ).reshape(img.shape[:2] + (9,))


def middle_step_cpu(
    image: np.ndarray,
    stage1: np.ndarray,
    c1: float = 0.5,
    c2: float = 0.5,
    threshold: str = "exact",
    gradient_threshold: float = GRADIENT_THRESHOLD,
    eps: float = EPS,
    smooth_centres: Optional[Callable[[float, float], Tuple[float, float]]] = None,
) -> MiddleStepResult:
    """Middle step for one HxWx3 float32 RGB image in [0, 1] and its stage-1 output.

    ``threshold="exact"`` sorts the edge values (exact 2-means); ``"histogram"`` uses the
    4096-bin algorithm of the CUDA kernel (bin precision, no sort). ``gradient_threshold`` and
    ``eps`` are the manifest's (the reference's constants by default); ``smooth_centres`` see
    :func:`~dereflect.middle_step.reference.middle_step_from_confidence`.
    """
    img, b1 = validate_pair(image, stage1)
    img = np.ascontiguousarray(img)
    gray_i = _gray_cv(img)
    gray_b = _gray_cv(np.ascontiguousarray(b1))
    g_i = _sobel_magnitude_cv(gray_i)
    g_b = _sobel_magnitude_cv(gray_b)
    g_r = _sobel_magnitude_cv(cv2.subtract(gray_i, gray_b))
    conf, mask = confidence_from_gradients(g_i, g_b, g_r, gradient_threshold, eps)
    return middle_step_from_confidence(img, conf, mask, c1, c2, threshold, _stage2_input_cv, smooth_centres)

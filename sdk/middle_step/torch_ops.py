"""Batched torch version of the RM2S middle step, for stage-2 training.

Same definition as the NumPy reference :mod:`dereflect.middle_step.reference` (tested against it), on
N x 3 x H x W tensors in [0, 1]. Masks carry no gradient. Computed in float32 with autocast
off: the 1e-7 epsilon underflows in float16.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from dereflect.errors import InputError
from dereflect.middle_step.reference import EPS, GRADIENT_THRESHOLD, LUMA


def _check_nchw(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[1] != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(f"{name} must be an N x 3 x H x W tensor, got {shape}")
    if tensor.shape[2] < 3 or tensor.shape[3] < 3:
        raise InputError(
            f"{name} must be at least 3x3 pixels (reflect padding, 5x5 Sobel), got {tuple(tensor.shape)}"
        )


def gray_torch(image: torch.Tensor) -> torch.Tensor:
    """Luma N x 1 x H x W (float32) of an N x 3 x H x W RGB tensor."""
    image = image.float()
    return LUMA[0] * image[:, 0:1] + LUMA[1] * image[:, 1:2] + LUMA[2] * image[:, 2:3]


def _shifted(padded: torch.Tensor, dim: int, length: int) -> Tuple[torch.Tensor, ...]:
    return tuple(padded.narrow(dim, k, length) for k in range(5))


def _smooth5(v: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    return 6.0 * v[2] + 4.0 * (v[1] + v[3]) + (v[0] + v[4])


def _deriv5(v: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    # Differences, so flat regions give exactly 0 (G_B is divided by G_B + 1e-7).
    return 2.0 * (v[3] - v[1]) + (v[4] - v[0])


def sobel_magnitude_torch(gray: torch.Tensor) -> torch.Tensor:
    """5x5 Sobel magnitude (OpenCV ksize=5, BORDER_REFLECT_101) of N x C x H x W, per channel.

    Separable, rows first, with the reference's operations in its order, so it matches
    :func:`dereflect.middle_step.reference.sobel_magnitude` to rounding (bit for bit on CPU).
    """
    h, w = gray.shape[2:]
    # F.pad's "reflect" does not repeat the edge pixel: OpenCV's BORDER_REFLECT_101.
    padded = F.pad(gray.float(), (2, 2, 2, 2), mode="reflect")
    rows = _shifted(padded, 3, w)
    gx = _smooth5(_shifted(_deriv5(rows), 2, h))
    gy = _deriv5(_shifted(_smooth5(rows), 2, h))
    return torch.sqrt(gx * gx + gy * gy)


def confidence_map_torch(
    image: torch.Tensor,
    stage1: torch.Tensor,
    gradient_threshold: float = GRADIENT_THRESHOLD,
    eps: float = EPS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Confidence ``C`` (N x 1 x H x W float32) and gradient mask ``M`` (bool) for a batch."""
    _check_nchw(image, "image")
    _check_nchw(stage1, "stage1")
    if image.shape != stage1.shape:
        raise InputError(f"image {tuple(image.shape)} and stage1 {tuple(stage1.shape)} differ in shape")
    with torch.autocast(device_type=image.device.type, enabled=False):
        gray_i = gray_torch(image)
        gray_b = gray_torch(stage1)
        grads = sobel_magnitude_torch(torch.cat([gray_i, gray_b, gray_i - gray_b], dim=1))
        g_i, g_b, g_r = grads[:, 0:1], grads[:, 1:2], grads[:, 2:3]
        mask = g_i > gradient_threshold
        conf = torch.where(mask, torch.log1p(g_r / (g_b + eps)), torch.zeros_like(g_i))
    return conf, mask


def two_means_threshold_torch(confidence: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact 2-means centres ``(low, high)`` (float64, shape N) of each image's non-zero values.

    Same definition and degenerate cases as :func:`dereflect.middle_step.reference.two_means_threshold`,
    vectorised over the batch: sort, prefix sums, best split between distinct values.
    """
    flat = confidence.detach().reshape(confidence.shape[0], -1).float()
    batch, size = flat.shape
    nonzero = flat != 0
    count = nonzero.sum(dim=1)
    # Zeros sort last as +inf, so each row starts with its count[i] non-zero values.
    ordered = torch.sort(torch.where(nonzero, flat, torch.full_like(flat, float("inf"))), dim=1).values
    position = torch.arange(size, device=flat.device)
    inside = position[None] < count[:, None]
    values = torch.where(inside, ordered.double(), torch.zeros_like(ordered, dtype=torch.float64))
    prefix = torch.cumsum(values, dim=1)
    total = prefix[:, -1]
    count64 = count.double()
    mean = torch.where(count > 0, total / count64.clamp(min=1), torch.zeros_like(total))
    if size < 2:
        return mean, mean.clone()
    left_count = (position[:-1] + 1).double()[None].expand(batch, -1)
    right_count = count64[:, None] - left_count
    left_sum = prefix[:, :-1]
    valid = (ordered[:, :-1] < ordered[:, 1:]) & (right_count > 0)
    score = left_sum**2 / left_count + (total[:, None] - left_sum) ** 2 / right_count.clamp(min=1)
    score = torch.where(valid, score, torch.full_like(score, -float("inf")))
    best = torch.argmax(score, dim=1, keepdim=True)
    best_count = torch.gather(left_count, 1, best)[:, 0]
    best_sum = torch.gather(left_sum, 1, best)[:, 0]
    has_split = valid.any(dim=1)
    low = torch.where(has_split, best_sum / best_count, mean)
    high = torch.where(has_split, (total - best_sum) / (count64 - best_count).clamp(min=1), mean)
    return low, high


def edge_masks_torch(
    confidence: torch.Tensor, low: torch.Tensor, high: torch.Tensor, c1: float = 0.5, c2: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mask_background, mask_reflection)`` bool, shaped like ``confidence`` (N x ...)."""
    shape = (-1,) + (1,) * (confidence.dim() - 1)
    spread = high - low
    # Thresholds computed in float64, compared in float32 like the reference.
    background_upper = (low + c2 * spread).float().reshape(shape)
    reflection_lower = (high - c1 * spread).float().reshape(shape)
    conf = confidence.detach().float()
    return (conf > 0) & (conf < background_upper), conf > reflection_lower


def stage2_input_from_masks(
    image: torch.Tensor, mask_background: torch.Tensor, mask_reflection: torch.Tensor
) -> torch.Tensor:
    """N x 9 x H x W ``[I, I * mask_background, I * mask_reflection]``; masks N x 1 x H x W or N x H x W."""
    _check_nchw(image, "image")
    masks = []
    for mask in (mask_background, mask_reflection):
        mask = mask.detach()
        if mask.dim() == 3:
            mask = mask[:, None]
        if mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
            raise InputError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}")
        masks.append(mask.to(image.dtype))
    return torch.cat([image, image * masks[0], image * masks[1]], dim=1)


def stage2_input_torch(
    image: torch.Tensor,
    stage1: torch.Tensor,
    c1: float = 0.5,
    c2: float = 0.5,
    gradient_threshold: float = GRADIENT_THRESHOLD,
    eps: float = EPS,
) -> torch.Tensor:
    """The middle step at inference: N x 9 x H x W stage-2 input from ``I`` and the stage-1 output."""
    with torch.no_grad():
        conf, _ = confidence_map_torch(image.detach(), stage1.detach(), gradient_threshold, eps)
        low, high = two_means_threshold_torch(conf)
        mask_background, mask_reflection = edge_masks_torch(conf, low, high, c1, c2)
    return stage2_input_from_masks(image, mask_background, mask_reflection)


def ground_truth_masks_torch(
    image: torch.Tensor, background: torch.Tensor, reflection: torch.Tensor, threshold: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The authors' training masks (N x 1 x H x W bool) from the ground-truth layers.

    Edges are pixels with ``|Sobel(gray(I))| > threshold``; each goes to the background mask
    where ``|Sobel(gray(B))| > |Sobel(gray(R))|`` and to the reflection mask where the
    reverse holds. Ties (both layers flat there) go to neither.
    """
    for name, tensor in (("image", image), ("background", background), ("reflection", reflection)):
        _check_nchw(tensor, name)
        if tensor.shape != image.shape:
            raise InputError(f"{name} {tuple(tensor.shape)} must have the image's shape {tuple(image.shape)}")
    with torch.no_grad(), torch.autocast(device_type=image.device.type, enabled=False):
        grays = [gray_torch(image), gray_torch(background), gray_torch(reflection)]
        grads = sobel_magnitude_torch(torch.cat(grays, dim=1))
        edges = grads[:, 0:1] > threshold
        g_b, g_r = grads[:, 1:2], grads[:, 2:3]
        return edges & (g_b > g_r), edges & (g_r > g_b)

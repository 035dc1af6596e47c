"""Flicker: how much a model's output changes between frames where its input did not.

A generated sequence: a static background with a reflection patch that slides across it and
breathes a little in strength, blended as glass does (screen blend), without sensor noise (which
would pass through any model and hide what the model adds). Where a pixel of the input is the
same in two consecutive frames, a steady model gives the same output there; flicker is the mean
absolute frame-to-frame change of the output over those pixels (largest channel), in 8-bit grey
levels, averaged over the sequence. It comes from the frame's global statistics (RM2S's 2-means
centres, a model's overall colour and brightness) and from the networks' reach: they see the whole
frame, so the moving patch changes their output where the input stayed put. ``dereflect eval MODEL
--flicker`` reports it with and without temporal smoothing (:mod:`dereflect.temporal`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
from dereflect.temporal import VideoSession
from dereflect.tools.bench import synthetic_frame

#: Input pixels that move by less than this (in [0, 1]) count as unchanged.
STATIC = 0.5 / 255.0


def flicker_sequence(frames: int = 24, height: int = 192, width: int = 256, seed: int = 0) -> List[np.ndarray]:
    """HxWx3 float32 RGB frames: one background, a blurred reflection patch moving 3 px per frame."""
    background = synthetic_frame(height, width, seed=seed)
    scene = cv2.GaussianBlur(synthetic_frame(height, width * 2, seed=seed + 1), (0, 0), 2.5)
    rng = np.random.default_rng(seed)
    patch_h, patch_w = height // 2, width // 3
    top = height // 4
    out = []
    for t in range(frames):
        left = 10 + 3 * t
        reflection = np.zeros_like(background)
        reflection[top:top + patch_h, left:left + patch_w] = scene[top:top + patch_h, left:left + patch_w]
        strength = np.float32(0.45 + 0.05 * np.sin(t / 3.0) + rng.normal(0.0, 0.01))
        r = strength * reflection
        out.append(np.clip(background + r - background * r, 0.0, 1.0).astype(np.float32))
    return out


def flicker(outputs: List[np.ndarray], inputs: List[np.ndarray]) -> float:
    """Mean |out_t - out_{t-1}| (8-bit levels) over the pixels where the input did not change."""
    changes = []
    for t in range(1, len(inputs)):
        static = np.abs(inputs[t] - inputs[t - 1]).max(axis=2) < STATIC
        if static.any():
            diff = np.abs(outputs[t].astype(np.float32) - outputs[t - 1].astype(np.float32)).max(axis=2)
            changes.append(float(diff[static].mean()) * 255.0)
    return float(np.mean(changes)) if changes else 0.0


def measure_flicker(remover: Any, frames: int = 24, size: Tuple[int, int] = (192, 256)) -> Dict[str, float]:
    """Flicker of ``remover`` on :func:`flicker_sequence`, per frame on its own and with temporal smoothing,
    and what smoothing costs: ``deviation``, the mean |smoothed - per-frame output| over every pixel of
    every frame but the first (8-bit levels), which lag or trails behind the moving patch would raise."""
    inputs = flicker_sequence(frames, *size)
    result, outputs = {}, {}
    for label, temporal in (("per_frame", False), ("temporal", True)):
        session = VideoSession(remover, temporal=temporal)
        outputs[label] = [session.remove(frame, colour_order="RGB") for frame in inputs]
        result[label] = flicker(outputs[label], inputs)
    result["deviation"] = float(np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in
                                         zip(outputs["temporal"][1:], outputs["per_frame"][1:])])) * 255.0
    return result

"""Temporal stability for video: carry a frame's global statistics to the next, so a static scene
does not flicker.

Two statistics of a frame are global and change from frame to frame even when the scene does not:
RM2S's 2-means centres (the middle step splits every edge of the frame by them) and the output's
overall colour (a model predicting a per-image gain, or removing a veil, scales the whole frame).
:class:`VideoSession` smooths both with an exponential moving average: the centres through
:class:`CentreFilter` inside the CPU middle step, the colour by rescaling each output to the
smoothed ratio of output to input means (:class:`ColourFilter`). A jump larger than
``reset_ratio`` (a scene cut, a camera pan onto a new scene) resets the average instead of
smearing it across the cut. ``temporal=False`` gives per-frame behaviour.

    session = VideoSession(remover)              # one per video stream
    for frame in frames:
        clean = session.remove(frame)             # BGR uint8 in, BGR uint8 out
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import cv2
import numpy as np
from dereflect.errors import InputError
from dereflect.imageio import from_float_rgb, to_float_rgb

#: Weight of the new frame in the moving averages: at 30 fps the state follows a lasting change
#: within about half a second and damps frame-to-frame noise about five times.
DEFAULT_ALPHA = 0.2
#: A statistic that moves by more than this factor between frames starts a new average.
RESET_RATIO = 1.5


class _Average:
    """An exponential moving average of a positive vector that restarts on a jump (a scene cut)."""

    def __init__(self, alpha: float, reset_ratio: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise InputError(f"alpha must be in (0, 1], got {alpha}")
        if not reset_ratio > 1.0:
            raise InputError(f"reset_ratio must be > 1, got {reset_ratio}")
        self.alpha = float(alpha)
        self.reset_ratio = float(reset_ratio)
        self.value: Optional[np.ndarray] = None

    def update(self, current: np.ndarray) -> np.ndarray:
        current = np.asarray(current, np.float64)
        if self.value is None or not np.all(np.isfinite(current)) or np.any(current <= 0):
            if np.all(np.isfinite(current)) and np.all(current > 0):
                self.value = current
            return current
        ratio = np.maximum(current / self.value, self.value / current)
        if np.any(ratio > self.reset_ratio):
            self.value = current
        else:
            self.value = self.alpha * current + (1.0 - self.alpha) * self.value
        return self.value

    def reset(self) -> None:
        self.value = None


class CentreFilter:
    """The middle step's 2-means centres (low, high), averaged over the frames of a stream."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, reset_ratio: float = RESET_RATIO) -> None:
        self._average = _Average(alpha, reset_ratio)

    def __call__(self, low: float, high: float) -> Tuple[float, float]:
        smoothed = self._average.update(np.array([low, high]))
        return float(smoothed[0]), float(smoothed[1])

    def reset(self) -> None:
        self._average.reset()


class ColourFilter:
    """Rescales each output so its per-channel ratio to the input follows the stream's average."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, reset_ratio: float = RESET_RATIO) -> None:
        self._average = _Average(alpha, reset_ratio)

    def __call__(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        # cv2.mean sums in double, in a fraction of a millisecond (NumPy's mean over a 720p frame: 20 ms)
        mean_in, mean_out = (np.array(cv2.mean(np.ascontiguousarray(x, np.float32))[:3]) for x in (image, background))
        if np.any(mean_in <= 1e-4) or np.any(mean_out <= 1e-4):
            return background  # a black frame has no colour ratio to carry
        ratio = mean_out / mean_in
        smoothed = self._average.update(ratio)
        return np.clip(background * (smoothed / ratio).astype(np.float32), 0.0, 1.0)

    def reset(self) -> None:
        self._average.reset()


class VideoSession:
    """One video stream through a :class:`~dereflect.remover.Remover`, with temporal smoothing.

    ``temporal=False`` runs every frame on its own (as ``Remover.remove``). With smoothing the RM2S
    middle step runs on the CPU (the fused GPU kernel computes each frame's centres by itself).
    Sessions may share one Remover (one per stream, the networks loaded once); they then share its
    :attr:`strength` too: for a strength per stream, give each stream its own Remover.
    """

    def __init__(self, remover: Any, temporal: bool = True, alpha: float = DEFAULT_ALPHA,
                 reset_ratio: float = RESET_RATIO) -> None:
        if not (hasattr(remover, "process") and hasattr(remover, "settings")):
            raise InputError(f"VideoSession takes a Remover (for example Remover.load('crrn-lite')), "
                             f"not {type(remover).__name__}")
        if getattr(remover, "closed", False):
            raise InputError(f"{remover!r} is closed; open the model again (Remover.load) for a new session")
        if not isinstance(temporal, (bool, np.bool_)):
            # A string such as "off" (the CLI's spelling) would be true.
            raise InputError(f"temporal must be True or False, not {temporal!r}")
        self.remover = remover
        self.temporal = bool(temporal)
        self.colour = ColourFilter(alpha, reset_ratio) if self.temporal else None
        self.settings = remover.settings
        if self.temporal and dataclasses.is_dataclass(remover.settings) and hasattr(remover.settings,
                                                                                    "centre_filter"):
            self.settings = dataclasses.replace(remover.settings, centre_filter=CentreFilter(alpha, reset_ratio))

    @property
    def strength(self) -> Any:
        """The remover's strength (see :attr:`dereflect.remover.Remover.strength`; None for a remover
        without one); set here, it applies from the next frame."""
        return getattr(self.remover, "strength", None)

    @strength.setter
    def strength(self, value: Any) -> None:
        self.remover.strength = value

    def remove(self, frame: np.ndarray, colour_order: str = "BGR") -> np.ndarray:
        """The background of ``frame`` (the input's dtype, shape and colour order; OpenCV's BGR by default)."""
        rgb, info = to_float_rgb(frame, colour_order)
        background = self.remover.process(rgb, settings=self.settings).background
        if self.colour is not None:
            background = self.colour(rgb, background)
        return from_float_rgb(background, info, colour_order)

    def reset(self) -> None:
        """Forget the state (call at a known scene cut or when the stream restarts)."""
        for item in (self.colour, getattr(self.settings, "centre_filter", None)):
            if item is not None:
                item.reset()

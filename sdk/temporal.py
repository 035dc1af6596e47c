"""Temporal stability for video: carry what a model changes in a frame to the next, so a static
scene does not flicker.

A model's output moves from frame to frame even where the scene does not, for two reasons. Global
statistics: RM2S's 2-means centres (the middle step splits every edge of the frame by them) and the
output's overall colour (a model predicting a per-image gain, or removing a veil, scales the whole
frame). And local reactions: a network sees the whole frame, so a reflection sliding across one part,
or the sensor's and the codec's noise, changes its output elsewhere too. :class:`VideoSession`
smooths all three with exponential moving averages: the centres through :class:`CentreFilter` inside
the CPU middle step, the colour by rescaling each output to the smoothed ratio of output to input
means (:class:`ColourFilter`), and, per pixel where the input stayed put, the change the model makes
(:class:`ChangeFilter`: the output is the frame plus the averaged change, so the frame's own detail
and motion pass through at once). A jump larger than ``reset_ratio`` in a global statistic (a scene
cut, a camera pan onto a new scene), or a pixel whose input moved, restarts the average there instead
of smearing it. ``temporal=False`` gives per-frame behaviour.

    session = VideoSession(remover)              # one per video stream
    for frame in frames:
        clean = session.remove(frame)             # BGR uint8 in, BGR uint8 out
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

import cv2
import numpy as np
from dereflect.errors import InputError
from dereflect.imageio import from_float_rgb, to_float_rgb

#: Weight of the new frame in the moving averages: at 30 fps the state follows a lasting change
#: within about half a second and damps frame-to-frame noise about five times.
DEFAULT_ALPHA = 0.2
#: A statistic that moves by more than this factor between frames starts a new average.
RESET_RATIO = 1.5
#: A pixel whose grey level moved by more than this (in [0, 1], averaged over its 5x5 neighbourhood)
#: since the last frame has moved: 6 levels of 255, above the mean frame-to-frame change that sensor
#: and codec noise of a few levels leave, below what an edge or texture passing by does.
MOTION_THRESHOLD = 6.0 / 255.0


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
    """Rescales each output so its per-channel ratio to the input follows the stream's average
    (``background``, float32, is rescaled in place and returned)."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, reset_ratio: float = RESET_RATIO) -> None:
        self._average = _Average(alpha, reset_ratio)

    def __call__(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        # cv2.mean sums in double, in a fraction of a millisecond (NumPy's mean over a 720p frame: 20 ms)
        mean_in, mean_out = (np.array(cv2.mean(np.ascontiguousarray(x, np.float32))[:3]) for x in (image, background))
        if np.any(mean_in <= 1e-4) or np.any(mean_out <= 1e-4):
            return background  # a black frame has no colour ratio to carry
        ratio = mean_out / mean_in
        smoothed = self._average.update(ratio)
        # In place: a fresh frame-sized array costs more than the arithmetic at 4K (see ChangeFilter).
        out = np.multiply(background, (smoothed / ratio).astype(np.float32), out=background)
        return np.clip(out, 0.0, 1.0, out=out)

    def reset(self) -> None:
        self._average.reset()


class ChangeFilter:
    """Averages the model's change (output - input) over frames, per pixel, where the input stayed put.

    The output is the frame plus the averaged change: where the frame moved (its grey level, averaged
    over 5x5 pixels, changed by more than ``motion_threshold``), the frame's own change, at once.
    ``background`` is overwritten with the result, and every step runs in OpenCV into buffers kept from
    frame to frame: at 4K a fresh frame-sized array costs more (the pages' first touch) than the
    arithmetic (about 60 ms a 4K frame, 8 a 720p one, on the 2-core development VM).
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, motion_threshold: float = MOTION_THRESHOLD) -> None:
        if not 0.0 < alpha <= 1.0:
            raise InputError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 <= motion_threshold < 1.0:
            raise InputError(f"motion_threshold must be in [0, 1), got {motion_threshold}")
        self.alpha = float(alpha)
        self.motion_threshold = float(motion_threshold)
        self.reset()

    def __call__(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(image, np.float32)
        change = np.ascontiguousarray(background, np.float32)
        cv2.subtract(change, image, dst=change)
        if self._change is None or self._change.shape != change.shape:
            self._change = change.copy()
            self._grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            self._spare = [np.empty_like(self._grey) for _ in range(2)]
            self._moved = np.empty(self._grey.shape, np.uint8)
            self._still = np.empty_like(self._moved)
            return cv2.add(image, change, dst=change)
        grey, motion = self._spare
        cv2.cvtColor(image, cv2.COLOR_RGB2GRAY, dst=grey)
        cv2.absdiff(grey, self._grey, dst=motion)
        cv2.blur(motion, (5, 5), dst=motion)
        cv2.compare(motion, self.motion_threshold, cv2.CMP_GT, dst=self._moved)
        cv2.bitwise_not(self._moved, dst=self._still)
        cv2.accumulateWeighted(change, self._change, self.alpha, mask=self._still)
        cv2.copyTo(change, self._moved, self._change)
        self._spare[0], self._grey = self._grey, grey
        out = cv2.add(image, self._change, dst=change)
        return np.clip(out, 0.0, 1.0, out=out)

    def reset(self) -> None:
        self._change: Optional[np.ndarray] = None
        self._grey: Optional[np.ndarray] = None
        self._spare: List[np.ndarray] = []
        self._moved: Optional[np.ndarray] = None
        self._still: Optional[np.ndarray] = None


class VideoSession:
    """One video stream through a :class:`~dereflect.remover.Remover`, with temporal smoothing.

    ``temporal=False`` runs every frame on its own (as ``Remover.remove``). With smoothing the RM2S
    middle step runs on the CPU (the fused GPU kernel computes each frame's centres by itself).
    Sessions may share one Remover (one per stream, the networks loaded once); they then share its
    :attr:`strength` too: for a strength per stream, give each stream its own Remover.
    """

    def __init__(self, remover: Any, temporal: bool = True, alpha: float = DEFAULT_ALPHA,
                 reset_ratio: float = RESET_RATIO, motion_threshold: float = MOTION_THRESHOLD) -> None:
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
        self.change = ChangeFilter(alpha, motion_threshold) if self.temporal else None
        self._state: Optional[Tuple[Tuple[int, ...], Any]] = None
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
        if self.temporal:
            # A new frame size is a new stream, and a new strength a new change to follow: both start
            # afresh, so that a slider takes effect at the next frame rather than over the average's span.
            state = (rgb.shape, self.strength)
            if state != self._state:
                self.reset()
            self._state = state
        background = self.remover.process(rgb, settings=self.settings).background
        if self.colour is not None and self.change is not None:
            background = self.change(rgb, self.colour(rgb, background))
        return from_float_rgb(background, info, colour_order)

    def __repr__(self) -> str:
        return f"VideoSession({self.remover!r}, temporal={self.temporal})"

    def reset(self) -> None:
        """Forget the state (call at a known scene cut or when the stream restarts)."""
        for item in (self.colour, self.change, getattr(self.settings, "centre_filter", None)):
            if hasattr(item, "reset"):  # the centre filter may be any callable
                item.reset()

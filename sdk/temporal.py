"""Temporal stability for video: carry what a model changes in a frame to the next, so a static
scene does not flicker.

A model's output moves from frame to frame even where the scene does not, for two reasons. Global
statistics: RM2S's 2-means centres (the middle step splits every edge of the frame by them) and the
output's overall colour (a model predicting a per-image gain, or removing a veil, scales the whole
frame). And local reactions: a network sees the whole frame, so a reflection sliding across one part,
or the sensor's and the codec's noise, changes its output elsewhere too. :class:`VideoSession`
smooths all three with exponential moving averages: the centres through :class:`CentreFilter` inside
the CPU middle step; per pixel where the input stayed put, the change the model makes
(:class:`ChangeFilter`: the output is the frame plus the averaged change, so the frame's own detail
and motion pass through at once); then the colour, by rescaling each output to the smoothed ratio of
output to input means (:class:`ColourFilter`). Averages restart instead of smearing: a global
statistic that jumps by more than ``reset_ratio``; a pixel whose input moved, or whose change jumped
by more than the model's flicker (an object's halo passing, a pan too slow to count as motion); the
colour when most of the frame moved (a scene cut, a flash). What is left is the model's flicker, the
smoothed output stays within a few levels of the per-frame one (``dereflect eval --flicker`` reports
both). ``temporal=False`` gives per-frame behaviour.

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
#: A pixel whose grey level moved by more than this (in [0, 1]; the frame-to-frame difference averaged
#: over its 5x5 neighbourhood before its magnitude is taken, so that sensor and codec noise, which
#: changes sign from pixel to pixel, averages out: 8 levels of noise flag under 1 % of a still frame)
#: since the last frame has moved: 6 levels of 255, below what an edge or texture passing by does.
MOTION_THRESHOLD = 6.0 / 255.0
#: A pixel whose change differs from its average by more than this (mean over channels, in [0, 1]) takes the
#: frame's own change at once: the model's flicker is a few levels, while a moving object's halo, a scene
#: cut, a flash or a pan too slow to count as motion change it by tens, which averaging would smear into
#: trails.
JUMP_THRESHOLD = 6.0 / 255.0


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
        background = np.ascontiguousarray(background, np.float32)
        # cv2.mean sums in double, in a fraction of a millisecond (NumPy's mean over a 720p frame: 20 ms)
        mean_in, mean_out = (np.array(cv2.mean(np.ascontiguousarray(x, np.float32))[:3]) for x in (image, background))
        if np.any(mean_in <= 1e-4) or np.any(mean_out <= 1e-4):
            return background  # a black frame has no colour ratio to carry
        ratio = mean_out / mean_in
        smoothed = self._average.update(ratio)
        # In place, in OpenCV: NumPy's broadcast of three factors took 5.6 ms a 720p frame, cv2.multiply 0.2.
        factors = smoothed / ratio
        out = cv2.multiply(background, (float(factors[0]), float(factors[1]), float(factors[2]), 0.0), dst=background)
        return np.clip(out, 0.0, 1.0, out=out)

    def reset(self) -> None:
        self._average.reset()


#: When more than this fraction of a frame moved (a scene cut, a flash, a very fast pan), the colour
#: average restarts: a cut to a scene whose colour ratio differs by less than ``reset_ratio`` would
#: otherwise carry the old ratio over (tens of levels on bright pixels for a few frames). Measured at
#: 480x360: cuts between 20 random pairs of the training photos moved 90-99 % of the frame, pans of
#: 0.5-8 px a frame 5-44 %, noise of up to 12 levels under 8 %.
CUT_FRACTION = 0.75
_CHANNEL_MEAN = np.full((1, 3), 1.0 / 3.0, np.float32)


class ChangeFilter:
    """Averages the model's change (output - input) over frames, per pixel, where the input stayed put.

    The output is the frame plus the averaged change. A pixel takes the frame's own change at once
    where the frame moved there (its grey-level difference from the last frame, averaged over 5x5
    pixels, is beyond ``motion_threshold``: see :data:`MOTION_THRESHOLD`) or where that change is more
    than ``jump_threshold`` from the average (mean over the channels: see :data:`JUMP_THRESHOLD`), so
    what is smoothed is the model's flicker: one channel may still differ from the per-frame output by
    up to three times ``jump_threshold`` (about 12 levels measured, README). :attr:`moved_fraction`
    says how much of the last frame moved. ``background`` is overwritten with the result, and every
    step runs in OpenCV into buffers kept from frame to frame: at 4K a fresh frame-sized array costs
    more (the pages' first touch) than the arithmetic.
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, motion_threshold: float = MOTION_THRESHOLD,
                 jump_threshold: float = JUMP_THRESHOLD) -> None:
        if not 0.0 < alpha <= 1.0:
            raise InputError(f"alpha must be in (0, 1], got {alpha}")
        for name, value in (("motion_threshold", motion_threshold), ("jump_threshold", jump_threshold)):
            if not 0.0 <= value < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {value}")
        self.alpha = float(alpha)
        self.motion_threshold = float(motion_threshold)
        self.jump_threshold = float(jump_threshold)
        self.reset()

    def __call__(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(image, np.float32)
        change = np.ascontiguousarray(background, np.float32)
        cv2.subtract(change, image, dst=change)
        if self._change is None or self._change.shape != change.shape:
            self._change = change.copy()
            self._grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            self._spare = [np.empty_like(self._grey) for _ in range(2)]
            self._jump = np.empty_like(change)
            self._follow = np.empty(self._grey.shape, np.uint8)
            self._mask = np.empty_like(self._follow)
            self.moved_fraction = 1.0
            return cv2.add(image, change, dst=change)
        grey, motion = self._spare
        cv2.cvtColor(image, cv2.COLOR_RGB2GRAY, dst=grey)
        cv2.subtract(grey, self._grey, dst=motion)
        cv2.blur(motion, (5, 5), dst=motion)
        cv2.absdiff(motion, 0.0, dst=motion)
        cv2.compare(motion, self.motion_threshold, cv2.CMP_GT, dst=self._follow)
        self.moved_fraction = cv2.countNonZero(self._follow) / self._follow.size
        # Where the change jumped, follow it too: its mean difference from the average over the channels
        # (cv2.transform: a 720p frame in 0.3 ms, where NumPy's largest channel took 35).
        cv2.absdiff(change, self._change, dst=self._jump)
        cv2.transform(self._jump, _CHANNEL_MEAN, dst=motion)  # motion is used: its buffer takes the mean
        cv2.compare(motion, self.jump_threshold, cv2.CMP_GT, dst=self._mask)
        cv2.bitwise_or(self._follow, self._mask, dst=self._follow)
        cv2.bitwise_not(self._follow, dst=self._mask)
        cv2.accumulateWeighted(change, self._change, self.alpha, mask=self._mask)
        cv2.copyTo(change, self._follow, self._change)
        self._spare[0], self._grey = self._grey, grey
        out = cv2.add(image, self._change, dst=change)
        return np.clip(out, 0.0, 1.0, out=out)

    def rescale(self, factor: float) -> None:
        """Scale the averaged change (a new ``strength``: the model's change is scaled by it)."""
        if self._change is not None:
            self._change *= np.float32(factor)

    def reset(self) -> None:
        #: the fraction of the last frame's pixels that moved (see :data:`MOTION_THRESHOLD`); 1 for a first frame
        self.moved_fraction = 1.0
        self._change: Optional[np.ndarray] = None
        self._grey: Optional[np.ndarray] = None
        self._spare: List[np.ndarray] = []
        self._jump: Optional[np.ndarray] = None
        self._follow: Optional[np.ndarray] = None
        self._mask: Optional[np.ndarray] = None


class VideoSession:
    """One video stream through a :class:`~dereflect.remover.Remover`, with temporal smoothing.

    ``temporal=False`` runs every frame on its own (as ``Remover.remove``). With smoothing the RM2S
    middle step runs on the CPU (the fused GPU kernel computes each frame's centres by itself).
    Sessions may share one Remover (one per stream, the networks loaded once); they then share its
    :attr:`strength` too: for a strength per stream, give each stream its own Remover.
    """

    def __init__(self, remover: Any, temporal: bool = True, alpha: float = DEFAULT_ALPHA,
                 reset_ratio: float = RESET_RATIO, motion_threshold: float = MOTION_THRESHOLD) -> None:
        if not (hasattr(remover, "background_of") and hasattr(remover, "settings")):
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
        self._shape: Optional[Tuple[int, ...]] = None
        self._strength: Any = None
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
            self._follow_stream(np.shape(frame), self.strength)
        background = self.remover.background_of(rgb, settings=self.settings)
        if self.change is not None and self.colour is not None:  # both or neither: temporal
            background = self.change(rgb, background)
            if self.change.moved_fraction > CUT_FRACTION:
                self.colour.reset()  # a cut or a flash: the colour ratio of the frame before says nothing
            background = self.colour(rgb, background)
        return from_float_rgb(background, info, colour_order)

    def _follow_stream(self, shape: Tuple[int, ...], strength: Any) -> None:
        # Another frame size or channel count is another stream: every average starts afresh. A new
        # strength scales the model's change: the averaged change is scaled with it (a slider dragged
        # frame by frame keeps its smoothing) and the colour ratio, which it moves too, starts afresh.
        if shape != self._shape:
            self.reset()
        elif strength != self._strength and self.change is not None and self.colour is not None:
            if self._strength:
                self.change.rescale(strength / self._strength)
            else:
                self.change.reset()
            self.colour.reset()
        self._shape, self._strength = shape, strength

    def __repr__(self) -> str:
        return f"VideoSession({self.remover!r}, temporal={self.temporal})"

    def reset(self) -> None:
        """Forget the state (call at a known scene cut or when the stream restarts)."""
        for item in (self.colour, self.change, getattr(self.settings, "centre_filter", None)):
            if hasattr(item, "reset"):  # the centre filter may be any callable
                item.reset()

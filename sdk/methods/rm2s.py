"""RM2S: stage-1 network -> middle step (confidence map, 2-means edge masks) -> stage-2 network.

Also :class:`RM2SStage1`, stage 1 alone, which ``dereflect eval`` runs on stage-1 training
checkpoints (it is not exported: RM2S deploys both stages).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np
from dereflect.errors import InputError, ModelError
from dereflect.methods.base import (
    NULL_TIMER,
    Executor,
    Layers,
    Method,
    MiddleStepOutput,
    NetworkContract,
    TensorContract,
    Timer,
)
from dereflect.middle_step.reference import EPS, GRADIENT_THRESHOLD

#: How the CPU middle step finds the 2-means threshold: by sorting (exact) or over a histogram (the
#: CUDA kernel's way, which the CPU can follow for comparisons).
THRESHOLDS = ("exact", "histogram")

_IMAGE = TensorContract("image", 3)
_BACKGROUND = TensorContract("background", 3)
STAGE1 = NetworkContract("stage1", ("stage1",), _IMAGE, (_BACKGROUND,))
STAGE2 = NetworkContract("stage2", ("stage2", "generator"), TensorContract("stage2_input", 9), (_BACKGROUND,))


@dataclass(frozen=True)
class MiddleStepSettings:
    """The middle step's constants (the manifest's ``middle_step``) and the runtime's 2-means choice.

    ``c1``/``c2``: where the reflection/background thresholds sit between the two 2-means centres;
    ``gradient_threshold``: G_I above which a pixel is an edge; ``epsilon``: added to G_B before
    dividing; ``threshold``: ``exact`` (sort, the CPU path) or ``histogram`` (the CUDA kernel's).
    """

    c1: float = 0.5
    c2: float = 0.5
    gradient_threshold: float = GRADIENT_THRESHOLD
    epsilon: float = EPS
    threshold: str = "exact"
    #: video: carries the 2-means centres across frames (a :class:`dereflect.temporal.CentreFilter`)
    centre_filter: Optional[Any] = None

    def to_manifest(self) -> Dict[str, float]:
        return {"c1": self.c1, "c2": self.c2, "gradient_threshold": self.gradient_threshold, "epsilon": self.epsilon}


def _number(section: Mapping[str, Any], key: str, default: float, low: float, high: float, prefix: str,
            error: type = ModelError) -> float:
    """``section[key]`` checked to be a finite number in [low, high]: ModelError for a manifest's value,
    ``error=InputError`` for a caller's (NumPy scalars count as numbers)."""
    value = section.get(key, default)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise error(f"{prefix}{key} must be a finite number, got {value!r}")
    if not low <= float(value) <= high:
        raise error(f"{prefix}{key} must lie in [{low:g}, {high:g}], got {float(value):g}")
    return float(value)


class RM2S(Method):
    name = "rm2s"
    networks = (STAGE1, STAGE2)
    stages = ("upload", "stage1", "middle", "stage2", "download")
    settings_key = "middle_step"
    checkpoint_kinds = ("rm2s-stage2",)

    def settings(self, raw: Optional[Mapping[str, Any]] = None, c1: Optional[float] = None,
                 c2: Optional[float] = None, threshold: Optional[str] = None) -> MiddleStepSettings:
        section = raw or {}
        where = "manifest middle_step"
        if not isinstance(section, Mapping):
            raise ModelError(f"{where} must be an object, got {type(section).__name__}")
        unknown = sorted(set(section) - {"c1", "c2", "gradient_threshold", "epsilon"})
        if unknown:
            raise ModelError(f"{where}: unknown key(s) {unknown}")
        values = {
            "c1": _number(section, "c1", 0.5, 0.0, 1.0, f"{where}: "),
            "c2": _number(section, "c2", 0.5, 0.0, 1.0, f"{where}: "),
            "gradient_threshold": _number(section, "gradient_threshold", GRADIENT_THRESHOLD, 0.0, 1e6, f"{where}: "),
            "epsilon": _number(section, "epsilon", EPS, 1e-30, 1.0, f"{where}: "),
        }
        for key, value in (("c1", c1), ("c2", c2)):
            if value is not None:
                values[key] = _number({key: value}, key, 0.5, 0.0, 1.0, "", InputError)
        chosen = threshold or MiddleStepSettings.threshold
        if chosen not in THRESHOLDS:
            raise InputError(f"threshold must be one of {', '.join(THRESHOLDS)}, not {chosen!r}")
        return MiddleStepSettings(threshold=chosen, **values)

    def settings_from_checkpoint(self, metadata: Mapping[str, Any]) -> Dict[str, float]:
        """The c1/c2 stage 2 was trained with (stage-2 training records them under ``stage2``)."""
        trained = metadata.get("stage2") or {}
        section = {key: float(trained[key]) for key in ("c1", "c2") if key in trained}
        return self.settings(section).to_manifest()

    def run(self, executor: Executor, image: np.ndarray, settings: MiddleStepSettings,
            timer: Timer = NULL_TIMER, intermediates: bool = False) -> Layers:
        with timer.stage("upload"):
            x = executor.upload(image)
        with timer.stage("stage1"):
            stage1 = executor.clip(executor.network(STAGE1.name, x)[STAGE1.outputs[0].name])
        with timer.stage("middle"):
            middle = executor.middle_step(x, stage1, settings, intermediates)
        with timer.stage("stage2"):
            out = executor.network(STAGE2.name, middle.stage2_input)[STAGE2.outputs[0].name]
        with timer.stage("download"):
            stage1_host = executor.download(stage1) if intermediates else None
            return self.layers(image, executor.download(out), stage1_host, middle)

    @staticmethod
    def layers(image: np.ndarray, output: np.ndarray, stage1: Optional[np.ndarray] = None,
               middle: Optional[MiddleStepOutput] = None) -> Layers:
        """The result of a frame from stage 2's output on the host (HxWx3): the background clipped to
        [0, 1], the reflection I - B, and the intermediates the sequence kept. Also what an executor
        that replays the sequence without running :meth:`run` (a CUDA graph) returns."""
        background = np.clip(output, 0.0, 1.0)
        layers = Layers(background=background, reflection=image - background, stage1=stage1)
        if middle is not None:
            layers.confidence, layers.thresholds = middle.confidence, middle.thresholds
            layers.mask_background, layers.mask_reflection = middle.mask_background, middle.mask_reflection
        return layers


class RM2SStage1(Method):
    """RM2S stage 1 alone: its estimate is the result (for scoring stage-1 checkpoints)."""

    name = "rm2s-stage1"
    networks = (STAGE1,)
    stages = ("upload", "stage1", "download")
    checkpoint_kinds = ("rm2s-stage1",)
    exportable = False

    def run(self, executor: Executor, image: np.ndarray, settings: Any = None, timer: Timer = NULL_TIMER,
            intermediates: bool = False) -> Layers:
        with timer.stage("upload"):
            x = executor.upload(image)
        with timer.stage("stage1"):
            out = executor.network(STAGE1.name, x)[STAGE1.outputs[0].name]
        with timer.stage("download"):
            background = np.clip(executor.download(out), 0.0, 1.0)
        return Layers(background=background, reflection=image - background,
                      stage1=background if intermediates else None)

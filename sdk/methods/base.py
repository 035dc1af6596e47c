"""What every method module provides, and the executor interface its sequence runs on.

A *method* (``rm2s``, ``crrn``, ``rm2s-stage1``) owns its deployment contract: the networks it
runs with their tensor names and channels, where each lives in a training checkpoint, the
settings it reads from a manifest or a checkpoint, and the one :meth:`Method.run` of its
sequence. ``Remover``, ``bench``, ``eval``, ``export`` and every backend call that ``run``.

An *executor* is what a backend lends the sequence: ``upload`` a frame, run a ``network``,
the RM2S ``middle_step``, ``clip`` and ``download``. The host executor works on NumPy arrays
(ONNX Runtime, TensorRT engines one at a time, torch on the CPU); device executors keep the
frame on a GPU between the networks (torch on CUDA; TensorRT's single stream). The sequence is
written once, here in the method modules; backends supply only the primitives.

A *timer* wraps each stage: ``with timer.stage("stage1"): ...``. The default does nothing;
``dereflect bench`` passes one that measures.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
from dereflect.errors import InputError, ModelError


@dataclass(frozen=True)
class TensorContract:
    """One input or output of a network: its name, channels and nominal value range."""

    name: str
    channels: int
    value_range: Tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class NetworkContract:
    """One network of a method: its name in a manifest, its names in a checkpoint, its tensors."""

    name: str
    checkpoint_names: Tuple[str, ...]
    input: TensorContract
    outputs: Tuple[TensorContract, ...]


@dataclass
class Layers:
    """Float32 HxWx3 RGB results of one pass at the processing resolution (see ``remover.Result``)."""

    background: np.ndarray
    reflection: np.ndarray
    stage1: Optional[np.ndarray] = None
    confidence: Optional[np.ndarray] = None
    mask_background: Optional[np.ndarray] = None
    mask_reflection: Optional[np.ndarray] = None
    gradient: Optional[np.ndarray] = None
    thresholds: Optional[Tuple[float, float]] = None


@dataclass
class MiddleStepOutput:
    """What an executor's middle step returns: the stage-2 input in the executor's array type and,
    when asked for, the host intermediates."""

    stage2_input: Any
    confidence: Optional[np.ndarray] = None
    mask_background: Optional[np.ndarray] = None
    mask_reflection: Optional[np.ndarray] = None
    thresholds: Optional[Tuple[float, float]] = None


class Timer:
    """Times named stages: ``with timer.stage("stage1"): ...``, then ``read()``. This one times nothing."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def begin(self, name: str) -> None:
        """Mark the start of stage ``name``."""

    def end(self, name: str) -> None:
        """Mark the end of stage ``name``."""

    def read(self) -> Dict[str, float]:
        """Milliseconds per stage plus ``total`` (first begin to last end); may wait for the device."""
        return {}


NULL_TIMER = Timer()


class MonotonicTimer(Timer):
    """Host monotonic clock; ``sync`` (e.g. ``torch.cuda.synchronize``) is called at each boundary."""

    def __init__(self, sync: Optional[Callable[[], Any]] = None) -> None:
        self._sync = sync
        self._marks: Dict[str, List[float]] = {}

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def begin(self, name: str) -> None:
        self._marks[name] = [self._now(), math.nan]

    def end(self, name: str) -> None:
        self._marks[name][1] = self._now()

    def read(self) -> Dict[str, float]:
        times = {name: (end - start) * 1e3 for name, (start, end) in self._marks.items()}
        starts, ends = zip(*self._marks.values())
        times["total"] = (max(ends) - min(starts)) * 1e3
        return times


class EventTimer(Timer):
    """CUDA events recorded on the stream the work runs on: device time, no synchronisation between stages.

    A stage of host work (between two events on an idle stream) is timed as the host time between them.
    Subclasses say how to record an event and read the time between two.
    """

    def __init__(self) -> None:
        self._events: Dict[str, List[Any]] = {}

    def _record(self) -> Any:
        """A new event, recorded now on the stream."""
        raise NotImplementedError

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events (both complete)."""
        raise NotImplementedError

    def begin(self, name: str) -> None:
        self._events[name] = [self._record(), None]

    def end(self, name: str) -> None:
        self._events[name][1] = self._record()

    def read(self) -> Dict[str, float]:
        pairs = list(self._events.values())
        pairs[-1][1].synchronize()
        times = {name: float(self._elapsed_ms(start, end)) for name, (start, end) in self._events.items()}
        times["total"] = float(self._elapsed_ms(pairs[0][0], pairs[-1][1]))
        return times


class CudaEventTimer(EventTimer):
    """CUDA events recorded on torch's current stream."""

    def __init__(self, torch: Any) -> None:
        super().__init__()
        self._torch = torch

    def _record(self) -> Any:
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end)


class Executor:
    """The primitives a method's sequence runs on (see the module docstring)."""

    def upload(self, image: np.ndarray) -> Any:
        """An HxWx3 float32 RGB frame -> the executor's N x 3 x H x W array."""
        raise NotImplementedError

    def network(self, name: str, x: Any) -> Dict[str, Any]:
        """Run network ``name`` on its one input; returns output name -> array."""
        raise NotImplementedError

    def clip(self, x: Any) -> Any:
        """``x`` clamped to [0, 1]."""
        raise NotImplementedError

    def middle_step(self, image: Any, stage1: Any, settings: Any, intermediates: bool) -> MiddleStepOutput:
        """RM2S's middle step on the executor's arrays."""
        raise NotImplementedError

    def download(self, x: Any) -> np.ndarray:
        """The executor's N x C x H x W array -> a host HxWxC float32 array of its first image."""
        raise NotImplementedError

    def run(self, method: Method, image: np.ndarray, settings: Any, timer: Timer = NULL_TIMER,
            intermediates: bool = False) -> Layers:
        """``method``'s sequence on this executor (a backend may wrap it, e.g. in a CUDA graph)."""
        return method.run(self, image, settings, timer, intermediates)

    def timer(self) -> Timer:
        """A measuring timer that suits where this executor's work runs (for ``dereflect bench``).

        The host clock by default: the host executor's calls return finished host arrays.
        """
        return MonotonicTimer()


class Method:
    """A reflection-removal method: networks, settings and the sequence (see the module docstring)."""

    name: str = ""
    #: its networks, in the order the sequence runs them
    networks: Tuple[NetworkContract, ...] = ()
    #: the stages its ``run`` reports to the timer, in order
    stages: Tuple[str, ...] = ()
    #: the manifest key of its settings (None: it has none)
    settings_key: Optional[str] = None
    #: the checkpoint kinds it is built from
    checkpoint_kinds: Tuple[str, ...] = ()
    #: whether ``dereflect export onnx`` writes it as a deployable export directory
    exportable: bool = True

    def network(self, name: str) -> NetworkContract:
        for contract in self.networks:
            if contract.name == name:
                return contract
        raise ModelError(f"method {self.name} has no network {name!r} (it has {self.network_names})")

    @property
    def network_names(self) -> Tuple[str, ...]:
        return tuple(c.name for c in self.networks)

    def settings(self, raw: Optional[Mapping[str, Any]] = None, **overrides: Any) -> Any:
        """The method's settings from a manifest section ``raw`` (validated) and user overrides."""
        if raw:
            raise ModelError(f"method {self.name} takes no settings section, the manifest has {sorted(raw)}")
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise InputError(f"{', '.join(given)}: settings of RM2S's middle step; the {self.name} model has none")
        return None

    def settings_from_checkpoint(self, metadata: Mapping[str, Any]) -> Dict[str, Any]:
        """The manifest section a checkpoint's training implies (what export writes)."""
        return {}

    def checkpoint_network(self, contract: NetworkContract, available: Any) -> str:
        """The checkpoint's name for ``contract`` among ``available`` names."""
        for candidate in contract.checkpoint_names:
            if candidate in available:
                return candidate
        raise ModelError(f"a {self.name} checkpoint needs network {contract.name!r} (stored as "
                         f"{' or '.join(contract.checkpoint_names)}); it has {sorted(available)}")

    def run(self, executor: Executor, image: np.ndarray, settings: Any, timer: Timer = NULL_TIMER,
            intermediates: bool = False) -> Layers:
        """One HxWx3 float32 RGB frame through the method's sequence."""
        raise NotImplementedError


#: method name -> "module:class"; adding a method means adding its module and one line here.
METHODS = {
    "rm2s": "dereflect.methods.rm2s:RM2S",
    "rm2s-stage1": "dereflect.methods.rm2s:RM2SStage1",
    "crrn": "dereflect.methods.crrn:CRRN",
}
_LOADED: Dict[str, Method] = {}


def get_method(name: Any) -> Method:
    """The method called ``name``; ModelError naming the known ones otherwise."""
    key = str(name)
    if key not in METHODS:
        raise ModelError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    if key not in _LOADED:
        module, attribute = METHODS[key].split(":")
        _LOADED[key] = getattr(importlib.import_module(module), attribute)()
    return _LOADED[key]


def method_for_checkpoint(metadata: Mapping[str, Any]) -> Method:
    """The method that runs a training checkpoint: by its ``kind``, else (checkpoints written by
    hand or by other tools) the method of its family whose networks it holds, the fullest first."""
    kind = metadata.get("kind")
    for name in METHODS:
        if kind in get_method(name).checkpoint_kinds:
            return get_method(name)
    family = str(metadata.get("method", ""))
    have = set(metadata.get("networks") or {})
    candidates = [get_method(n) for n in METHODS if n.split("-")[0] == family]
    complete = [m for m in candidates
                if all(any(c in have for c in contract.checkpoint_names) for contract in m.networks)]
    if complete:
        return max(complete, key=lambda m: len(m.networks))
    raise ModelError(f"no method runs this checkpoint (method {family!r}, kind {kind!r}, networks {sorted(have)}); "
                     f"known: {', '.join(METHODS)}")

"""The runner interface, the backend interface, their typed options, and the host executor.

A :class:`Runner` runs one network (Polygraphy's shape): ``activate()`` loads it,
``infer(feeds)`` maps input names to NCHW arrays and returns output names to NCHW arrays,
``deactivate()`` frees it. Runners are context managers.

A :class:`Backend` opens every network of a model on one runtime and lends the method's
sequence its executors (:mod:`dereflect.methods.base`): the :class:`HostExecutor` over its
runners always, and a device executor where it can keep the frame on a GPU. Each backend
declares its options as a dataclass; an option it does not know raises
:class:`~dereflect.errors.InputError` naming the ones it takes. Backend modules import their
heavy dependencies (onnxruntime, tensorrt, pycuda, torch) only when a backend is opened, so
``import dereflect`` stays light and a missing one fails with the install line that fixes it.
Adding a backend means one module with one :class:`Backend` subclass and a line in
:data:`BACKENDS`, which also names the extra that installs its runtime.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from types import ModuleType
from typing import Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import numpy as np
from dereflect.errors import InputError, ModelError, require
from dereflect.manifest import Manifest
from dereflect.methods.base import Executor, Method, MiddleStepOutput


class RegisteredBackend(NamedTuple):
    """Where a backend's class is, and the extra (:func:`dereflect.errors.install_line`) its runtime comes with."""

    location: str
    extra: str


#: backend name -> its class ("module:class") and extra
BACKENDS = {
    "onnxruntime": RegisteredBackend("dereflect.backends.onnxruntime:OnnxRuntimeBackend", "onnxruntime"),
    "tensorrt": RegisteredBackend("dereflect.backends.tensorrt:TensorRTBackend", "trt"),
    "torch": RegisteredBackend("dereflect.backends.torch_backend:TorchBackend", "train"),
}
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "pytorch": "torch"}
PRECISIONS = ("auto", "fp32", "fp16")
#: (height, width) in pixels
HW = Tuple[int, int]


class Runner:
    """One network on one backend: ``activate``, then ``infer`` any number of times, then ``deactivate``."""

    name: str = "network"
    #: the smallest and largest (H, W) the network accepts (None: any), e.g. a TensorRT profile's
    min_input_hw: Optional[HW] = None
    max_input_hw: Optional[HW] = None

    def __init__(self) -> None:
        self.is_active = False
        self._inputs: List[str] = []  # filled by the backend, at construction or activation
        self._outputs: List[str] = []

    @property
    def input_names(self) -> List[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> List[str]:
        return list(self._outputs)

    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run the network on ``feeds`` (input name -> array) and return output name -> array."""
        if not self.is_active:
            self.activate()
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in feeds if n not in self.input_names]
        if missing or unknown:
            raise InputError(
                f"{self.name}: feeds {sorted(feeds)} do not match the network inputs {self.input_names}"
            )
        return self._infer(feeds)

    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _infer(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"<{type(self).__name__} {self.name!r} {state}>"


@dataclasses.dataclass
class BackendOptions:
    """Options every backend takes. ``device``: auto, cpu, cuda, cuda:N; ``precision``: auto, fp32, fp16."""

    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        self.precision = str(self.precision).lower()
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")

    @classmethod
    def create(cls, backend: str, caller_options: Sequence[str] = (), **options: Any) -> BackendOptions:
        """The options of ``backend`` from keyword arguments; an unknown name raises InputError, naming
        the closest known one among the backend's and ``caller_options`` (those the caller took itself,
        such as the Remover's: a misspelt ``strenght`` is meant for the Remover, not the backend)."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            candidates = known + list(caller_options)
            named = []
            for name in unknown:
                close = difflib.get_close_matches(name, candidates, n=1)
                named.append(f"{name} (did you mean {close[0]}?)" if close else name)
            if caller_options:
                raise InputError(f"no option(s) {', '.join(named)}: the Remover takes {', '.join(caller_options)}, "
                                 f"and the {backend} backend {', '.join(known)}")
            raise InputError(f"the {backend} backend has no option(s) {', '.join(named)}; it takes: "
                             f"{', '.join(known)}")
        return cls(**options)


@dataclasses.dataclass
class BackendDescription:
    """What ``dereflect bench`` reports about a backend: where it runs and at what precision."""

    text: str
    on_gpu: bool = False
    #: bytes per network tensor element the floors assume (None: the ONNX files' own)
    element_bytes: Optional[int] = None


class HostExecutor(Executor):
    """A method's sequence on NumPy arrays: each network through its runner, the CPU middle step."""

    def __init__(self, manifest: Manifest, runners: Dict[str, Runner]) -> None:
        self.manifest = manifest
        self.runners = runners

    def upload(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)

    def network(self, name: str, x: np.ndarray) -> Dict[str, np.ndarray]:
        spec = self.manifest.networks[name]
        outputs = self.runners[name].infer({spec.inputs[0].name: x})
        batch, _, height, width = x.shape
        for tensor in spec.outputs:
            value = outputs[tensor.name]
            if value.shape != (batch, tensor.channels, height, width):
                raise ModelError(
                    f"network {name!r} returned {tensor.name} with shape {value.shape} for a {height}x{width} "
                    f"input; expected {(batch, tensor.channels, height, width)}"
                )
            if not np.isfinite(value).all():
                raise ModelError(f"network {name!r} produced NaN or infinite values in {tensor.name!r} "
                                 "(FP16 overflow? try precision='fp32')")
        return outputs

    def clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, 0.0, 1.0)

    def middle_step(self, image: np.ndarray, stage1: np.ndarray, settings: Any,
                    intermediates: bool) -> MiddleStepOutput:
        from dereflect.middle_step.cpu import middle_step_cpu

        result = middle_step_cpu(self.download(image), self.download(stage1), settings.c1, settings.c2,
                                 settings.threshold, settings.gradient_threshold, settings.epsilon,
                                 settings.centre_filter)
        out = MiddleStepOutput(stage2_input=self.upload(result.stage2_input))
        if intermediates:
            out.confidence, out.thresholds = result.confidence, (float(result.low), float(result.high))
            out.mask_background, out.mask_reflection = result.mask_background, result.mask_reflection
        return out

    def download(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[0].transpose(1, 2, 0), dtype=np.float32)


class Backend:
    """Every network of a model opened on one runtime (see the module docstring)."""

    name: ClassVar[str] = ""
    options_class: ClassVar[Type[BackendOptions]] = BackendOptions

    def __init__(self, manifest: Manifest, method: Method, options: BackendOptions) -> None:
        self.manifest = manifest
        self.method = method
        self.options = options
        self.runners: Dict[str, Runner] = self.open_runners()
        self._check_runners()

    def open_runners(self) -> Dict[str, Runner]:
        """Activated runners for every network of the manifest."""
        raise NotImplementedError

    def _check_runners(self) -> None:
        for name, spec in self.manifest.networks.items():
            runner = self.runners[name]
            want_in = [t.name for t in spec.inputs]
            want_out = [t.name for t in spec.outputs]
            if set(want_in) - set(runner.input_names) or set(want_out) - set(runner.output_names):
                raise ModelError(
                    f"{self.manifest.directory}: network {name!r} has inputs {runner.input_names} and outputs "
                    f"{runner.output_names}, but the manifest says {want_in} -> {want_out}; re-export the model"
                )

    def host_executor(self) -> HostExecutor:
        return HostExecutor(self.manifest, self.runners)

    def device_executor(self, settings: Any) -> Optional[Executor]:
        """An executor that keeps the frame on the GPU (None where this backend has none)."""
        return None

    def input_limits(self) -> Tuple[Optional[HW], Optional[HW]]:
        """The smallest and largest (H, W) every network accepts (None: no limit)."""
        lows = [r.min_input_hw for r in self.runners.values() if r.min_input_hw]
        highs = [r.max_input_hw for r in self.runners.values() if r.max_input_hw]
        low = (max(h for h, _ in lows), max(w for _, w in lows)) if lows else None
        high = (min(h for h, _ in highs), min(w for _, w in highs)) if highs else None
        return low, high

    def describe(self) -> BackendDescription:
        return BackendDescription(self.name)

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()


def backend_name(backend: str) -> str:
    """The canonical backend name for ``backend`` or an alias; InputError when unknown."""
    key = str(backend).lower()
    key = ALIASES.get(key, key)
    if key not in BACKENDS:
        known = ", ".join(list(BACKENDS) + list(ALIASES))
        raise InputError(f"unknown backend {backend!r}; choose one of: {known}")
    return key


def backend_class(backend: str) -> Type[Backend]:
    """The Backend class of ``backend`` (light: its heavy dependencies load when it is opened)."""
    module, attribute = BACKENDS[backend_name(backend)].location.split(":")
    return getattr(importlib.import_module(module), attribute)


def open_backend(manifest: Manifest, method: Method, backend: str = "onnxruntime",
                 caller_options: Sequence[str] = (), **options: Any) -> Backend:
    """Open every network of ``manifest`` on ``backend`` with its typed ``options`` (``caller_options``:
    see :meth:`BackendOptions.create`)."""
    cls = backend_class(backend)
    return cls(manifest, method, cls.options_class.create(cls.name, caller_options, **options))


def require_backend_module(module: str, backend: str, what: str = "") -> ModuleType:
    """Import a heavy dependency of ``backend`` or raise MissingDependencyError with its extra's install line."""
    name = backend_name(backend)
    purpose = f"the {name} backend ({what})" if what else f"the {name} backend"
    return require(module, BACKENDS[name].extra, purpose)

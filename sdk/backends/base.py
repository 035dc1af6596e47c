"""The runner interface every inference backend implements, and lazy backend selection.

A :class:`Runner` runs one network (Polygraphy-style): ``activate()`` loads it,
``infer(feeds)`` maps input names to NCHW arrays and returns output names to NCHW arrays,
``deactivate()`` frees it. Runners are context managers.

A backend is a module named in ``BACKENDS`` that provides

* ``create_runner(model, **opts) -> Runner`` for one network (a file path or a
  :class:`~dereflect.manifest.NetworkSpec` with its manifest), and
* ``open_networks(manifest, device, precision, **opts) -> dict[str, Runner]`` for every network
  of an export directory, already activated,
* optionally ``open_device_rm2s(manifest, runners, c1, c2, **opts)`` returning an object whose
  ``run(image_nchw)`` keeps the RM2S frame on the device from engine 1 to engine 2 (or None).

Backend modules import their heavy dependencies (onnxruntime, tensorrt, pycuda, torch) only
inside those functions, so ``import dereflect`` stays light and a missing backend fails with
the install line that fixes it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Dict, List

import numpy as np

from ..errors import InputError, MissingDependencyError

BACKENDS = {
    "onnxruntime": "dereflect.backends.onnxruntime",
    "tensorrt": "dereflect.backends.tensorrt",
    "torch": "dereflect.backends.torch_backend",
}
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "pytorch": "torch"}
INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)",
    "tensorrt": "pip install 'dereflect[trt]' (on Jetson: TensorRT and pycuda come with JetPack)",
    "torch": "pip install 'dereflect[train]' (PyTorch; a CUDA build for GPU speed)",
}


class Runner:
    """One network on one backend: ``activate``, then ``infer`` any number of times, then ``deactivate``."""

    name: str = "network"

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


def backend_name(backend: str) -> str:
    """The canonical backend name for ``backend`` or an alias; InputError when unknown."""
    key = str(backend).lower()
    key = ALIASES.get(key, key)
    if key not in BACKENDS:
        known = ", ".join(list(BACKENDS) + list(ALIASES))
        raise InputError(f"unknown backend {backend!r}; choose one of: {known}")
    return key


def load_backend(backend: str) -> ModuleType:
    """Import a backend module (light: its heavy dependencies load when a runner is made)."""
    return importlib.import_module(BACKENDS[backend_name(backend)])


def require_backend_module(module: str, backend: str, what: str = "") -> ModuleType:
    """Import a heavy dependency of ``backend`` or raise MissingDependencyError with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        purpose = f" ({what})" if what else ""
        raise MissingDependencyError(
            f"the {backend} backend needs '{module}'{purpose}, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINTS[backend]}"
        ) from exc


def get_runner(backend: str, model: Any, **opts: Any) -> Runner:
    """A runner for one network on ``backend`` ("onnxruntime", "tensorrt", "torch" or an alias).

    ``model`` is what the backend loads: an ONNX path (onnxruntime), an engine path
    (tensorrt), or a module / (checkpoint, network) pair (torch). Not yet activated.
    """
    return load_backend(backend).create_runner(model, **opts)

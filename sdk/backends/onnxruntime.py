"""ONNX Runtime backend: the default, CPU everywhere, CUDA when onnxruntime-gpu is installed.

``device="auto"`` uses the CUDA execution provider when this onnxruntime build has it (with
the CPU provider as fallback for unsupported nodes) and the CPU provider otherwise;
``"cpu"`` and ``"cuda"`` force one. ``precision="fp16"`` loads the FP16 ONNX files an export
made with ``--fp16``; ``"auto"`` and ``"fp32"`` load the FP32 files (FP16 on a CPU is slower).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ..errors import InputError, MissingDependencyError, ModelError
from ..manifest import Manifest
from .base import Runner, require_backend_module

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16")


def _ort():
    return require_backend_module("onnxruntime", "onnxruntime")


def providers_for(device: str, available: List[str]) -> List[str]:
    """Execution providers for ``device`` given the ones this onnxruntime build offers."""
    device = str(device).lower()
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)} for onnxruntime, not {device!r}")
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise MissingDependencyError(
            "device='cuda' needs onnxruntime's CUDA execution provider, which this onnxruntime lacks "
            f"(it has {', '.join(available)}). Install it with: "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu"
        )
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    """One ONNX file in an ``onnxruntime.InferenceSession`` (thread-safe ``run``)."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        device: str = "auto",
        threads: Optional[int] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.name = name or self.path.stem
        self.session: Any = None
        self._input_types: Dict[str, Any] = {}

    @property
    def providers(self) -> List[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def _activate(self) -> None:
        ort = _ort()
        if not self.path.is_file():
            raise ModelError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        # Warnings about unused initialisers and the like are noise for users of an export.
        options.log_severity_level = 3
        providers = providers_for(self.device, list(ort.get_available_providers()))
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped pybind errors
            raise ModelError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        typed = {
            name: np.ascontiguousarray(value, dtype=self._input_types[name]) for name, value in feeds.items()
        }
        try:
            outputs = self.session.run(self._outputs, typed)
        except Exception as exc:  # noqa: BLE001 - see _activate
            shapes = {k: tuple(v.shape) for k, v in typed.items()}
            raise ModelError(
                f"onnxruntime failed running {self.path.name} on inputs {shapes}: {exc}"
            ) from exc
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self._outputs, outputs)}


def create_runner(model: Union[str, os.PathLike], device: str = "auto", threads: Optional[int] = None,
                  **_: Any) -> OnnxRuntimeRunner:
    """A runner for one ONNX file."""
    return OnnxRuntimeRunner(model, device=device, threads=threads)


def open_networks(manifest: Manifest, device: str = "auto", precision: str = "auto",
                  threads: Optional[int] = None, **_: Any) -> Dict[str, Runner]:
    """Activated runners for every network of ``manifest``."""
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    fp16 = precision == "fp16"
    if fp16:
        manifest.verify_files(fp16=True)
    runners: Dict[str, Runner] = {}
    for name in manifest.networks:
        path = manifest.path_of(name, fp16=fp16)
        runners[name] = OnnxRuntimeRunner(path, device=device, threads=threads, name=name).activate()
    return runners

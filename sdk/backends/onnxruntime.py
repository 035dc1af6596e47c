"""ONNX Runtime backend: the default, CPU everywhere, CUDA when onnxruntime-gpu is installed.

``device="auto"`` uses the CUDA execution provider when this onnxruntime build has it (with
the CPU provider as fallback for unsupported nodes) and the CPU provider otherwise;
``"cpu"`` and ``"cuda"`` force one. ``precision="fp16"`` loads the FP16 ONNX files of the
export; ``"auto"`` and ``"fp32"`` load the FP32 files (FP16 on a CPU is slower). ``threads``
sets onnxruntime's intra-op threads (default: its own choice).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
from dereflect.backends.base import Backend, BackendDescription, BackendOptions, Runner, require_backend_module
from dereflect.errors import InputError, MissingDependencyError, ModelError

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
DEVICES = ("auto", "cpu", "cuda")


def _ort() -> Any:
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
    """One ONNX model in an ``onnxruntime.InferenceSession`` (thread-safe ``run``).

    ``model`` is a file path, or the serialized model's bytes (an ONNX file being made).
    """

    def __init__(
        self,
        model: Union[str, os.PathLike, bytes],
        device: str = "auto",
        threads: Optional[int] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.model = model if isinstance(model, bytes) else Path(model)
        self.device = device
        self.threads = threads
        self.name = name or (self.model.stem if isinstance(self.model, Path) else "model")
        self.session: Any = None
        self._input_types: Dict[str, Any] = {}

    @property
    def providers(self) -> List[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def _activate(self) -> None:
        ort = _ort()
        if isinstance(self.model, Path) and not self.model.is_file():
            raise ModelError(f"ONNX file not found: {self.model}")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        # Warnings about unused initialisers and the like are noise for users of an export.
        options.log_severity_level = 3
        providers = providers_for(self.device, list(ort.get_available_providers()))
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped pybind errors
            raise ModelError(f"onnxruntime cannot load {self.name}: {exc}") from exc
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
            raise ModelError(f"onnxruntime failed running {self.name} on inputs {shapes}: {exc}") from exc
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self._outputs, outputs)}


@dataclasses.dataclass
class OnnxRuntimeOptions(BackendOptions):
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError(f"threads must be a positive integer, not {self.threads!r}")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options_class = OnnxRuntimeOptions

    def open_runners(self) -> Dict[str, Runner]:
        fp16 = self.options.precision == "fp16"
        if fp16:
            self.manifest.verify_files(fp16=True)
        runners: Dict[str, Runner] = {}
        for name in self.manifest.networks:
            path = self.manifest.path_of(name, fp16=fp16)
            runners[name] = OnnxRuntimeRunner(path, device=self.options.device, threads=self.options.threads,
                                              name=name).activate()
        return runners

    def describe(self) -> BackendDescription:
        providers = list(getattr(next(iter(self.runners.values())), "providers", []))
        fp16 = self.options.precision == "fp16"
        return BackendDescription(f"onnxruntime ({', '.join(providers)}), {'fp16' if fp16 else 'fp32'}",
                                  on_gpu="CUDAExecutionProvider" in providers, element_bytes=2 if fp16 else None)

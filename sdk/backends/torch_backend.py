"""PyTorch backend: for machines with a GPU but no TensorRT (CUDA, FP16), and on the CPU for tests.

An export directory holds ONNX files, which torch does not run; this backend runs the
*training checkpoint* the export was made from (``checkpoint=PATH``, ``--checkpoint``). Its
SHA-256 must match the one recorded in ``manifest.json`` so the networks are the exported
ones. A checkpoint opened directly (``dereflect eval CKPT``) has an in-memory manifest made by
its method. Networks are rebuilt with :mod:`dereflect.train` (extra ``train``) and wrapped in
``PaddedModel`` (the same pad-to-stride the ONNX graphs carry).

``device="auto"`` picks CUDA when available; ``precision="auto"`` is FP16 on CUDA and FP32 on
the CPU (FP16 convolutions on a CPU are slow or missing). On CUDA the frame stays on the GPU
from stage 1 to stage 2 (:class:`TorchDeviceExecutor`): the middle step runs as the fused CUDA
kernel through cupy when cupy is installed (``use_cupy``), else as
:mod:`dereflect.middle_step.torch_ops` (same definition, torch ops); the confidence map is
always float32.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
from dereflect.backends.base import Backend, BackendDescription, BackendOptions, Runner, require_backend_module
from dereflect.errors import InputError, ModelError
from dereflect.manifest import Manifest, sha256_file
from dereflect.methods.base import CudaEventTimer, Executor, Method, MiddleStepOutput, Timer


def _torch() -> Any:
    return require_backend_module("torch", "torch")


def resolve_device(device: str) -> str:
    """"cpu", "cuda" or "cuda:N" for ``device`` ("auto" picks CUDA when torch sees a GPU)."""
    torch = _torch()
    device = str(device).lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device={device!r} but this torch sees no CUDA GPU (a CPU-only build or no driver)"
            )
        return device
    if device == "cpu":
        return device
    raise InputError(f"device must be auto, cpu, cuda or cuda:N for the torch backend, not {device!r}")


def resolve_dtype(precision: str, device: str) -> Any:
    torch = _torch()
    if precision == "fp16" and device == "cpu":
        raise InputError("precision='fp16' needs a CUDA device with the torch backend; use fp32 on the CPU")
    if precision == "fp16" or (precision == "auto" and device != "cpu"):
        return torch.float16
    return torch.float32


def _as_outputs(value: Any, names: Sequence[str]) -> Dict[str, Any]:
    if isinstance(value, dict):
        return {name: value[name] for name in names}
    if isinstance(value, (tuple, list)):
        if len(value) < len(names):
            raise ModelError(f"the network returned {len(value)} outputs, the manifest names {list(names)}")
        return dict(zip(names, value))
    return {names[0]: value}


class TorchRunner(Runner):
    """One ``torch.nn.Module`` (NCHW in, a tensor / tuple / dict of NCHW out)."""

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str],
                 device: str = "auto", precision: str = "auto", name: str = "network") -> None:
        super().__init__()
        self.module = module
        self._inputs = list(input_names)
        self._outputs = list(output_names)
        self.requested_device = device
        self.precision = precision
        self.name = name
        self.device = "cpu"
        self.dtype: Any = None

    def _activate(self) -> None:
        self.device = resolve_device(self.requested_device)
        self.dtype = resolve_dtype(self.precision, self.device)
        self.module = self.module.to(device=self.device, dtype=self.dtype).eval()

    def _deactivate(self) -> None:
        self.module = self.module.to("cpu")

    def forward(self, *tensors: Any) -> Dict[str, Any]:
        """Run on device tensors (any float dtype); outputs as float32 device tensors."""
        torch = _torch()
        with torch.inference_mode():
            value = self.module(*[t.to(device=self.device, dtype=self.dtype) for t in tensors])
        return {name: t.float() for name, t in _as_outputs(value, self._outputs).items()}

    def _infer(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        torch = _torch()
        tensors = [
            torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=np.float32)) for name in self._inputs
        ]
        return {name: t.cpu().numpy() for name, t in self.forward(*tensors).items()}


def checkpoint_modules(method: Method, checkpoint: Any) -> Dict[str, Any]:
    """Every network of ``method`` built from a loaded training checkpoint, wrapped in PaddedModel."""
    from dereflect.train.models.common import PaddedModel

    have = checkpoint.metadata.get("networks", {})
    return {contract.name: PaddedModel(checkpoint.build(method.checkpoint_network(contract, have)))
            for contract in method.networks}


def load_checkpoint_for(manifest: Manifest, method: Method, path: Union[str, os.PathLike],
                        verify: bool = True) -> Any:
    """Load the training checkpoint an export was made from, checking the manifest's SHA-256."""
    require_backend_module("safetensors", "torch")
    from dereflect.train.checkpoint import load_checkpoint

    expected = (manifest.checkpoint or {}).get("sha256")
    if verify and expected:
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(
                f"{path}: SHA-256 {actual[:12]}... is not the checkpoint this export was made "
                f"from ({expected[:12]}... in {manifest.directory / 'manifest.json'}); pass the matching checkpoint"
            )
    from dereflect.methods.base import method_for_checkpoint

    checkpoint = load_checkpoint(path)
    if method_for_checkpoint(checkpoint.metadata) is not method:
        raise ModelError(f"{path} is a {checkpoint.metadata.get('kind')} checkpoint; the model is {method.name}")
    return checkpoint


@dataclasses.dataclass
class TorchOptions(BackendOptions):
    #: the training checkpoint to run (an export directory's own, checked against its manifest)
    checkpoint: Optional[Union[str, os.PathLike]] = None
    #: ready modules by network name, instead of a checkpoint (tests, notebooks)
    modules: Optional[Dict[str, Any]] = None
    #: check the checkpoint's SHA-256 against the manifest (off for a checkpoint opened directly)
    verify_checkpoint: bool = True
    #: the fused CUDA middle step through cupy: True requires it, False never, None when available
    use_cupy: Optional[bool] = None


class TorchBackend(Backend):
    name = "torch"
    options_class = TorchOptions

    def open_runners(self) -> Dict[str, Runner]:
        _torch()
        modules = self.options.modules
        if modules is None:
            if self.options.checkpoint is None:
                raise ModelError(
                    "the torch backend runs the training checkpoint the export was made from (export directories "
                    "hold ONNX files): pass checkpoint=PATH (--checkpoint PATH)"
                )
            loaded = load_checkpoint_for(self.manifest, self.method, self.options.checkpoint,
                                         self.options.verify_checkpoint)
            modules = checkpoint_modules(self.method, loaded)
        runners: Dict[str, Runner] = {}
        for name, spec in self.manifest.networks.items():
            if name not in modules:
                raise ModelError(f"no torch module given for network {name!r}")
            runner = TorchRunner(modules[name], [t.name for t in spec.inputs], [t.name for t in spec.outputs],
                                 device=self.options.device, precision=self.options.precision, name=name)
            runners[name] = runner.activate()
        return runners

    @property
    def _first(self) -> TorchRunner:
        return next(iter(self.runners.values()))

    def device_executor(self, settings: Any) -> Optional[Executor]:
        if not str(self._first.device).startswith("cuda"):
            return None
        return TorchDeviceExecutor(self.manifest, self.runners, use_cupy=self.options.use_cupy)

    def describe(self) -> BackendDescription:
        first = self._first
        return BackendDescription(f"torch {first.device} {first.dtype}", on_gpu=str(first.device).startswith("cuda"),
                                  element_bytes=2 if "float16" in str(first.dtype) else 4)


class TorchDeviceExecutor(Executor):
    """The sequence on one CUDA device: one host copy in, one out, the middle step on the GPU."""

    def __init__(self, manifest: Manifest, runners: Dict[str, Runner], use_cupy: Optional[bool] = None) -> None:
        self._torch = _torch()
        self.manifest = manifest
        self.runners = runners
        self.device = next(iter(runners.values())).device
        self._cupy_kernel = None
        #: which middle step runs: "cuda-kernel" (the fused kernel through cupy) or "torch" (its torch ops)
        self.middle_step_kind = "torch"
        if use_cupy is not False:
            try:
                from dereflect.middle_step.cuda import CupyConfidence

                self._cupy_kernel = CupyConfidence()
                self.middle_step_kind = "cuda-kernel"
            except Exception as exc:  # noqa: BLE001 - no cupy, or NVRTC failed: the torch ops still work
                if use_cupy:
                    raise
                warnings.warn(f"fused CUDA middle step unavailable ({exc}); using the torch version", stacklevel=2)

    def upload(self, image: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None])).to(self.device)

    def network(self, name: str, x: Any) -> Dict[str, Any]:
        return self.runners[name].forward(x)

    def clip(self, x: Any) -> Any:
        return x.clamp(0.0, 1.0).contiguous()

    def middle_step(self, image: Any, stage1: Any, settings: Any, intermediates: bool) -> MiddleStepOutput:
        if self._cupy_kernel is not None:
            import cupy

            stream = self._torch.cuda.current_stream(image.device).cuda_stream
            result = self._cupy_kernel(cupy.asarray(image), cupy.asarray(stage1), c1=settings.c1, c2=settings.c2,
                                       stream=stream, gradient_threshold=settings.gradient_threshold,
                                       eps=settings.epsilon)
            # The kernel reuses its output buffer: copy before the next frame can overwrite it.
            return MiddleStepOutput(self._torch.as_tensor(result.stage2_input, device=image.device).clone())
        from dereflect.middle_step.torch_ops import stage2_input_torch

        with self._torch.inference_mode():
            return MiddleStepOutput(stage2_input_torch(image, stage1, settings.c1, settings.c2,
                                                       settings.gradient_threshold, settings.epsilon))

    def download(self, x: Any) -> np.ndarray:
        return np.ascontiguousarray(x[0].float().cpu().numpy().transpose(1, 2, 0))

    def timer(self) -> Timer:
        return CudaEventTimer(self._torch)

"""PyTorch backend: for machines with a GPU but no TensorRT (CUDA, FP16), and on the CPU for tests.

An export directory holds ONNX files, which torch does not run; this backend runs the
*training checkpoint* the export was made from (``checkpoint=PATH``, ``--checkpoint``). Its
SHA-256 must match the one recorded in ``manifest.json`` so the networks are the exported
ones. Networks are rebuilt with :mod:`dereflect.train` (extra ``train``) and wrapped in
``PaddedModel`` (the same pad-to-stride the ONNX graphs carry).

``device="auto"`` picks CUDA when available; ``precision="auto"`` is FP16 on CUDA and FP32 on
the CPU (FP16 convolutions on a CPU are slow or missing). The RM2S frame stays on the GPU
from stage 1 to stage 2: the middle step runs as the fused CUDA kernel through cupy when
cupy is installed, else as ``dereflect.middle_step.torch_ops`` (same definition, torch ops);
the confidence map is always float32.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from ..errors import InputError, ModelError
from ..manifest import Manifest, sha256_file
from .base import Runner, require_backend_module

# Manifest network -> checkpoint network names to look for, in order. A stage-2 training
# checkpoint stores the stage-2 U-Net as "generator" next to its frozen "stage1".
CHECKPOINT_NAMES = {"stage1": ("stage1",), "stage2": ("stage2", "generator"), "crrn": ("crrn",)}
PRECISIONS = ("auto", "fp32", "fp16")


def _torch():
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
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
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


def _checkpoint_module(checkpoint: Any, network: str) -> Any:
    from dereflect.train.models.common import PaddedModel

    have = checkpoint.metadata.get("networks", {})
    for candidate in CHECKPOINT_NAMES.get(network, (network,)):
        if candidate in have:
            return PaddedModel(checkpoint.build(candidate))
    raise ModelError(
        f"checkpoint {checkpoint.path} has no network for {network!r} (looked for "
        f"{', '.join(CHECKPOINT_NAMES.get(network, (network,)))}; it has {', '.join(sorted(have)) or 'none'})"
    )


def load_checkpoint_for(
    manifest: Manifest, checkpoint_path: Union[str, os.PathLike], verify: bool = True
) -> Any:
    """Load the training checkpoint an export was made from, checking the manifest's SHA-256."""
    require_backend_module("safetensors", "torch")
    from dereflect.train.checkpoint import load_checkpoint

    expected = (manifest.checkpoint or {}).get("sha256")
    if verify and expected:
        actual = sha256_file(checkpoint_path)
        if actual != expected:
            raise ModelError(
                f"{checkpoint_path}: SHA-256 {actual[:12]}... is not the checkpoint this export was made "
                f"from ({expected[:12]}... in {manifest.directory / 'manifest.json'}); "
                "pass the matching checkpoint"
            )
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint.method != manifest.method:
        raise ModelError(
            f"{checkpoint_path} is a {checkpoint.method} checkpoint; the export is {manifest.method}"
        )
    return checkpoint


def create_runner(
    model: Any,
    input_names: Sequence[str] = ("image",),
    output_names: Sequence[str] = ("background",),
    device: str = "auto",
    precision: str = "auto",
    **_: Any,
) -> TorchRunner:
    """A runner for ``model``: a ``torch.nn.Module`` or a ``(checkpoint_path, network)`` pair."""
    if isinstance(model, tuple):
        path, network = model
        from dereflect.train.checkpoint import load_checkpoint

        model = _checkpoint_module(load_checkpoint(path), network)
    return TorchRunner(model, input_names, output_names, device=device, precision=precision)


def open_networks(manifest: Manifest, device: str = "auto", precision: str = "auto",
                  checkpoint: Optional[Union[str, os.PathLike]] = None,
                  modules: Optional[Dict[str, Any]] = None, verify_checkpoint: bool = True,
                  **_: Any) -> Dict[str, Runner]:
    """Activated runners for the manifest's networks, from ``checkpoint`` (or ready ``modules``)."""
    _torch()
    if modules is None:
        if checkpoint is None:
            raise ModelError(
                "the torch backend runs the training checkpoint the export was made from (export directories "
                "hold ONNX files): pass checkpoint=PATH (--checkpoint PATH)"
            )
        loaded = load_checkpoint_for(manifest, checkpoint, verify=verify_checkpoint)
        modules = {name: _checkpoint_module(loaded, name) for name in manifest.networks}
    runners: Dict[str, Runner] = {}
    for name, spec in manifest.networks.items():
        if name not in modules:
            raise ModelError(f"no torch module given for network {name!r}")
        runner = TorchRunner(modules[name], [t.name for t in spec.inputs], [t.name for t in spec.outputs],
                             device=device, precision=precision, name=name)
        runners[name] = runner.activate()
    return runners


class TorchDeviceRM2S:
    """Stage 1, middle step and stage 2 on one CUDA device, one host copy in and one out."""

    def __init__(self, stage1: TorchRunner, stage2: TorchRunner, c1: float, c2: float,
                 use_cupy: Optional[bool] = None) -> None:
        self.stage1 = stage1
        self.stage2 = stage2
        self.c1 = float(c1)
        self.c2 = float(c2)
        self._cupy_kernel = None
        self.middle_step = "torch"
        if use_cupy is not False:
            try:
                from dereflect.middle_step.cuda import CupyConfidence

                self._cupy_kernel = CupyConfidence()
                self.middle_step = "cuda-kernel"
            except Exception as exc:  # noqa: BLE001 - no cupy, or NVRTC failed: the torch ops still work
                if use_cupy:
                    raise
                warnings.warn(f"fused CUDA middle step unavailable ({exc}); using the torch version",
                              stacklevel=2)

    def _middle(self, image: Any, stage1: Any) -> Any:
        torch = _torch()
        if self._cupy_kernel is not None:
            import cupy

            stream = torch.cuda.current_stream(image.device).cuda_stream
            result = self._cupy_kernel(cupy.asarray(image), cupy.asarray(stage1), c1=self.c1, c2=self.c2,
                                       stream=stream)
            # The kernel reuses its output buffer: copy before the next frame can overwrite it.
            return torch.as_tensor(result.stage2_input, device=image.device).clone()
        from dereflect.middle_step.torch_ops import stage2_input_torch

        return stage2_input_torch(image, stage1, c1=self.c1, c2=self.c2)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x H x W float32 host image -> N x 3 x H x W float32 host background."""
        torch = _torch()
        image = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.stage1.device)
        with torch.inference_mode():
            stage1 = self.stage1.forward(image)["background"].clamp_(0.0, 1.0).contiguous()
            stage2_input = self._middle(image, stage1)
            background = self.stage2.forward(stage2_input)["background"]
        return background.cpu().numpy()


def open_device_rm2s(manifest: Manifest, runners: Dict[str, Runner], c1: float, c2: float,
                     use_cupy: Optional[bool] = None, **_: Any) -> Optional[TorchDeviceRM2S]:
    """The on-device RM2S path when the networks run on CUDA; None on the CPU (the pipeline's CPU path)."""
    stage1, stage2 = runners["stage1"], runners["stage2"]
    if not isinstance(stage1, TorchRunner) or not str(stage1.device).startswith("cuda"):
        return None
    return TorchDeviceRM2S(stage1, stage2, c1, c2, use_cupy=use_cupy)

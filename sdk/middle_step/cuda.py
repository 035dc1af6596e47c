"""Host side of the fused CUDA middle step (``middle_step/confidence.cu``).

The launch geometry lives in :func:`launch_config` (pure Python, so a pycuda or
cuda-python launcher reuses it); :class:`CupyConfidence` runs the four passes on a cupy stream
with a reused workspace; :func:`compile_with_pycuda` builds them for the TensorRT backend. The
source compiles with nvcc as well (``-cubin`` or ``-ptx``, with :func:`kernel_defines` and
:func:`kernel_path`); the tests do so for every supported GPU.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from dereflect.errors import InputError, MissingDependencyError, ModelError, require
from dereflect.middle_step.reference import EPS, GRADIENT_THRESHOLD, HISTOGRAM_BINS

KERNEL_FILE = "confidence.cu"

# Launch geometry shared with the kernel through -D defines (kernel_defines); the .cu file's
# defaults are the same numbers, which the tests check.
TILE_W = 32
TILE_H = 8
HIST_THREADS = 256
SCAN_THREADS = 1024
STAGE2_THREADS = 256
RESULT_SIZE = 8
# The histogram pass is a grid-stride loop: enough blocks to fill a GPU, few enough that the
# per-block flush of up to BINS global atomics stays small next to the pixel work.
HIST_PIXELS_PER_THREAD = 32
HIST_MAX_BLOCKS = 128
MAX_GRID_YZ = 65535

RESULT_FIELDS = (
    "low", "high", "background_upper", "reflection_lower", "max", "count", "split_bin", "bin_width"
)

KERNELS = (
    "rm2s_confidence_f32",
    "rm2s_confidence_b1f16",
    "rm2s_histogram",
    "rm2s_two_means",
    "rm2s_stage2_input_f32",
    "rm2s_stage2_input_f16",
)


def kernel_defines() -> Tuple[str, ...]:
    """``-D`` options fixing the kernel's compile-time sizes to this module's constants."""
    values = {
        "RM2S_TILE_W": TILE_W,
        "RM2S_TILE_H": TILE_H,
        "RM2S_BINS": HISTOGRAM_BINS,
        "RM2S_HIST_THREADS": HIST_THREADS,
        "RM2S_SCAN_THREADS": SCAN_THREADS,
        "RM2S_STAGE2_THREADS": STAGE2_THREADS,
        "RM2S_RESULT_SIZE": RESULT_SIZE,
    }
    return tuple(f"-D{name}={value}" for name, value in values.items())


def kernel_path() -> Path:
    """Filesystem path of the kernel source (for nvcc)."""
    return Path(__file__).resolve().parent / KERNEL_FILE


def kernel_source() -> str:
    """Text of ``confidence.cu`` shipped as package data."""
    try:
        from importlib.resources import files
    except ImportError:  # Python 3.8 (JetPack 5): no importlib.resources.files
        return kernel_path().read_text(encoding="utf-8")
    return (files("dereflect.middle_step") / KERNEL_FILE).read_text(encoding="utf-8")


#: Where the CUDA toolkit (JetPack's included) installs nvcc; JetPack does not put its folder on PATH.
TOOLKIT_NVCC = Path("/usr/local/cuda/bin/nvcc")
PATH_FIX = "export PATH=/usr/local/cuda/bin:$PATH"
_HOST_FALLBACK = "or open the model with device_middle_step=False (the middle step then runs on the CPU)"


def compile_with_pycuda(compiler: Any, options: Sequence[str] = ()) -> Dict[str, Any]:
    """Every kernel of the source, by name, compiled by pycuda (``compiler`` is ``pycuda.compiler``) for
    the GPU of the current CUDA context.

    pycuda's ``SourceModule`` runs ``nvcc`` from PATH; where PATH has none but the toolkit has
    :data:`TOOLKIT_NVCC` (JetPack's default), that one is passed to it. MissingDependencyError when
    no nvcc can be run (pycuda's OSError), ModelError when compiling or loading fails; both one line
    that says what to do.
    """
    on_path = shutil.which("nvcc")
    toolkit = str(TOOLKIT_NVCC) if os.access(TOOLKIT_NVCC, os.X_OK) else None
    where = {"nvcc": toolkit} if toolkit and not on_path else {}
    nvcc = on_path or toolkit or "nvcc"
    try:
        module = compiler.SourceModule(kernel_source(), no_extern_c=True,
                                       options=list(kernel_defines()) + list(options), **where)
        return {name: module.get_function(name) for name in KERNELS}
    except OSError as exc:  # pycuda could not run nvcc (pytools' ExecError)
        if not (on_path or toolkit):
            raise MissingDependencyError(
                f"the fused middle step is compiled with nvcc (the CUDA toolkit), which is neither on PATH nor at "
                f"{TOOLKIT_NVCC}: on a Jetson, run {PATH_FIX} (JetPack installs it there); elsewhere install the "
                f"CUDA toolkit; {_HOST_FALLBACK}") from exc
        raise MissingDependencyError(f"cannot run nvcc ({nvcc}) to compile the fused middle step: "
                                     f"{_first_error(exc)}; {_HOST_FALLBACK}") from exc
    except Exception as exc:  # noqa: BLE001 - pycuda's CompileError, or its driver refusing the module
        raise ModelError(f"nvcc ({nvcc}) could not build {KERNEL_FILE} for this GPU: "
                         f"{_first_error(exc)}; put this device's CUDA toolkit first on PATH ({PATH_FIX}), "
                         f"{_HOST_FALLBACK}") from exc


def _first_error(exc: BaseException) -> str:
    """The line of a compiler failure that says what went wrong (pycuda's CompileError keeps nvcc's stderr)."""
    lines = [line.strip() for line in f"{getattr(exc, 'stderr', '') or ''}\n{exc}".splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [type(exc).__name__])[0]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_frame_size(height: int, width: int, batch: int = 1) -> None:
    """InputError unless the kernel can run N x H x W frames: a 32-bit pixel index, and at most
    MAX_GRID_YZ blocks along the batch and the rows."""
    for name, value in (("height", height), ("width", width), ("batch", batch)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    pixels = int(height) * int(width)
    if pixels >= 2**31:
        raise InputError(f"{height}x{width} has {pixels} pixels; the fused middle-step kernel takes frames below "
                         "2**31 pixels")
    if batch > MAX_GRID_YZ or _ceil_div(int(height), TILE_H) > MAX_GRID_YZ:
        raise InputError(f"batch {batch} or height {height} exceeds the fused middle-step kernel's grid (at most "
                         f"{MAX_GRID_YZ} frames and {MAX_GRID_YZ * TILE_H} rows)")


def launch_config(height: int, width: int, batch: int = 1) -> Dict[str, Any]:
    """Grid/block sizes of the four passes and the workspace sizes (in elements) for NxHxW."""
    check_frame_size(height, width, batch)
    height, width, batch = int(height), int(width), int(batch)
    pixels = height * width
    hist_blocks = min(max(_ceil_div(pixels, HIST_THREADS * HIST_PIXELS_PER_THREAD), 1), HIST_MAX_BLOCKS)
    return {
        "confidence": {
            "grid": (_ceil_div(width, TILE_W), _ceil_div(height, TILE_H), batch),
            "block": (TILE_W, TILE_H, 1),
        },
        "histogram": {"grid": (hist_blocks, 1, batch), "block": (HIST_THREADS, 1, 1)},
        "two_means": {"grid": (batch, 1, 1), "block": (SCAN_THREADS, 1, 1)},
        "stage2": {"grid": (_ceil_div(pixels, STAGE2_THREADS), 1, batch), "block": (STAGE2_THREADS, 1, 1)},
        "bins": HISTOGRAM_BINS,
        "result_size": RESULT_SIZE,
        "workspace": {
            "confidence": batch * pixels,
            "max_bits": batch,
            "hist_count": batch * HISTOGRAM_BINS,
            "hist_sum": batch * HISTOGRAM_BINS,
            "result": batch * RESULT_SIZE,
        },
    }


@dataclass
class CudaMiddleStepResult:
    """Device arrays of one call; ``result`` is N x RESULT_SIZE float32 laid out as RESULT_FIELDS."""

    confidence: Any
    gradient_mask: Any
    mask_background: Any
    mask_reflection: Any
    result: Any
    stage2_input: Any


def kernel_names(stage1_dtype: Any, stage2_dtype: Any) -> Tuple[str, str]:
    """The confidence and stage-2 kernels for the stage-1 output's and the stage-2 input's dtypes."""
    for dtype in (stage1_dtype, stage2_dtype):
        if np.dtype(dtype) not in (np.float32, np.float16):
            raise ModelError(f"the fused kernel takes float32 or float16 tensors, not {np.dtype(dtype)}")
    confidence = "rm2s_confidence_b1f16" if np.dtype(stage1_dtype) == np.float16 else "rm2s_confidence_f32"
    stage2 = "rm2s_stage2_input_f16" if np.dtype(stage2_dtype) == np.float16 else "rm2s_stage2_input_f32"
    return confidence, stage2


def launch_plan(kernels: Tuple[str, str], image: Any, stage1: Any, height: int, width: int,
                gradient_threshold: float, eps: float, c1: float, c2: float, work: Dict[str, Any], out: Any,
                masks: Tuple[Any, Any, Any]) -> List[Tuple[str, str, tuple]]:
    """The four passes in stream order: (kernel, :func:`launch_config` step, arguments).

    Written once for CuPy and pycuda: device pointers (or arrays) for ``image``, ``stage1``,
    ``out`` and the ``work`` buffers (confidence, max_bits, hist_count, hist_sum, result);
    ``masks`` = (gradient mask, background mask, reflection mask) or null pointers.
    """
    confidence_kernel, stage2_kernel = kernels
    h, w = np.int32(height), np.int32(width)
    gradient_mask, mask_background, mask_reflection = masks
    return [
        (confidence_kernel, "confidence",
         (image, stage1, h, w, np.float32(gradient_threshold), np.float32(eps), work["confidence"], gradient_mask,
          work["max_bits"])),
        ("rm2s_histogram", "histogram",
         (work["confidence"], h, w, work["max_bits"], work["hist_count"], work["hist_sum"])),
        ("rm2s_two_means", "two_means",
         (work["hist_count"], work["hist_sum"], work["max_bits"], np.float32(c1), np.float32(c2), work["result"])),
        (stage2_kernel, "stage2",
         (image, work["confidence"], work["result"], h, w, out, mask_background, mask_reflection)),
    ]


class CupyConfidence:
    """The fused CUDA middle step on cupy arrays (N x 3 x H x W, or 3 x H x W, C-contiguous).

    Workspace and, unless ``out_dev`` is given, the output are allocated once per shape and
    reused: the returned arrays are overwritten by the next call with the same shape.
    One instance per thread/stream.
    """

    def __init__(
        self,
        gradient_threshold: float = GRADIENT_THRESHOLD,
        eps: float = EPS,
        options: Tuple[str, ...] = (),
    ) -> None:
        self._cp = require("cupy", "gpu", "the fused CUDA confidence kernel")
        module = self._cp.RawModule(code=kernel_source(), options=kernel_defines() + tuple(options))
        self._kernels = {name: module.get_function(name) for name in KERNELS}
        self._gradient_threshold = np.float32(gradient_threshold)
        self._eps = np.float32(eps)
        self._shape: Optional[Tuple[int, int, int]] = None
        self._buffers: Dict[str, Any] = {}

    def _prepare(self, batch: int, height: int, width: int, dtype: str, masks: bool) -> None:
        cp = self._cp
        if self._shape != (batch, height, width):
            self._shape = (batch, height, width)
            sizes = launch_config(height, width, batch)["workspace"]
            # Zeroed once: the two-means pass leaves max and histogram zeroed for the next frame.
            self._buffers = {
                "confidence": cp.empty((batch, height, width), dtype=cp.float32),
                "max_bits": cp.zeros(sizes["max_bits"], dtype=cp.int32),
                "hist_count": cp.zeros(sizes["hist_count"], dtype=cp.uint32),
                "hist_sum": cp.zeros(sizes["hist_sum"], dtype=cp.float64),
                "result": cp.zeros((batch, RESULT_SIZE), dtype=cp.float32),
            }
        if masks and "gradient_mask" not in self._buffers:
            for name in ("gradient_mask", "mask_background", "mask_reflection"):
                self._buffers[name] = cp.empty((batch, height, width), dtype=cp.uint8)
        out_name = f"stage2_{dtype}"
        if out_name not in self._buffers:
            self._buffers[out_name] = cp.empty((batch, 9, height, width), dtype=dtype)

    @property
    def workspace(self) -> Dict[str, Any]:
        """The device buffers by name (confidence, max_bits, hist_count, hist_sum, result, ...)."""
        return dict(self._buffers)

    def _check(self, array: Any, name: str, dtypes: Tuple[str, ...]) -> Any:
        cp = self._cp
        if not isinstance(array, cp.ndarray):
            raise InputError(f"{name} must be a cupy array on the GPU, got {type(array).__name__}")
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1] != 3:
            raise InputError(f"{name} must be N x 3 x H x W (or 3 x H x W), got shape {array.shape}")
        if array.dtype.name not in dtypes:
            raise InputError(f"{name} must be {' or '.join(dtypes)}, got {array.dtype}")
        if not array.flags.c_contiguous:
            raise InputError(f"{name} must be C-contiguous; pass cupy.ascontiguousarray({name})")
        return array

    def __call__(
        self,
        image_dev: Any,
        stage1_dev: Any,
        out_dev: Any = None,
        c1: float = 0.5,
        c2: float = 0.5,
        stream: Any = None,
        dtype: str = "float32",
        return_masks: bool = False,
        gradient_threshold: Optional[float] = None,
        eps: Optional[float] = None,
    ) -> CudaMiddleStepResult:
        """Run the four passes on ``stream`` (cupy stream, raw handle int, or None: current).

        ``gradient_threshold`` and ``eps`` default to the instance's (a manifest's values override).
        """
        if dtype not in ("float32", "float16"):
            raise InputError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        image = self._check(image_dev, "image_dev", ("float32",))
        stage1 = self._check(stage1_dev, "stage1_dev", ("float32", "float16"))
        if image.shape != stage1.shape:
            raise InputError(f"image_dev {image.shape} and stage1_dev {stage1.shape} differ in shape")
        batch, _, height, width = image.shape
        config = launch_config(height, width, batch)
        self._prepare(batch, height, width, dtype, return_masks)
        buf = self._buffers
        out = buf[f"stage2_{dtype}"] if out_dev is None else out_dev
        if (
            not isinstance(out, self._cp.ndarray)
            or out.shape != (batch, 9, height, width)
            or out.dtype.name != dtype
            or not out.flags.c_contiguous
        ):
            expected = (batch, 9, height, width)
            raise InputError(f"out_dev must be a C-contiguous {dtype} cupy array of shape {expected}")
        # A null pointer for the optional outputs: a pointer-sized zero.
        null = np.uintp(0)
        gradient_mask = buf["gradient_mask"] if return_masks else null
        mask_background = buf["mask_background"] if return_masks else null
        mask_reflection = buf["mask_reflection"] if return_masks else null
        if isinstance(stream, int):
            stream = self._cp.cuda.ExternalStream(stream)
        kernels = kernel_names(stage1.dtype, dtype)
        launches = launch_plan(
            kernels, image, stage1, height, width,
            self._gradient_threshold if gradient_threshold is None else gradient_threshold,
            self._eps if eps is None else eps, c1, c2, buf, out, (gradient_mask, mask_background, mask_reflection))
        if stream is None:
            self._launch(launches, config)
        else:
            with stream:
                self._launch(launches, config)
        return CudaMiddleStepResult(
            confidence=buf["confidence"],
            gradient_mask=buf["gradient_mask"] if return_masks else None,
            mask_background=buf["mask_background"] if return_masks else None,
            mask_reflection=buf["mask_reflection"] if return_masks else None,
            result=buf["result"],
            stage2_input=out,
        )

    def _launch(self, launches: List[Tuple[str, str, tuple]], config: Dict[str, Any]) -> None:
        for kernel, step, args in launches:
            self._kernels[kernel](config[step]["grid"], config[step]["block"], args)

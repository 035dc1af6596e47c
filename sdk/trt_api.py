"""TensorRT version dispatch, engine sidecars and profile shapes, shared by the engine builder and runtime.

No TensorRT, CUDA or torch import happens here at module level: every function takes the
``tensorrt`` module (or a version tuple) as an argument, so this module is importable and
testable anywhere. The version facts encoded here (see REFERENCE.md, "Deployment stack"):

* 8.x: networks need the ``EXPLICIT_BATCH`` creation flag (deprecated and ignored from 10.0);
* 8.x and 10.x: FP16 is a builder flag on an FP32 network (``BuilderFlag.FP16``, deprecated
  in 10.12, removed in 11.0);
* 11.x: networks are strongly typed; FP16 must be in the ONNX file itself.

An engine ``<network>.engine`` in an export directory has a sidecar ``<network>.engine.json``
(:class:`EngineInfo`) recording what it was built with, because an engine only runs with the
TensorRT version and the GPU that built it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import InputError, ModelError

Version = Tuple[int, int, int]
Shape = Tuple[int, int, int, int]

ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".engine.json"
SIDECAR_FORMAT = "dereflect-engine"
SIDECAR_FORMAT_VERSION = 1
UNKNOWN = "unknown"

# Named sizes for --min/--opt/--max, as (height, width) of a 16:9 frame.
NAMED_SIZES = {
    "360p": (360, 640),
    "480p": (480, 854),
    "540p": (540, 960),
    "720p": (720, 1280),
    "1080p": (1080, 1920),
    "1440p": (1440, 2560),
    "2160p": (2160, 3840),
    "4k": (2160, 3840),
}
DEFAULT_PROFILE = {"min": "1x3x128x128", "opt": "720p", "max": "1080p"}


def parse_version(text: str) -> Version:
    """``"8.5.2.2"`` -> ``(8, 5, 2)``; raises InputError for text without a leading ``major.minor``."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not match:
        raise InputError(f"cannot read a TensorRT version from {text!r} (expected e.g. '10.3.0')")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def trt_version_tuple(trt: Any) -> Version:
    """The (major, minor, patch) of an imported ``tensorrt`` module."""
    return parse_version(getattr(trt, "__version__", ""))


def needs_explicit_batch_flag(ver: Version) -> bool:
    """8.x networks must be created with EXPLICIT_BATCH; from 10.0 it is the only mode."""
    return ver < (10, 0, 0)


def use_strong_typing(ver: Version) -> bool:
    """11.x builds strongly typed networks: precision comes from the ONNX file's types."""
    return ver >= (11, 0, 0)


def fp16_flag_available(ver: Version) -> bool:
    """``BuilderFlag.FP16`` exists before 11.0 (deprecated from 10.12, still honoured)."""
    return ver < (11, 0, 0)


def parse_shape(text: str, channels: int) -> Shape:
    """Read one profile shape: ``"1x3x256x256"`` (NCHW), ``"256x320"`` (H x W) or a name like ``"720p"``.

    The channel count is the network's own (``channels``): RM2S stage 2 takes 9 channels at
    the image's size, so a 4-part shape may give C as 3 (the image) or as ``channels``.
    """
    raw = str(text).strip().lower()
    if raw in NAMED_SIZES:
        height, width = NAMED_SIZES[raw]
        return (1, channels, height, width)
    parts = raw.split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 2:
        return (1, channels, numbers[0], numbers[1])
    if len(numbers) == 4:
        batch, chans, height, width = numbers
        if chans not in (3, channels):
            raise InputError(f"shape {text!r}: channel count {chans} is neither 3 (the image) nor {channels}")
        return (batch, channels, height, width)
    raise InputError(
        f"cannot read shape {text!r}: use NxCxHxW (1x3x720x1280), HxW (720x1280) or one of "
        f"{', '.join(NAMED_SIZES)}"
    )


def derive_profile(
    channels: int,
    min_shape: Optional[str] = None,
    opt_shape: Optional[str] = None,
    max_shape: Optional[str] = None,
) -> Dict[str, List[int]]:
    """An optimisation profile ``{"min": [N,C,H,W], "opt": ..., "max": ...}`` with min <= opt <= max.

    Missing bounds default to :data:`DEFAULT_PROFILE`; an ``opt`` outside the given bounds is a
    user error rather than something to clamp silently.
    """
    given = {"min": min_shape, "opt": opt_shape, "max": max_shape}
    shapes = {key: parse_shape(value or DEFAULT_PROFILE[key], channels) for key, value in given.items()}
    for key, shape in shapes.items():
        if min(shape) < 1:
            raise InputError(f"--{key} shape {shape} has a dimension below 1")
    for low, high in (("min", "opt"), ("opt", "max")):
        if any(a > b for a, b in zip(shapes[low], shapes[high])):
            raise InputError(
                f"profile shapes must satisfy min <= opt <= max in every dimension; "
                f"--{low} {list(shapes[low])} exceeds --{high} {list(shapes[high])}"
            )
    return {key: list(shape) for key, shape in shapes.items()}


def shape_in_profile(shape: Sequence[int], profile: Dict[str, List[int]]) -> bool:
    """Whether an input shape lies inside a profile's [min, max] box."""
    return len(shape) == len(profile["min"]) and all(
        lo <= s <= hi for s, lo, hi in zip(shape, profile["min"], profile["max"])
    )


def engine_paths(export_dir: os.PathLike, network: str) -> Tuple[Path, Path]:
    """Where the engine of ``network`` and its sidecar live in an export directory."""
    directory = Path(export_dir)
    return directory / f"{network}{ENGINE_SUFFIX}", directory / f"{network}{SIDECAR_SUFFIX}"


@dataclass
class EngineInfo:
    """Sidecar of one engine: what built it, for what, from which ONNX file."""

    network: str
    engine: str
    onnx: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: Dict[str, Dict[str, List[int]]]
    strongly_typed: bool = False
    float32_layers: int = 0
    engine_sha256: str = ""
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> Dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "format_version": SIDECAR_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> EngineInfo:
        if data.get("format") != SIDECAR_FORMAT:
            raise ModelError("not a dereflect engine sidecar (format field missing or wrong)")
        if int(data.get("format_version", -1)) > SIDECAR_FORMAT_VERSION:
            raise ModelError(
                f"engine sidecar format {data.get('format_version')} is newer than this dereflect reads"
            )
        names = set(cls.__dataclass_fields__)
        optional = {"strongly_typed", "float32_layers", "engine_sha256", "created"}
        missing = sorted(n for n in names - optional if n not in data)
        if missing:
            raise ModelError(f"engine sidecar lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def write_engine_info(info: EngineInfo, path: os.PathLike) -> Path:
    """Write a sidecar atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_engine_info(path: os.PathLike) -> EngineInfo:
    """Read a sidecar; ModelError names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"engine sidecar not found: {path}; "
            "build the engine on this device with: dereflect export engine DIR"
        )
    try:
        return EngineInfo.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ModelError(f"{path} is not a valid engine sidecar: {exc}") from exc
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def _same_version(a: str, b: str) -> bool:
    # Engines need the same TensorRT release; compare every number both strings give.
    numbers_a = re.findall(r"\d+", a)
    numbers_b = re.findall(r"\d+", b)
    common = min(len(numbers_a), len(numbers_b))
    return common >= 2 and numbers_a[:common] == numbers_b[:common]


def check_engine_compatible(
    info: EngineInfo,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    onnx_sha256: str,
) -> None:
    """Raise ModelError unless the engine was built by this TensorRT, for this GPU, from this ONNX file.

    A GPU name or compute capability reported as ``"unknown"`` on either side is not compared
    (TensorRT itself then refuses a wrong engine at deserialisation).
    """
    rebuild = "rebuild it on this device with: dereflect export engine DIR"
    if not _same_version(info.tensorrt_version, trt_version):
        raise ModelError(
            f"engine {info.engine} was built with TensorRT {info.tensorrt_version} but TensorRT "
            f"{trt_version} is installed; engines only load in the version that built them; {rebuild}"
        )
    known = UNKNOWN not in (info.compute_capability, compute_capability)
    if known and info.compute_capability != compute_capability:
        raise ModelError(
            f"engine {info.engine} was built for compute capability {info.compute_capability} "
            f"({info.gpu_name}) but this GPU is {compute_capability} ({gpu_name}); {rebuild}"
        )
    if UNKNOWN not in (info.gpu_name, gpu_name) and info.gpu_name != gpu_name:
        raise ModelError(
            f"engine {info.engine} was built on {info.gpu_name!r} but this GPU is {gpu_name!r}; {rebuild}"
        )
    if info.onnx_sha256 != onnx_sha256:
        raise ModelError(
            f"engine {info.engine} was built from another ONNX file than {info.onnx} in this export "
            f"(SHA-256 {info.onnx_sha256[:12]}... vs {onnx_sha256[:12]}...); {rebuild}"
        )


def _gpu_from_cuda_python() -> Optional[Tuple[str, str]]:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"


def _gpu_from_pycuda() -> Optional[Tuple[str, str]]:
    try:
        import pycuda.driver as cuda
    except ImportError:
        return None
    cuda.init()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return device.name(), f"{major}.{minor}"


def _gpu_from_nvidia_smi() -> Optional[Tuple[str, str]]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    name, _, cc = line.partition(",")
    return (name.strip(), cc.strip()) if name.strip() and re.match(r"\d+\.\d+$", cc.strip()) else None


def gpu_info() -> Tuple[str, str]:
    """(GPU name, compute capability "major.minor") of device 0, or "unknown" parts.

    Tries cuda-python, then pycuda, then nvidia-smi (absent on JetPack 5); all imported lazily.
    """
    for probe in (_gpu_from_cuda_python, _gpu_from_pycuda, _gpu_from_nvidia_smi):
        try:
            found = probe()
        except Exception:  # noqa: BLE001 - a broken driver binding must not stop the other probes
            found = None
        if found:
            return found
    return UNKNOWN, UNKNOWN

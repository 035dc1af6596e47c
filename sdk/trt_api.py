"""TensorRT version dispatch, engine sidecars and profile shapes, shared by the engine builder and runtime.

No TensorRT, CUDA or torch import happens here at module level: every function takes the
``tensorrt`` module (or a version tuple) as an argument, so this module is importable and
testable anywhere. The version facts encoded here (NVIDIA's TensorRT release notes and API docs):

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
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import InputError, ModelError
from .imageio import staged_file
from .manifest import SHA256_PATTERN, is_int, show_value

Version = Tuple[int, int, int]
Shape = Tuple[int, int, int, int]

#: The oldest TensorRT dereflect supports: name-based I/O and ``execute_async_v3`` (JetPack 5 ships 8.5).
MIN_TENSORRT: Version = (8, 5, 0)

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

#: A sidecar is about a kilobyte; a file past this is not one, and is refused before it is parsed.
MAX_SIDECAR_BYTES = 1024 * 1024
#: TensorRT's limit on a tensor's volume (``ITensor``: "must be less than 2^31 elements").
MAX_TENSOR_ELEMENTS = 2**31
_PRECISIONS = ("fp16", "fp32")


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


def parse_frame_size(text: str) -> Tuple[int, int]:
    """A frame size as (height, width): ``"720x1280"`` (H x W) or a name of :data:`NAMED_SIZES` like ``"720p"``.

    The one grammar of frame sizes: engine profiles (:func:`parse_shape`) and ``dereflect bench --sizes``
    read sizes with it. Sides are not range-checked here; the callers know their limits.
    """
    raw = str(text).strip().lower()
    if raw in NAMED_SIZES:
        return NAMED_SIZES[raw]
    match = re.fullmatch(r"(\d+)x(\d+)", raw)
    if not match:
        raise InputError(f"cannot read the size {text!r}: use HxW (720x1280) or one of {', '.join(NAMED_SIZES)}")
    return int(match.group(1)), int(match.group(2))


def parse_shape(text: str, channels: int, model_channels: Sequence[int] = ()) -> Shape:
    """Read one profile shape: ``"1x3x256x256"`` (NCHW), ``"256x320"`` (H x W) or a name like ``"720p"``.

    The result has the network input's own channel count (``channels``): one profile gives the
    frame size for every network, and RM2S stage 2 takes 9 channels at the image's size. So a
    4-part shape may give C as 3 (the image) or as the channel count of any input of the model
    (``model_channels``, besides ``channels``). N must be 1: the runtime runs one frame at a time.
    """
    parts = str(text).strip().lower().split("x")
    if len(parts) != 4:
        try:
            height, width = parse_frame_size(text)
        except InputError:
            raise InputError(f"cannot read the shape {text!r}: use HxW (720x1280), one of "
                             f"{', '.join(NAMED_SIZES)} or NxCxHxW (1x3x720x1280)") from None
        return (1, channels, height, width)
    try:
        batch, chans, height, width = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"cannot read the shape {text!r}: NxCxHxW takes four whole numbers, e.g. "
                         "1x3x720x1280") from None
    if batch != 1:
        raise InputError(f"shape {text!r} has batch {batch}; the TensorRT runtime runs one frame at a time, so "
                         "every profile shape has batch 1 (give HxW, e.g. 720x1280)")
    accepted = sorted({3, channels, *model_channels})
    if chans not in accepted:
        raise InputError(f"shape {text!r} has {chans} channels; this model's inputs take "
                         f"{' or '.join(str(c) for c in accepted)} (or give HxW: each input gets its own)")
    return (batch, channels, height, width)


def check_max_frame(shape: Sequence[int]) -> None:
    """InputError unless an input of shape ``shape`` (N, C, H, W) can reach the runtime.

    TensorRT takes tensors of fewer than 2**31 elements (``ITensor``'s documented limit), and the
    fused middle step refuses frames its 32-bit pixel index or grid cannot cover
    (:func:`dereflect.middle_step.cuda.check_frame_size`).
    """
    from .middle_step.cuda import check_frame_size

    batch, chans, height, width = (int(v) for v in shape)
    elements = batch * chans * height * width
    if elements >= MAX_TENSOR_ELEMENTS:
        raise InputError(f"{batch}x{chans}x{height}x{width} is {elements} elements; TensorRT takes tensors below "
                         f"2**31 elements: a {chans}-channel frame below {MAX_TENSOR_ELEMENTS // chans} pixels")
    check_frame_size(height, width, batch)


def derive_profile(
    channels: int,
    min_shape: Optional[str] = None,
    opt_shape: Optional[str] = None,
    max_shape: Optional[str] = None,
    model_channels: Sequence[int] = (),
) -> Dict[str, List[int]]:
    """An optimisation profile ``{"min": [N,C,H,W], "opt": ..., "max": ...}`` with min <= opt <= max.

    Missing bounds default to :data:`DEFAULT_PROFILE`; an ``opt`` outside the given bounds is a
    user error rather than something to clamp silently, and so is a ``max`` the runtime could never
    run (:func:`check_max_frame`). ``channels``/``model_channels`` as in :func:`parse_shape`.
    InputError names the option (``--min``, ``--opt``, ``--max``) that is wrong.
    """
    given = {"min": min_shape, "opt": opt_shape, "max": max_shape}
    shapes = {}
    for key, value in given.items():
        try:
            shapes[key] = parse_shape(value or DEFAULT_PROFILE[key], channels, model_channels)
        except InputError as exc:
            raise InputError(f"--{key}: {exc}") from None
    for key, shape in shapes.items():
        if min(shape) < 1:
            raise InputError(f"--{key} shape {list(shape)} has a dimension below 1")
    for low, high in (("min", "opt"), ("opt", "max")):
        if any(a > b for a, b in zip(shapes[low], shapes[high])):
            raise InputError(
                f"profile shapes must satisfy min <= opt <= max in every dimension; "
                f"--{low} {list(shapes[low])} exceeds --{high} {list(shapes[high])}"
            )
    try:
        check_max_frame(shapes["max"])
    except InputError as exc:
        raise InputError(f"--max: {exc}") from None
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
    #: the engine file's SHA-256 when it was built: an engine changed since is refused
    engine_sha256: str
    strongly_typed: bool = False
    float32_layers: int = 0
    #: the Jetson board it was built on (:func:`jetson_model`; None elsewhere): every Orin module reports
    #: the same GPU name and compute capability, so only this tells an AGX Orin's engine from a Nano's
    board: Optional[str] = None
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> Dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "format_version": SIDECAR_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> EngineInfo:
        """Validate a sidecar's parsed JSON; ModelError names the first field that is wrong."""
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise ModelError("not a dereflect engine sidecar (format field missing or wrong)")
        version = data.get("format_version")
        if not is_int(version) or version < 1:
            raise ModelError("engine sidecar field 'format_version' must be a whole number >= 1, "
                             f"got {show_value(version)}")
        if version > SIDECAR_FORMAT_VERSION:
            raise ModelError(f"engine sidecar format {version} is newer than this dereflect reads")
        names = set(cls.__dataclass_fields__)
        optional = {"strongly_typed", "float32_layers", "board", "created"}
        missing = sorted(n for n in names - optional if n not in data)
        if missing:
            raise ModelError(f"engine sidecar lacks {', '.join(missing)}; rebuild the engine with: "
                             "dereflect export engine DIR")
        _check_sidecar_fields(data)
        # Keys this version does not know (a newer writer's) are left out rather than refused.
        return cls(**{k: v for k, v in data.items() if k in names})


def _check_sidecar_fields(data: Dict[str, Any]) -> None:
    def wrong(name: str, what: str) -> ModelError:
        return ModelError(f"engine sidecar field {name!r} must be {what}, got {show_value(data[name])}")

    for name in ("network", "engine", "onnx", "onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability",
                 "precision", "engine_sha256", "created"):
        if name in data and not isinstance(data[name], str):
            raise wrong(name, "a string")
    # engine and onnx name files of the export directory (the engine builder writes bare names).
    for name in ("network", "engine", "onnx"):
        if not data[name] or data[name] in (".", "..") or "/" in data[name] or "\\" in data[name]:
            raise wrong(name, "a file name without a folder")
    if data["precision"] not in _PRECISIONS:
        raise wrong("precision", " or ".join(_PRECISIONS))
    if not SHA256_PATTERN.fullmatch(data["onnx_sha256"]):
        raise wrong("onnx_sha256", "a SHA-256 (64 lowercase hex digits)")
    if not SHA256_PATTERN.fullmatch(data["engine_sha256"]):
        # Without it an engine changed after it was built would load unnoticed.
        raise ModelError(f"engine sidecar field 'engine_sha256' must be the engine's SHA-256 (64 lowercase hex "
                         f"digits), got {show_value(data['engine_sha256'])}; rebuild the engine with: "
                         "dereflect export engine DIR")
    if data.get("board") is not None and not isinstance(data["board"], str):
        raise wrong("board", "a string or null")
    if "strongly_typed" in data and not isinstance(data["strongly_typed"], bool):
        raise wrong("strongly_typed", "true or false")
    if "float32_layers" in data and not (is_int(data["float32_layers"]) and data["float32_layers"] >= 0):
        raise wrong("float32_layers", "a whole number >= 0")
    profiles = data["profiles"]
    if not isinstance(profiles, dict):
        raise wrong("profiles", "an object {input: {min: [N, C, H, W], opt: [...], max: [...]}}")
    for input_name, profile in profiles.items():
        where = f"profiles[{show_value(input_name)}]"
        if not isinstance(profile, dict) or sorted(profile) != ["max", "min", "opt"]:
            raise ModelError(f"engine sidecar field {where} must be an object with exactly min, opt and max")
        for bound in ("min", "opt", "max"):
            shape = profile[bound]
            if not (isinstance(shape, list) and len(shape) == 4 and all(is_int(d) and d >= 1 for d in shape)):
                raise ModelError(f"engine sidecar field {where}[{bound!r}] must be 4 whole numbers >= 1 "
                                 f"(N, C, H, W), got {show_value(shape)}")
        if any(a > b for low, high in (("min", "opt"), ("opt", "max")) for a, b in zip(profile[low], profile[high])):
            raise ModelError(f"engine sidecar field {where} must satisfy min <= opt <= max in every dimension")


def write_engine_info(info: EngineInfo, path: os.PathLike) -> Path:
    """Write a sidecar atomically (temporary file, then rename)."""
    path = Path(path)
    with staged_file(path) as staged:
        staged.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    return path


def read_engine_info(path: os.PathLike) -> EngineInfo:
    """Read and validate a sidecar; ModelError names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"engine sidecar not found: {path}; "
            "build the engine on this device with: dereflect export engine DIR"
        )
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SIDECAR_BYTES + 1)  # bounded: a huge file is never read whole
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the engine sidecar: {exc}") from exc
    if len(raw) > MAX_SIDECAR_BYTES:
        raise ModelError(f"{path} is not a valid engine sidecar: larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not a valid engine sidecar: {exc}") from exc
    except RecursionError:
        raise ModelError(f"{path} is not a valid engine sidecar: its JSON nests too deeply") from None
    try:
        return EngineInfo.from_dict(data)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def engines_precision(infos: Iterable[EngineInfo]) -> str:
    """The precision a model's engines run at, as one word: fp16 if any engine is, else fp32."""
    return "fp16" if any(info.precision == "fp16" for info in infos) else "fp32"


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
    board: Optional[str] = None,
) -> None:
    """Raise ModelError unless the engine was built by this TensorRT, for this GPU (and Jetson board), from
    this ONNX file.

    A GPU name or compute capability reported as ``"unknown"`` on either side is not compared
    (TensorRT itself then refuses a wrong engine at deserialisation), nor a board either side does not
    know (not a Jetson, or a sidecar from before boards were recorded).
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
    if info.board and board and info.board != board:
        raise ModelError(f"engine {info.engine} was built on a {info.board!r} but this board is a {board!r} (the "
                         f"same GPU name, but other SM counts and clocks the engine was tuned for); {rebuild}")
    if info.onnx_sha256 != onnx_sha256:
        raise ModelError(
            f"engine {info.engine} was built from another ONNX file than {info.onnx} in this export "
            f"(SHA-256 {info.onnx_sha256[:12]}... vs {onnx_sha256[:12]}...); {rebuild}"
        )


#: Where a Jetson's device tree names its board.
DEVICE_TREE_MODEL = (Path("/proc/device-tree/model"), Path("/sys/firmware/devicetree/base/model"))


def jetson_model() -> Optional[str]:
    """The board name a Jetson's device tree gives ('NVIDIA Jetson AGX Orin Developer Kit'), else None."""
    for path in DEVICE_TREE_MODEL:
        try:
            return path.read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip() or None
        except OSError:
            continue
    return None


#: Where Linux reports the memory it has (a Jetson's GPU shares it).
MEMINFO = Path("/proc/meminfo")


def system_memory_gib() -> Optional[float]:
    """MemTotal of /proc/meminfo in GiB (on a Jetson: the module's memory less its carve-outs), else None."""
    try:
        for line in MEMINFO.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemTotal" and value.split():
                return int(value.split()[0]) / 2**20  # kB
    except (OSError, ValueError):
        return None
    return None


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

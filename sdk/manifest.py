"""The export manifest: what an export directory holds and how to run it, validated on reading.

An export directory (written by ``dereflect export onnx``) contains ``manifest.json`` and one
ONNX file per network (plus FP16 ONNX files, golden test data and TensorRT engines). The
runtime reads only this manifest and the files it names, so it needs no torch.

Manifest (format_version 1)::

    {
      "format": "dereflect-export", "format_version": 1,
      "method": "rm2s" | "crrn",
      "name": "rm2s-lite",
      "networks": {
        "stage1": {
          "onnx": "stage1.onnx", "sha256": "...",
          "onnx_fp16": "stage1.fp16.onnx", "sha256_fp16": "...",      (optional)
          "inputs":  [{"name": "image", "channels": 3, "layout": "NCHW", "dtype": "float32",
                       "range": [0, 1]}],
          "outputs": [{"name": "background", "channels": 3, "layout": "NCHW", "dtype": "float32",
                       "range": [0, 1]}],
          "stride": 32, "min_size": 128, "padding": "inside"
        },
        "stage2": {...}
      },
      "middle_step": {"c1": 0.5, "c2": 0.5, "gradient_threshold": 1.0, "epsilon": 1e-7},  (rm2s)
      "colour_order": "RGB",
      "max_side": 224,                       (optional: the longest side the networks are meant to run at)
      "checkpoint": {"file": "...", "sha256": "...", "metadata": {...}},
      "golden": {"stage1": {"file": "golden/stage1.npz", "sha256": "..."}, ...},
      "fp16": {...}, "parity": {...}, "tensorrt_check": {...}, "export": {...},   (records of the export)
      "dereflect_version": "0.1.0", "created": "..."
    }

The networks, their tensor names and channels, and the settings section come from the method
module (:mod:`dereflect.methods`): a manifest that disagrees with its method is refused. Every
file name must stay inside the export directory (no absolute paths, no ``..``, no symlink
leading out). Problems raise :class:`~dereflect.errors.ModelError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from dereflect.errors import DereflectError, InputError, ModelError
from dereflect.imageio import staged_file

FORMAT = "dereflect-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: A manifest is a few kilobytes; anything far larger is not one.
MAX_MANIFEST_BYTES = 4 << 20
#: A SHA-256 digest as the files record it: 64 lower-case hex digits.
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
#: The smallest side the networks may be asked to run at (a manifest's or a checkpoint's ``max_side``,
#: ``export onnx --max-side``, a Remover's ``max_side``, ``train --val-max-side``; all checked by
#: :func:`check_max_side`): below it a U-Net's deepest level is a pixel or two wide.
MIN_MAX_SIDE = 32
#: The side the runtime runs a model's networks at when its manifest (or checkpoint) records none.
DEFAULT_MAX_SIDE = 1024
_RECORDS = ("fp16", "parity", "tensorrt_check", "export")


def is_int(value: Any) -> bool:
    """Whether a value read from JSON is a whole number (``True`` and ``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def show_value(value: Any, limit: int = 60) -> str:
    """``repr`` of a value from a file, cut short so that a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_max_side(value: Any, what: str = "max_side", error: Type[DereflectError] = InputError,
                   no_limit: bool = False) -> Optional[int]:
    """``value`` as the longest side the networks may run at: a whole number of pixels, at least
    :data:`MIN_MAX_SIDE`.

    With ``no_limit`` (a Remover's ``max_side``), 0 or None means no limit and gives None. Anything else
    raises ``error`` (InputError for what a caller passed, ModelError for what a file holds) naming ``what``.
    """
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if no_limit and (value is None or (whole and value == 0)):
        return None
    if whole and value >= MIN_MAX_SIDE:
        return int(value)
    unlimited = " (or 0 / None for no limit)" if no_limit else ""
    raise error(f"{what} must be a whole number of pixels, at least {MIN_MAX_SIDE}{unlimited}, "
                f"got {show_value(value)}")


def sha256_file(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inside(directory: Path, relative: Any, what: str) -> Path:
    """``directory / relative`` after checking it names a file that stays inside ``directory``.

    Refuses absolute paths, ``..`` parts, backslashes and symlinks (anywhere along the path)
    that lead out of the directory: an export directory may only run its own files.
    """
    if not isinstance(relative, str) or not relative:
        raise ModelError(f"{what}: a file name must be a non-empty string, got {relative!r}")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or "\\" in relative or ".." in pure.parts or re.match(r"^[A-Za-z]:", relative):
        raise ModelError(f"{what}: {relative!r} is not a plain relative path inside the export directory")
    path = directory / relative
    root = directory.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ModelError(f"{what}: {relative!r} leads outside the export directory ({resolved})")
    return path


def _string(data: Mapping[str, Any], key: str, where: str, default: Optional[str] = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ModelError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _integer(data: Mapping[str, Any], key: str, where: str, default: int, low: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ModelError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
    return value


def _hash(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise ModelError(f"{where}: {key} must be a SHA-256 hex digest, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ModelError(f"{where} must be an object, got {type(value).__name__}")
    return value


@dataclass
class TensorSpec:
    name: str
    channels: int
    layout: str = "NCHW"
    dtype: str = "float32"
    value_range: Tuple[float, float] = (0.0, 1.0)

    @classmethod
    def from_dict(cls, data: Any, where: str = "tensor") -> TensorSpec:
        data = _mapping(data, where)
        value_range = data.get("range", (0.0, 1.0))
        if (not isinstance(value_range, (list, tuple)) or len(value_range) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in value_range) or value_range[0] >= value_range[1]):
            raise ModelError(f"{where}: range must be [low, high] with low < high, got {value_range!r}")
        layout = _string(data, "layout", where, "NCHW")
        dtype = _string(data, "dtype", where, "float32")
        if layout != "NCHW" or dtype not in ("float32", "float16"):
            raise ModelError(f"{where}: layout must be NCHW and dtype float32 or float16, got {layout}, {dtype}")
        return cls(name=_string(data, "name", where), channels=_integer(data, "channels", where, 0, 1),
                   layout=layout, dtype=dtype, value_range=(float(value_range[0]), float(value_range[1])))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "channels": self.channels,
            "layout": self.layout,
            "dtype": self.dtype,
            "range": list(self.value_range),
        }


@dataclass
class NetworkSpec:
    name: str
    onnx: str
    sha256: str
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    stride: int = 32
    min_size: int = 0
    onnx_fp16: Optional[str] = None
    sha256_fp16: Optional[str] = None

    @classmethod
    def from_dict(cls, name: str, data: Any, directory: Path) -> NetworkSpec:
        where = f"network {name!r}"
        data = _mapping(data, where)
        onnx = _string(data, "onnx", where)
        inside(directory, onnx, f"{where} onnx")
        onnx_fp16, sha_fp16 = data.get("onnx_fp16"), None
        if onnx_fp16 is not None:
            inside(directory, onnx_fp16, f"{where} onnx_fp16")
            sha_fp16 = _hash(data, "sha256_fp16", where)
        lists = {}
        for key in ("inputs", "outputs"):
            value = data.get(key)
            if not isinstance(value, list) or not value:
                raise ModelError(f"{where}: {key} must be a non-empty list")
            lists[key] = [TensorSpec.from_dict(t, f"{where} {key}[{i}]") for i, t in enumerate(value)]
        return cls(name=name, onnx=onnx, sha256=_hash(data, "sha256", where), inputs=lists["inputs"],
                   outputs=lists["outputs"], stride=_integer(data, "stride", where, 32, 1),
                   min_size=_integer(data, "min_size", where, 0, 0), onnx_fp16=onnx_fp16, sha256_fp16=sha_fp16)

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "onnx": self.onnx,
            "sha256": self.sha256,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "stride": self.stride,
            "min_size": self.min_size,
            "padding": "inside",
        }
        if self.onnx_fp16:
            data["onnx_fp16"] = self.onnx_fp16
            data["sha256_fp16"] = self.sha256_fp16
        return data


@dataclass
class Manifest:
    """An export directory's manifest. ``settings`` is the method's section (RM2S: ``middle_step``);
    ``records`` the export's own records (golden files, FP16 plan, parity, TensorRT check, versions)."""

    method: str
    name: str
    networks: Dict[str, NetworkSpec]
    directory: Path
    settings: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Dict[str, Any] = field(default_factory=dict)
    colour_order: str = "RGB"
    records: Dict[str, Any] = field(default_factory=dict)
    #: the longest side the networks are meant to run at (the size the model was trained to see);
    #: larger frames are scaled down and the result guided back up. None: the runtime's default.
    max_side: Optional[int] = None

    def path_of(self, network: str, fp16: bool = False) -> Path:
        spec = self.networks[network]
        filename = spec.onnx_fp16 if fp16 else spec.onnx
        if not filename:
            raise ModelError(
                f"{self.directory}: network {network!r} has no FP16 ONNX file; export the checkpoint again "
                "(dereflect export onnx writes one unless --no-fp16) or run it in FP32 (remove and video: "
                "--precision fp32; export verify: without --fp16)"
            )
        path = inside(self.directory, filename, f"network {network!r}")
        if not path.is_file():
            other = spec.onnx if fp16 else spec.onnx_fp16
            hint = ""
            if other and inside(self.directory, other, f"network {network!r}").is_file():
                kept = "fp32" if fp16 else "fp16"
                hint = (f"; this export keeps only its {kept.upper()} file: run it with --precision {kept} "
                        f"(precision=\"{kept}\" from Python)")
            raise ModelError(f"{self.directory}: network {network!r}: file {filename} is missing{hint}")
        return path

    def golden_path(self, network: str) -> Tuple[Path, str]:
        """The golden file of ``network`` and its recorded SHA-256."""
        entry = (self.records.get("golden") or {}).get(network)
        if not entry:
            raise ModelError(
                f"{self.directory}: the manifest lists no golden file for {network!r}; export the checkpoint "
                "again without --no-golden to create them"
            )
        return inside(self.directory, entry["file"], f"golden {network!r}"), entry["sha256"]

    def to_dict(self) -> Dict[str, Any]:
        from dereflect.methods.base import get_method

        data: Dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "name": self.name,
            "networks": {name: spec.to_dict() for name, spec in self.networks.items()},
            "colour_order": self.colour_order,
            "checkpoint": self.checkpoint,
        }
        key = get_method(self.method).settings_key
        if key:
            data[key] = dict(self.settings)
        if self.max_side is not None:
            data["max_side"] = self.max_side
        data.update(self.records)
        return data

    def save(self) -> Path:
        path = self.directory / MANIFEST_NAME
        with staged_file(path) as staged:
            staged.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def verify_files(self, fp16: Optional[bool] = False) -> None:
        """Check that every ONNX file named (the FP16 ones with ``fp16``) exists and has the recorded hash.

        ``fp16=None``, as a model is opened: each network needs its FP32 or its FP16 file (a device
        may keep only the precision it runs), and every one present must have its hash.
        """
        for name, spec in self.networks.items():
            files = [(spec.onnx_fp16, spec.sha256_fp16)] if fp16 else [(spec.onnx, spec.sha256)]
            if fp16 is None:
                files = [(f, h) for f, h in ((spec.onnx, spec.sha256), (spec.onnx_fp16, spec.sha256_fp16)) if f]
                present = [(f, h) for f, h in files if inside(self.directory, f, f"network {name!r}").is_file()]
                files = present or files[:1]  # none present: the FP32 file is reported missing
            for filename, expected in files:
                if filename:
                    self._verify_file(name, filename, expected)

    def _verify_file(self, name: str, filename: str, expected: Optional[str]) -> None:
        path = inside(self.directory, filename, f"network {name!r}")
        if not path.is_file():
            raise ModelError(f"{self.directory}: network {name!r}: file {filename} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(
                f"{path}: SHA-256 {actual[:12]}... does not match the manifest ({str(expected)[:12]}...); "
                "the file was changed or replaced after export"
            )


def _read_json(path: Path) -> Dict[str, Any]:
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelError(f"{path} is {path.stat().st_size:,} bytes, too large for a manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ModelError(f"{path} is nested too deeply to be a manifest") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{path} is not a dereflect export manifest")
    return data


def _check_contract(manifest: Manifest, path: Path) -> None:
    """The networks and tensors must be those of the manifest's method."""
    from dereflect.methods.base import get_method

    method = get_method(manifest.method)
    if set(manifest.networks) != set(method.network_names):
        raise ModelError(f"{path}: method {method.name} runs networks {list(method.network_names)}, the manifest "
                         f"lists {sorted(manifest.networks)}")
    for contract in method.networks:
        spec = manifest.networks[contract.name]
        wanted_in = (contract.input.name, contract.input.channels)
        if [(t.name, t.channels) for t in spec.inputs] != [wanted_in]:
            raise ModelError(f"{path}: network {contract.name!r} must take {wanted_in[0]} with {wanted_in[1]} "
                             f"channels, the manifest says {[(t.name, t.channels) for t in spec.inputs]}")
        wanted_out = [(t.name, t.channels) for t in contract.outputs]
        if [(t.name, t.channels) for t in spec.outputs] != wanted_out:
            raise ModelError(f"{path}: network {contract.name!r} must give {wanted_out}, the manifest says "
                             f"{[(t.name, t.channels) for t in spec.outputs]}")


def load_manifest(directory: os.PathLike, check_hashes: bool = True) -> Manifest:
    """Read and validate ``directory/manifest.json``; raise ModelError naming what is wrong."""
    from dereflect.methods.base import METHODS, get_method

    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if directory.is_file() and directory.name == MANIFEST_NAME:
        directory, path = directory.parent, directory
    if not directory.is_dir():
        raise ModelError(f"export directory not found: {directory}")
    if not path.is_file():
        raise ModelError(
            f"{directory} is not a dereflect export directory (no {MANIFEST_NAME}); "
            "create one with: dereflect export onnx CHECKPOINT -o DIR"
        )
    data = _read_json(path)
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelError(f"{path}: manifest format {version} is newer than this dereflect reads ({FORMAT_VERSION})")
    method_name = data.get("method")
    if not isinstance(method_name, str) or method_name not in METHODS or not get_method(method_name).exportable:
        raise ModelError(f"{path}: unknown method {method_name!r} (known: rm2s, crrn)")
    method = get_method(method_name)
    raw_networks = _mapping(data.get("networks"), f"{path}: networks")
    networks = {str(name): NetworkSpec.from_dict(str(name), raw, directory) for name, raw in raw_networks.items()}
    colour_order = _string(data, "colour_order", str(path), "RGB")
    if colour_order.upper() != "RGB":
        raise ModelError(f"{path}: networks taking {colour_order} are not supported (RGB only)")
    records: Dict[str, Any] = {}
    golden = data.get("golden")
    if golden is not None:
        for network, entry in _mapping(golden, f"{path}: golden").items():
            entry = _mapping(entry, f"{path}: golden {network!r}")
            inside(directory, entry.get("file"), f"golden {network!r}")
            _hash(entry, "sha256", f"{path}: golden {network!r}")
        records["golden"] = dict(golden)
    for key in _RECORDS:
        if key in data:
            records[key] = dict(_mapping(data[key], f"{path}: {key}"))
    for key in ("dereflect_version", "created"):
        if key in data:
            records[key] = _string(data, key, str(path))
    settings = data.get(method.settings_key) if method.settings_key else None
    max_side = check_max_side(data["max_side"], f"{path}: max_side", ModelError) if "max_side" in data else None
    manifest = Manifest(
        method=method_name,
        name=_string(data, "name", str(path), method_name),
        networks=networks,
        directory=directory,
        settings=dict(_mapping(settings, f"{path}: {method.settings_key}")) if settings is not None else {},
        checkpoint=dict(_mapping(data.get("checkpoint") or {}, f"{path}: checkpoint")),
        colour_order="RGB",
        records=records,
        max_side=max_side,
    )
    _check_contract(manifest, path)
    method.settings(manifest.settings)  # validates the section now, not at the first frame
    if check_hashes:
        manifest.verify_files(fp16=None)
    return manifest

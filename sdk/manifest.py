"""The export manifest: what an export directory holds and how to run it.

An export directory (written by ``dereflect export onnx``) contains ``manifest.json`` and one
ONNX file per network (plus optional FP16 ONNX files, golden test data and TensorRT engines).
The runtime reads only this manifest and the files it names, so it needs no torch.

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
        "stage2": {...}                      (rm2s: input "stage2_input", 9 channels)
      },
      "middle_step": {"c1": 0.5, "c2": 0.5, "gradient_threshold": 1.0, "epsilon": 1e-7},  (rm2s)
      "colour_order": "RGB",
      "checkpoint": {"sha256": "...", "metadata": {...}},
      "dereflect_version": "0.1.0", "created": "..."
    }

RM2S runs ``stage1`` then the middle step then ``stage2``; CRRN runs one network ``crrn``
whose outputs are ``background``, ``reflection`` and ``gradient``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import ModelError

FORMAT = "dereflect-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
METHOD_NETWORKS = {"rm2s": ("stage1", "stage2"), "crrn": ("crrn",)}
DEFAULT_MIDDLE_STEP = {"c1": 0.5, "c2": 0.5, "gradient_threshold": 1.0, "epsilon": 1e-7}


def sha256_file(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TensorSpec:
    name: str
    channels: int
    layout: str = "NCHW"
    dtype: str = "float32"
    value_range: Tuple[float, float] = (0.0, 1.0)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            channels=int(data["channels"]),
            layout=str(data.get("layout", "NCHW")),
            dtype=str(data.get("dtype", "float32")),
            value_range=tuple(data.get("range", (0.0, 1.0))),
        )

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
    def from_dict(cls, name: str, data: Dict[str, Any]) -> NetworkSpec:
        return cls(
            name=name,
            onnx=str(data["onnx"]),
            sha256=str(data["sha256"]),
            inputs=[TensorSpec.from_dict(d) for d in data["inputs"]],
            outputs=[TensorSpec.from_dict(d) for d in data["outputs"]],
            stride=int(data.get("stride", 32)),
            min_size=int(data.get("min_size", 0)),
            onnx_fp16=data.get("onnx_fp16"),
            sha256_fp16=data.get("sha256_fp16"),
        )

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
    method: str
    name: str
    networks: Dict[str, NetworkSpec]
    directory: Path
    middle_step: Dict[str, float] = field(default_factory=dict)
    checkpoint: Dict[str, Any] = field(default_factory=dict)
    colour_order: str = "RGB"
    extra: Dict[str, Any] = field(default_factory=dict)

    def path_of(self, network: str, fp16: bool = False) -> Path:
        spec = self.networks[network]
        filename = spec.onnx_fp16 if fp16 else spec.onnx
        if not filename:
            raise ModelError(f"{self.directory}: network {network!r} has no FP16 ONNX file; re-export with --fp16")
        return self.directory / filename

    def to_dict(self) -> Dict[str, Any]:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "name": self.name,
            "networks": {name: spec.to_dict() for name, spec in self.networks.items()},
            "colour_order": self.colour_order,
            "checkpoint": self.checkpoint,
        }
        if self.method == "rm2s":
            data["middle_step"] = {**DEFAULT_MIDDLE_STEP, **self.middle_step}
        data.update(self.extra)
        return data

    def save(self) -> Path:
        path = self.directory / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def verify_files(self, fp16: bool = False) -> None:
        """Check that every ONNX file named exists and has the recorded hash."""
        for name, spec in self.networks.items():
            filename, expected = (spec.onnx_fp16, spec.sha256_fp16) if fp16 else (spec.onnx, spec.sha256)
            if not filename:
                continue
            path = self.directory / filename
            if not path.is_file():
                raise ModelError(f"{self.directory}: network {name!r}: file {filename} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise ModelError(
                    f"{path}: SHA-256 {actual[:12]}... does not match the manifest ({str(expected)[:12]}...); "
                    "the file was changed or replaced after export"
                )


def load_manifest(directory: os.PathLike, check_hashes: bool = True) -> Manifest:
    """Read and validate ``directory/manifest.json``; raise ModelError naming what is wrong."""
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
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{path} is not a dereflect export manifest")
    if int(data.get("format_version", -1)) > FORMAT_VERSION:
        raise ModelError(f"{path}: manifest format {data.get('format_version')} is newer than this dereflect reads")
    method = data.get("method")
    if method not in METHOD_NETWORKS:
        raise ModelError(f"{path}: unknown method {method!r} (known: {', '.join(METHOD_NETWORKS)})")
    raw_networks = data.get("networks") or {}
    missing = [n for n in METHOD_NETWORKS[method] if n not in raw_networks]
    if missing:
        raise ModelError(f"{path}: method {method} needs networks {missing} which the manifest lacks")
    try:
        networks = {name: NetworkSpec.from_dict(name, raw) for name, raw in raw_networks.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed network entry: {exc!r}") from exc
    known = {"format", "format_version", "method", "name", "networks", "middle_step", "colour_order",
             "checkpoint"}
    manifest = Manifest(
        method=method,
        name=str(data.get("name", method)),
        networks=networks,
        directory=directory,
        middle_step={**DEFAULT_MIDDLE_STEP, **(data.get("middle_step") or {})} if method == "rm2s" else {},
        checkpoint=data.get("checkpoint") or {},
        colour_order=str(data.get("colour_order", "RGB")),
        extra={k: v for k, v in data.items() if k not in known},
    )
    if check_hashes:
        manifest.verify_files()
    return manifest

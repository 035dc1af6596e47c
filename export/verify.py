"""Golden files written at export time, and ``dereflect export verify`` on the target device.

At export, each network runs with ONNX Runtime (CPU, FP32 ONNX) on a few deterministic,
procedurally generated natural-looking images (no third-party images); inputs and outputs go
to ``golden/<network>.npz``. RM2S stage 2's golden inputs are built from stage 1's outputs by
the runtime's own middle step, so they look like what stage 2 sees in use.

``verify(export_dir, backend)`` runs the networks on those inputs with ONNX Runtime (the
FP32 or FP16 files) or with the TensorRT engines built on this device, and compares: PSNR and
largest error per network and output, against thresholds that depend on the precision.
A TensorRT engine is refused before it is loaded if its sidecar names another TensorRT
version, another GPU or another ONNX file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from dereflect.errors import InputError, ModelError, require
from dereflect.manifest import Manifest, TensorSpec, load_manifest, sha256_file
from dereflect.tools.metrics import psnr
from dereflect.trt_api import (
    check_engine_compatible,
    engine_paths,
    gpu_info,
    read_engine_info,
    shape_in_profile,
)

GOLDEN_DIR = "golden"
#: (N, H, W) of the golden cases: sides that are not multiples of 32, inside the default
#: TensorRT profile (at least 128, see dereflect.trt_api.DEFAULT_PROFILE).
GOLDEN_SHAPES = ((1, 144, 256), (1, 130, 174))
#: Pass thresholds per (backend, precision): worst PSNR in dB and largest error as a fraction
#: of the output's value range (None: not checked).
THRESHOLDS: Dict[Tuple[str, str], Tuple[float, Optional[float]]] = {
    ("onnxruntime", "fp32"): (80.0, 1e-4),
    ("onnxruntime", "fp16"): (45.0, None),
    ("tensorrt", "fp32"): (50.0, None),
    ("tensorrt", "fp16"): (40.0, None),
}


# --- deterministic natural-looking images -------------------------------------------------------

def _smooth_field(rng: np.random.Generator, height: int, width: int, channels: int,
                  octaves: int) -> np.ndarray:
    # Noise with most energy at low frequencies (about 1/f, like photographs): random grids
    # from coarse to fine, upsampled and summed with halving amplitude.
    total = np.zeros((height, width, channels), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        cells = 2 ** (octave + 1) + 1
        grid = rng.standard_normal((cells, cells, channels)).astype(np.float32)
        up = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amplitude * up.reshape(height, width, channels)
        amplitude *= 0.5
    return total


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One HxWx3 scene: shaded background, overlapping objects with soft or hard edges, grain."""
    img = rng.uniform(0.2, 0.8, 3).astype(np.float32) + 0.12 * _smooth_field(rng, height, width, 3, 5)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.cos(angle) * xx / width + np.sin(angle) * yy / height - 0.5
    img += 0.25 * ramp[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    scale = max(height, width)
    for _ in range(int(rng.integers(6, 14))):
        grey = rng.uniform(0.0, 1.0)
        colour = tuple(float(0.6 * c + 0.4 * grey) for c in rng.uniform(0.0, 1.0, 3))
        layer = np.zeros((height, width, 3), np.float32)
        cx, cy = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        if rng.uniform() < 0.5:
            axes = tuple(max(1, int(rng.uniform(0.03, 0.25) * scale)) for _ in range(2))
            cv2.ellipse(layer, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        else:
            w, h = int(rng.uniform(0.05, 0.4) * width), int(rng.uniform(0.05, 0.4) * height)
            cv2.rectangle(layer, (cx, cy), (cx + w, cy + h), colour, -1, cv2.LINE_AA)
        mask = (layer.max(axis=2, keepdims=True) > 0).astype(np.float32)
        sigma = float(rng.uniform(0.0, 1.5))
        if sigma > 0.3:
            mask = cv2.GaussianBlur(mask, (0, 0), sigma).reshape(height, width, 1)
            layer = cv2.GaussianBlur(layer, (0, 0), sigma)
        shade = 1.0 + 0.15 * _smooth_field(rng, height, width, 1, 3)
        img = img * (1.0 - mask) + layer * shade * mask
    grain = rng.standard_normal((height, width, 3)).astype(np.float32) * 0.02
    img += grain * (0.5 + np.abs(_smooth_field(rng, height, width, 1, 2)))
    return np.clip(img, 0.0, 1.0)


def natural_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` deterministic photo-like images (N, 3, H, W) float32 in [0, 1], each a scene seen
    through glass: a second, blurred scene added as a reflection."""
    if count < 1 or height < 1 or width < 1:
        raise InputError(f"natural_images needs positive count and size, got {count}, {height}x{width}")
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, height, width), np.float32)
    for i in range(count):
        background = _scene(rng, height, width)
        reflection = cv2.GaussianBlur(_scene(rng, height, width), (0, 0), float(rng.uniform(0.5, 3.0)))
        weight = float(rng.uniform(0.1, 0.35))
        out[i] = np.clip(background * (1.0 - 0.5 * weight) + weight * reflection, 0.0, 1.0).transpose(2, 0, 1)
    return out


# --- network inputs along a method's pipeline -----------------------------------------------------

Infer = Callable[[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]]


def stage2_inputs(images: np.ndarray, stage1: np.ndarray, c1: float = 0.5, c2: float = 0.5) -> np.ndarray:
    """RM2S stage-2 inputs (N, 9, H, W) from images and stage-1 outputs, by the runtime's middle step."""
    from dereflect.middle_step.cpu import middle_step_cpu

    out = np.empty((images.shape[0], 9) + images.shape[2:], np.float32)
    for i in range(images.shape[0]):
        result = middle_step_cpu(images[i].transpose(1, 2, 0), stage1[i].transpose(1, 2, 0), c1, c2)
        out[i] = result.stage2_input.transpose(2, 0, 1)
    return out


def pipeline_feeds(manifest: Manifest, images: np.ndarray, infer: Infer) -> Dict[str, Dict[str, np.ndarray]]:
    """Each network's input feed for ``images``, following the method's pipeline.

    ``infer(network, feed)`` runs an earlier network (RM2S stage 1 feeds the middle step).
    """
    if manifest.method == "rm2s":
        feed1 = {manifest.networks["stage1"].inputs[0].name: images}
        background = infer("stage1", feed1)[manifest.networks["stage1"].outputs[0].name]
        step = manifest.middle_step
        second = stage2_inputs(images, background, step.get("c1", 0.5), step.get("c2", 0.5))
        return {"stage1": feed1, "stage2": {manifest.networks["stage2"].inputs[0].name: second}}
    return {name: {spec.inputs[0].name: images} for name, spec in manifest.networks.items()}


def golden_images() -> List[np.ndarray]:
    """The golden cases' images (one array per case)."""
    return [natural_images(n, h, w, seed=100 + i) for i, (n, h, w) in enumerate(GOLDEN_SHAPES)]


def _case_key(case: int, kind: str, name: str) -> str:
    return f"case{case}.{kind}.{name}"


def ort_infer(manifest: Manifest, fp16: bool = False) -> Infer:
    """An ``infer`` function running the export's ONNX files with ONNX Runtime on the CPU."""
    from dereflect.backends.onnxruntime import OnnxRuntimeRunner

    runners: Dict[str, OnnxRuntimeRunner] = {}

    def infer(network: str, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if network not in runners:
            path = manifest.path_of(network, fp16=fp16)
            runners[network] = OnnxRuntimeRunner(path, device="cpu", name=network).activate()
        return runners[network].infer(feed)

    return infer


def write_goldens(manifest: Manifest) -> Dict[str, Dict[str, str]]:
    """Write ``golden/<network>.npz`` (inputs and FP32 ONNX Runtime outputs) into the export directory.

    Returns ``{network: {"file": ..., "sha256": ...}}`` for the manifest.
    """
    infer = ort_infer(manifest)
    cases: Dict[str, Dict[str, np.ndarray]] = {name: {} for name in manifest.networks}
    for case, images in enumerate(golden_images()):
        for network, feed in pipeline_feeds(manifest, images, infer).items():
            for name, value in feed.items():
                cases[network][_case_key(case, "in", name)] = value
            for name, value in infer(network, feed).items():
                cases[network][_case_key(case, "out", name)] = value
    (manifest.directory / GOLDEN_DIR).mkdir(exist_ok=True)
    record = {}
    for network, arrays in cases.items():
        relative = f"{GOLDEN_DIR}/{network}.npz"
        np.savez_compressed(manifest.directory / relative, **arrays)
        record[network] = {"file": relative, "sha256": sha256_file(manifest.directory / relative)}
    return record


Case = Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]


def load_goldens(manifest: Manifest, network: str) -> List[Case]:
    """The golden (inputs, outputs) cases of ``network``, after checking the file's hash."""
    entry = (manifest.extra.get("golden") or {}).get(network)
    if not entry:
        raise ModelError(
            f"{manifest.directory}: the manifest lists no golden file for {network!r}; "
            "re-export without --no-golden to create them"
        )
    path = manifest.directory / entry["file"]
    if not path.is_file():
        raise ModelError(f"golden file missing: {path}")
    if sha256_file(path) != entry["sha256"]:
        raise ModelError(f"{path} does not match the SHA-256 in the manifest; it was changed after export")
    cases: Dict[int, Case] = {}
    with np.load(path) as data:
        for key in data.files:
            case, kind, name = key.split(".", 2)
            index = int(case[len("case"):])
            inputs, outputs = cases.setdefault(index, ({}, {}))
            (inputs if kind == "in" else outputs)[name] = data[key]
    return [cases[i] for i in sorted(cases)]


# --- comparison -----------------------------------------------------------------------------------

def data_range(spec: TensorSpec) -> float:
    low, high = spec.value_range
    span = float(high) - float(low)
    return span if span > 0 else 1.0


@dataclass
class VerifyRow:
    network: str
    case: int
    shape: Tuple[int, ...]
    output: str
    psnr_db: float
    max_error: float
    passed: bool
    note: str = ""


@dataclass
class VerifyReport:
    """Per network, case and output: PSNR, largest error (fraction of the value range), pass/fail."""

    backend: str
    precision: str
    min_psnr_db: float
    max_error: Optional[float]
    rows: List[VerifyRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        ran = [r for r in self.rows if not r.note]
        return bool(ran) and all(r.passed for r in ran)

    def format(self) -> str:
        limit = f"PSNR >= {self.min_psnr_db:g} dB"
        if self.max_error is not None:
            limit += f", max error <= {self.max_error:g} of the range"
        lines = [f"verify: {self.backend} {self.precision} against the FP32 ONNX Runtime goldens ({limit})",
                 f"{'network':<10} {'case':<5} {'input shape':<18} {'output':<12} {'PSNR dB':>9} "
                 f"{'max err':>10}  result"]
        for r in self.rows:
            if r.note:
                lines.append(f"{r.network:<10} {r.case:<5} {str(list(r.shape)):<18} {r.output:<12} "
                             f"{'':>9} {'':>10}  skipped: {r.note}")
                continue
            lines.append(f"{r.network:<10} {r.case:<5} {str(list(r.shape)):<18} {r.output:<12} "
                         f"{r.psnr_db:>9.2f} {r.max_error:>10.2e}  {'pass' if r.passed else 'FAIL'}")
        lines.append("result: " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)


def _tensorrt_runner(manifest: Manifest, network: str):
    """A TensorRT runner for ``network`` after checking its sidecar against this device."""
    from dereflect.backends.base import get_runner

    trt = require("tensorrt", "trt", "verifying TensorRT engines")
    engine_path, sidecar_path = engine_paths(manifest.directory, network)
    if not engine_path.is_file():
        raise ModelError(f"no engine for {network!r} at {engine_path}; "
                         "build it with: dereflect export engine DIR")
    info = read_engine_info(sidecar_path)
    spec = manifest.networks[network]
    hashes = {spec.onnx: spec.sha256}
    if spec.onnx_fp16:
        hashes[spec.onnx_fp16] = spec.sha256_fp16 or ""
    if info.onnx not in hashes:
        raise ModelError(f"engine {engine_path.name} was built from {info.onnx}, "
                         "which this export does not list")
    gpu_name, capability = gpu_info()
    check_engine_compatible(info, trt.__version__, gpu_name, capability, hashes[info.onnx])
    if info.engine_sha256 and sha256_file(engine_path) != info.engine_sha256:
        raise ModelError(f"{engine_path} does not match the SHA-256 in its sidecar; rebuild it")
    return get_runner("tensorrt", engine_path).activate(), info


def verify(
    export_dir: str,
    backend: str = "onnxruntime",
    fp16: bool = False,
    networks: Optional[Sequence[str]] = None,
) -> VerifyReport:
    """Run an export's networks on its golden inputs and compare with the golden outputs.

    ``backend="onnxruntime"`` runs the FP32 files (or the FP16 files with ``fp16=True``) on the
    CPU; ``"tensorrt"`` runs the engines of this export directory (their precision is read from
    their sidecars). Raises ModelError for a missing/tampered file or an incompatible engine.
    """
    manifest = load_manifest(Path(export_dir))
    names = list(networks or manifest.networks)
    unknown = [n for n in names if n not in manifest.networks]
    if unknown:
        raise InputError(f"unknown network(s) {unknown}; this export has {list(manifest.networks)}")
    if backend not in ("onnxruntime", "tensorrt"):
        raise InputError(f"backend must be 'onnxruntime' or 'tensorrt', not {backend!r}")
    goldens = {name: load_goldens(manifest, name) for name in names}
    runners = {}
    profiles: Dict[str, Dict[str, Dict[str, List[int]]]] = {}
    try:
        if backend == "onnxruntime":
            if fp16:
                manifest.verify_files(fp16=True)
            infer = ort_infer(manifest, fp16=fp16)
            precision = "fp16" if fp16 else "fp32"
        else:
            precisions = set()
            for name in names:
                runners[name], info = _tensorrt_runner(manifest, name)
                profiles[name] = info.profiles
                precisions.add(info.precision)
            precision = "fp16" if "fp16" in precisions else "fp32"

            def infer(network: str, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
                return runners[network].infer(feed)

        min_psnr, max_error = THRESHOLDS[(backend, precision)]
        report = VerifyReport(backend=backend, precision=precision, min_psnr_db=min_psnr, max_error=max_error)
        for name in names:
            spec = manifest.networks[name]
            for case, (inputs, expected) in enumerate(goldens[name]):
                shape = tuple(next(iter(inputs.values())).shape)
                profile = profiles.get(name, {})
                outside = [n for n, v in inputs.items()
                           if n in profile and not shape_in_profile(v.shape, profile[n])]
                if outside:
                    report.rows.append(VerifyRow(name, case, shape, "-", 0.0, 0.0, False,
                                                 note="input shape outside the engine's profile"))
                    continue
                actual = infer(name, inputs)
                for out in spec.outputs:
                    peak = data_range(out)
                    value = psnr(expected[out.name], actual[out.name], peak)
                    diff = np.abs(expected[out.name].astype(np.float64) - actual[out.name].astype(np.float64))
                    error = float(np.max(diff)) / peak if diff.size else 0.0
                    ok = value >= min_psnr and (max_error is None or error <= max_error)
                    report.rows.append(VerifyRow(name, case, shape, out.name, value, error, bool(ok)))
    finally:
        for runner in runners.values():
            runner.deactivate()
    return report

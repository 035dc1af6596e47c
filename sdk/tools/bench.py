"""``dereflect bench``: per-stage latency, percentiles, and the distance to the hardware floor.

::

    dereflect bench exports/rm2s-lite --sizes 256,720p,1080p --backend onnxruntime --out bench/

For each size: a synthetic frame, ``--warmup`` untimed runs, then ``--runs`` timed runs of the
pipeline split into stages (RM2S: upload, stage1, middle, stage2, download; CRRN: upload,
crrn, download). Each stage gets mean, median, p90, p99 and max, the whole run the same plus
FPS. As trtexec does, a run whose coefficient of variation or ``(p90 - median) / median``
exceeds ``--variation-threshold`` (5 %) is flagged: the machine was busy or clocks moved.

**Where the stages run.** Each backend gets a *stages* object whose ``run(image, timer)``
wraps its stages in ``timer.stage(name)`` and whose ``timer()`` returns the clock that suits
its work; that is the hook a backend uses to supply its own timer:

* :class:`RunnerStages` (ONNX Runtime; TensorRT and CRRN too): each network through its
  runner's ``infer`` (host arrays in and out), the CPU middle step between them, a monotonic
  host clock. ``upload`` / ``download`` are the host layout conversions (HWC <-> NCHW); where a
  runner uses a GPU, its host-device copies are inside its network stage.
* :class:`TorchDeviceStages` (PyTorch on CUDA): the frame stays on the GPU from upload to
  download, the middle step is the pipeline's own (fused kernel through cupy, else torch ops),
  and the stages are timed with CUDA events on the stream.

Where the backend has an on-device RM2S path (PyTorch on CUDA; TensorRT's single-stream
sequence, replayed as a CUDA graph), that path is also timed end to end as ``fused``, host
array in, host array out: it is what :class:`~dereflect.remover.Remover` runs, and a CUDA
graph cannot be split into stages.

**The floor.** With ``--device-table`` (or ``auto`` on a GPU the table knows), each network's
FLOPs and minimum bytes are counted from its ONNX graph at that size
(:mod:`dereflect.tools.flops`, needs ``onnx``), the middle step's analytically, and every stage's
median is reported as a multiple of its floor.

Outputs: ``bench.json`` (everything, raw samples included) and ``bench.png`` (latency
distribution per size and the per-stage breakdown; needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from dereflect import __version__
from dereflect.backends.base import backend_name, load_backend, require_backend_module
from dereflect.errors import DereflectError, InputError, MissingDependencyError
from dereflect.manifest import Manifest, load_manifest
from dereflect.middle_step.cpu import middle_step_cpu
from dereflect.remover import resolve_model

RM2S_STAGES = ("upload", "stage1", "middle", "stage2", "download")
CRRN_STAGES = ("upload", "crrn", "download")
VARIATION_THRESHOLD = 0.05
DEFAULT_SIZES = "256,720p,1080p"
MAX_SIDE = 16384
REPORT_FORMAT = "dereflect-bench"


# -- sizes and statistics ----------------------------------------------------------------------

def parse_size(text: str) -> Tuple[str, int, int]:
    """``"256"`` (square), ``"720p"`` (16:9, width rounded up to even) or ``"HxW"`` -> (label, H, W)."""
    label = str(text).strip().lower()
    match_p = re.fullmatch(r"(\d+)p", label)
    match_hw = re.fullmatch(r"(\d+)x(\d+)", label)
    if match_p:
        height = int(match_p.group(1))
        width = 2 * int(math.ceil(height * 16 / 9 / 2))
    elif match_hw:
        height, width = int(match_hw.group(1)), int(match_hw.group(2))
    elif label.isdigit():
        height = width = int(label)
    else:
        raise InputError(f"size {text!r} is not N, Np or HxW (e.g. 256, 720p, 1080p, 480x640)")
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise InputError(f"size {text!r} must have sides between 1 and {MAX_SIDE}")
    return label, height, width


def parse_sizes(text: str) -> List[Tuple[str, int, int]]:
    sizes = [parse_size(part) for part in str(text).split(",") if part.strip()]
    if not sizes:
        raise InputError("--sizes needs at least one size, e.g. 256,720p")
    return sizes


def summarize(samples_ms: Sequence[float], threshold: float = VARIATION_THRESHOLD) -> Dict[str, Any]:
    """Mean, median, p90, p99, max (ms, linear-interpolated percentiles), FPS and the variation flag."""
    values = np.asarray(list(samples_ms), dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InputError("timing samples must be a non-empty list of finite, non-negative numbers")
    mean = float(values.mean())
    median = float(np.median(values))
    p90, p99 = (float(v) for v in np.percentile(values, [90, 99]))
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    cov = std / mean if mean > 0 else 0.0
    spread = (p90 - median) / median if median > 0 else 0.0
    return {
        "runs": int(values.size),
        "mean_ms": mean,
        "median_ms": median,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": float(values.max()),
        "min_ms": float(values.min()),
        "std_ms": std,
        "cov": cov,
        "p90_spread": spread,
        "fps": 1000.0 / mean if mean > 0 else float("inf"),
        "variable": is_variable(cov, spread, threshold),
    }


def is_variable(cov: float, p90_spread: float, threshold: float = VARIATION_THRESHOLD) -> bool:
    """trtexec's test: timings are unreliable when either relative spread exceeds ``threshold``."""
    return bool(cov > threshold or p90_spread > threshold)


# -- timers -------------------------------------------------------------------------------------

class StageTimer:
    """Times the named stages of one run: ``with timer.stage("stage1"): ...``, then ``read()``."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def begin(self, name: str) -> None:
        raise NotImplementedError

    def end(self, name: str) -> None:
        raise NotImplementedError

    def read(self) -> Dict[str, float]:
        """Milliseconds per stage plus ``total`` (first begin to last end); may wait for the device."""
        raise NotImplementedError


class MonotonicTimer(StageTimer):
    """Host monotonic clock; ``sync`` (e.g. ``torch.cuda.synchronize``) is called at each boundary."""

    def __init__(self, sync: Optional[Callable[[], Any]] = None) -> None:
        self._sync = sync
        self._marks: Dict[str, List[float]] = {}

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def begin(self, name: str) -> None:
        self._marks[name] = [self._now(), math.nan]

    def end(self, name: str) -> None:
        self._marks[name][1] = self._now()

    def read(self) -> Dict[str, float]:
        times = {name: (end - start) * 1e3 for name, (start, end) in self._marks.items()}
        starts, ends = zip(*self._marks.values())
        times["total"] = (max(ends) - min(starts)) * 1e3
        return times


class CudaEventTimer(StageTimer):
    """CUDA events recorded on torch's current stream: device time, no synchronisation between stages."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._events: Dict[str, List[Any]] = {}

    def _record(self) -> Any:
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self, name: str) -> None:
        self._events[name] = [self._record(), None]

    def end(self, name: str) -> None:
        self._events[name][1] = self._record()

    def read(self) -> Dict[str, float]:
        pairs = list(self._events.values())
        pairs[-1][1].synchronize()
        times = {name: float(start.elapsed_time(end)) for name, (start, end) in self._events.items()}
        times["total"] = float(pairs[0][0].elapsed_time(pairs[-1][1]))
        return times


# -- the pipeline, split into stages -----------------------------------------------------------

def _nchw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)


def _hwc(batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(batch[0].transpose(1, 2, 0), 0.0, 1.0))


class RunnerStages:
    """Every network through its runner's ``infer``; RM2S's middle step on the CPU between them."""

    def __init__(self, manifest: Manifest, runners: Dict[str, Any], c1: float, c2: float,
                 threshold: str = "exact") -> None:
        self.manifest = manifest
        self.runners = runners
        self.c1, self.c2 = c1, c2
        self.threshold = threshold
        self.stages = RM2S_STAGES if manifest.method == "rm2s" else CRRN_STAGES

    def timer(self) -> StageTimer:
        # infer returns host arrays, so the host clock sees each stage finish.
        return MonotonicTimer()

    def _infer(self, network: str, batch: np.ndarray) -> np.ndarray:
        spec = self.manifest.networks[network]
        return self.runners[network].infer({spec.inputs[0].name: batch})["background"]

    def run(self, image: np.ndarray, timer: StageTimer) -> np.ndarray:
        """One HxWx3 float32 RGB frame -> its background (HxWx3 float32), each stage timed."""
        with timer.stage("upload"):
            batch = _nchw(image)
        if self.manifest.method == "rm2s":
            with timer.stage("stage1"):
                stage1 = self._infer("stage1", batch)
            with timer.stage("middle"):
                middle = middle_step_cpu(image, _hwc(stage1), self.c1, self.c2, self.threshold)
                stage2_input = _nchw(middle.stage2_input)
            with timer.stage("stage2"):
                out = self._infer("stage2", stage2_input)
        else:
            with timer.stage("crrn"):
                out = self._infer("crrn", batch)
        with timer.stage("download"):
            return _hwc(out)


class TorchDeviceStages:
    """RM2S on one CUDA device (PyTorch backend): upload, both networks and the middle step on the GPU."""

    stages = RM2S_STAGES

    def __init__(self, device_rm2s: Any) -> None:
        self._torch = require_backend_module("torch", "torch")
        self.device_rm2s = device_rm2s

    def timer(self) -> StageTimer:
        return CudaEventTimer(self._torch)

    def run(self, image: np.ndarray, timer: StageTimer) -> np.ndarray:
        torch, rm2s = self._torch, self.device_rm2s
        with torch.inference_mode():
            with timer.stage("upload"):
                frame = torch.from_numpy(_nchw(image)).to(rm2s.stage1.device)
            with timer.stage("stage1"):
                stage1 = rm2s.stage1.forward(frame)["background"].clamp_(0.0, 1.0).contiguous()
            with timer.stage("middle"):
                # The pipeline's own middle step, so the stages time exactly what Remover runs.
                stage2_input = rm2s._middle(frame, stage1)
            with timer.stage("stage2"):
                out = rm2s.stage2.forward(stage2_input)["background"]
            with timer.stage("download"):
                return _hwc(out.cpu().numpy())


class BenchPipeline:
    """An export directory opened on one backend, ready to time: stages, optional fused path, notes."""

    def __init__(self, manifest: Manifest, backend: str, device: str = "auto", precision: str = "auto",
                 threshold: str = "exact", **options: Any) -> None:
        if threshold not in ("exact", "histogram"):
            raise InputError(f"threshold must be 'exact' or 'histogram', not {threshold!r}")
        self.manifest = manifest
        self.backend = backend_name(backend)
        module = load_backend(self.backend)
        self.runners = module.open_networks(manifest, device=device, precision=precision, **options)
        c1 = float(manifest.middle_step.get("c1", 0.5))
        c2 = float(manifest.middle_step.get("c2", 0.5))
        self.fused = None
        opener = getattr(module, "open_device_rm2s", None)
        if manifest.method == "rm2s" and opener is not None:
            self.fused = opener(manifest, self.runners, c1, c2, **options)
        first = next(iter(self.runners.values()))
        self.notes: List[str] = []
        if self.backend == "torch" and self.fused is not None:
            self.stages: Any = TorchDeviceStages(self.fused)
            self.on_gpu = True
            self.element_bytes: Optional[int] = 2 if "float16" in str(first.dtype) else 4
            self.description = f"torch {first.device} {first.dtype}, middle step: {self.fused.middle_step}"
            self.notes.append("stages timed with CUDA events on one stream; upload includes the host "
                              "layout conversion, download the copy back")
        else:
            self.stages = RunnerStages(manifest, self.runners, c1, c2, threshold)
            self.on_gpu, self.element_bytes, self.description = self._describe(first, precision)
            self.notes.append("stages timed with the host monotonic clock; upload/download are the host "
                              "layout conversions (HWC <-> NCHW)" +
                              ("; host-device copies are inside each network stage" if self.on_gpu else ""))
            if manifest.method == "rm2s":
                self.notes.append(f"middle step on the CPU (middle_step_cpu, threshold={threshold})")
        if self.fused is not None:
            self.notes.append("fused: the backend's on-device RM2S path as Remover runs it, host array in "
                              "and out, host clock around each call")

    def _describe(self, runner: Any, precision: str) -> Tuple[bool, Optional[int], str]:
        if self.backend == "onnxruntime":
            providers = list(getattr(runner, "providers", []))
            on_gpu = "CUDAExecutionProvider" in providers
            fp16 = str(precision).lower() == "fp16"
            detail = f"onnxruntime ({', '.join(providers)}), {'fp16' if fp16 else 'fp32'}"
            return on_gpu, 2 if fp16 else None, detail
        if self.backend == "tensorrt":
            # An engine's precision is fixed at build time; FP16 unless the user says otherwise.
            fp32 = str(precision).lower() == "fp32"
            return True, 4 if fp32 else 2, f"tensorrt ({'fp32' if fp32 else 'fp16'} engines assumed)"
        device = str(getattr(runner, "device", "cpu"))
        dtype = str(getattr(runner, "dtype", "float32"))
        return device.startswith("cuda"), 2 if "float16" in dtype else 4, f"torch {device} {dtype}"

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()


def synthetic_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic HxWx3 float32 frame in [0, 1] with smooth shading, sharp edges and a faint overlay."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    frame = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy = rng.uniform(1.0, 4.0, 2)
        frame[:, :, channel] = 0.5 + 0.2 * np.sin(2 * np.pi * fx * x + channel) * np.cos(2 * np.pi * fy * y)
    for weight in (1.0, 0.3):
        # Opaque shapes (background edges), then faint ones (reflection-like edges).
        for _ in range(12):
            top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
            bottom = min(height, top + int(rng.integers(1, max(2, height // 3))))
            right = min(width, left + int(rng.integers(1, max(2, width // 3))))
            patch = frame[top:bottom, left:right]
            patch += weight * (rng.uniform(0.0, 1.0, 3).astype(np.float32) - patch)
    frame += rng.normal(0.0, 0.01, frame.shape).astype(np.float32)
    return np.clip(frame, 0.0, 1.0)


# -- measuring ----------------------------------------------------------------------------------

def time_stages(stages: Any, image: np.ndarray, warmup: int, runs: int) -> Dict[str, List[float]]:
    """``warmup`` untimed runs, then ``runs`` timed ones: samples (ms) per stage and ``total``."""
    for _ in range(warmup):
        stages.run(image, stages.timer())
    samples: Dict[str, List[float]] = {}
    for _ in range(runs):
        timer = stages.timer()
        stages.run(image, timer)
        for name, value in timer.read().items():
            samples.setdefault(name, []).append(value)
    return samples


def time_calls(call: Callable[[], Any], warmup: int, runs: int) -> List[float]:
    """Host-clock samples (ms) of ``call`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def resolve_device_table(choice: Optional[str], on_gpu: bool) -> Optional[Any]:
    """The DeviceSpec for ``--device-table`` (``auto``: the running GPU when the table knows it)."""
    from dereflect.tools.flops import device_for_gpu, device_spec

    if choice is None or str(choice).lower() in ("", "none"):
        return None
    if str(choice).lower() != "auto":
        return device_spec(choice)
    if not on_gpu:
        return None
    from dereflect.trt_api import gpu_info

    return device_for_gpu(gpu_info()[0])


def size_costs(manifest: Manifest, height: int, width: int, element_bytes: Optional[int]) -> Dict[str, Any]:
    """flops.Cost per network (from the FP32 ONNX files) and for the middle step."""
    from dereflect.tools.flops import pipeline_costs

    files = [(name, manifest.path_of(name)) for name in manifest.networks]
    if manifest.method == "rm2s":
        files = [(name, manifest.path_of(name)) for name in ("stage1", "stage2")]
    return pipeline_costs(files, height, width, manifest.method, element_bytes)


def limits(costs: Dict[str, Any], device: Any, stage_stats: Dict[str, Dict[str, Any]],
           total: Dict[str, Any], fused: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Floor per stage and for the whole frame, and each measured median as a multiple of it."""
    floors = {name: cost.floor_ms(device) for name, cost in costs.items()}
    floors["total"] = sum(floors.values())
    ratios = {name: stage_stats[name]["median_ms"] / floors[name] for name in costs if name in stage_stats}
    ratios["total"] = total["median_ms"] / floors["total"]
    if fused is not None:
        ratios["fused"] = fused["median_ms"] / floors["total"]
    return {"device": device.key, "floor_ms": floors, "ratio": ratios,
            "bound": {name: cost.bound(device) for name, cost in costs.items()}}


def bench_size(pipeline: BenchPipeline, label: str, height: int, width: int, warmup: int, runs: int,
               device: Optional[Any], variation_threshold: float = VARIATION_THRESHOLD) -> Dict[str, Any]:
    """Timings, statistics, costs and floors of one size (see :func:`run_bench`)."""
    image = synthetic_frame(height, width)
    samples = time_stages(pipeline.stages, image, warmup, runs)
    if pipeline.fused is not None:
        frame = _nchw(image)
        samples["fused"] = time_calls(lambda: pipeline.fused.run(frame), warmup, runs)
    stats = {name: summarize(values, variation_threshold) for name, values in samples.items()}
    result: Dict[str, Any] = {
        "label": label, "height": height, "width": width,
        "stages": {name: stats[name] for name in pipeline.stages.stages},
        "total": stats["total"],
        "fused": stats.get("fused"),
        "samples_ms": samples,
    }
    result["warnings"] = [
        f"{label} {name}: timings vary (CoV {stats[name]['cov']:.1%}, (p90 - median)/median "
        f"{stats[name]['p90_spread']:.1%} > {variation_threshold:.0%}); the machine was busy or clocks "
        "changed"
        for name in ("total", "fused") if name in stats and stats[name]["variable"]
    ]
    try:
        costs = size_costs(pipeline.manifest, height, width, pipeline.element_bytes)
    except MissingDependencyError as exc:
        result["costs"] = None
        result["costs_error"] = str(exc)
        return result
    result["costs"] = {name: cost.to_dict(device) for name, cost in costs.items()}
    if device is not None:
        result["limits"] = limits(costs, device, result["stages"], result["total"], result["fused"])
    return result


def machine_info(on_gpu: bool = False) -> Dict[str, Any]:
    """Where the figures come from: OS, CPU, Python and the versions of the libraries in use."""
    import cv2

    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }
    # Only libraries already loaded: the report must not import torch for an onnxruntime run.
    for module in ("onnxruntime", "onnx", "torch", "tensorrt", "cupy"):
        if module in sys.modules:
            info[module] = str(getattr(sys.modules[module], "__version__", "unknown"))
    if on_gpu:
        from dereflect.trt_api import gpu_info

        info["gpu"], info["compute_capability"] = gpu_info()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(
    export_dir: os.PathLike,
    sizes: Sequence[Tuple[str, int, int]],
    backend: str = "onnxruntime",
    device: str = "auto",
    precision: str = "auto",
    warmup: int = 3,
    runs: int = 20,
    device_table: Optional[str] = "auto",
    threshold: str = "exact",
    variation_threshold: float = VARIATION_THRESHOLD,
    log: Optional[Callable[[str], Any]] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Benchmark an export directory at each ``(label, H, W)`` size; returns the report dictionary.

    ``options`` go to the backend (``checkpoint=`` for torch, ``threads=`` for onnxruntime). A
    size that fails (e.g. outside a TensorRT profile) is reported with its error; the others run.
    """
    if int(warmup) < 0 or int(runs) < 1:
        raise InputError(f"--warmup must be >= 0 and --runs >= 1, got {warmup} and {runs}")
    if not variation_threshold > 0:
        raise InputError(f"--variation-threshold must be positive, got {variation_threshold}")
    manifest = load_manifest(resolve_model(export_dir))
    pipeline = BenchPipeline(manifest, backend, device=device, precision=precision, threshold=threshold,
                             **options)
    try:
        spec = resolve_device_table(device_table, pipeline.on_gpu)
        notes = list(pipeline.notes)
        if spec is None:
            notes.append("no device table: FLOPs and bytes only; pass --device-table (h100, agx-orin, "
                         "orin-nano, ... or custom:TFLOPS,GBPS) for floors")
        results = []
        for label, height, width in sizes:
            if log:
                log(f"{label} ({height}x{width}): {warmup} warm-up + {runs} timed runs")
            try:
                results.append(bench_size(pipeline, label, height, width, int(warmup), int(runs), spec,
                                          variation_threshold))
            except DereflectError as exc:
                results.append({"label": label, "height": height, "width": width, "error": str(exc)})
        return {
            "format": REPORT_FORMAT,
            "format_version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dereflect_version": __version__,
            "machine": machine_info(pipeline.on_gpu),
            "model": {"dir": str(manifest.directory), "name": manifest.name, "method": manifest.method},
            "backend": pipeline.backend,
            "backend_detail": pipeline.description,
            "device": device,
            "precision": precision,
            "element_bytes": pipeline.element_bytes,
            "threshold": threshold,
            "warmup": int(warmup),
            "runs": int(runs),
            "variation_threshold": variation_threshold,
            "device_table": spec.to_dict() if spec is not None else None,
            "stages": list(pipeline.stages.stages),
            "notes": notes,
            "sizes": results,
        }
    finally:
        pipeline.close()


# -- output ---------------------------------------------------------------------------------------

def format_report(report: Dict[str, Any]) -> str:
    """The report as a plain-text table (medians and percentiles in ms)."""
    lines = [
        f"dereflect bench: {report['model']['name']} ({report['model']['method']}) on "
        f"{report['backend_detail']}, {report['warmup']} warm-up + {report['runs']} timed runs",
    ]
    device = report.get("device_table")
    if device:
        lines.append(f"floors for {device['name']}: {device['fp16_tflops']:g} TFLOP/s FP16, "
                     f"{device['bandwidth_gbps']:g} GB/s")
    header = f"{'size':<10} {'stage':<9} {'mean':>9} {'median':>9} {'p90':>9} {'p99':>9} {'max':>9}"
    if device:
        header += f" {'floor':>9} {'x floor':>8}"
    lines.append(header)
    for entry in report["sizes"]:
        size = f"{entry['label']}"
        if "error" in entry:
            lines.append(f"{size:<10} error: {entry['error']}")
            continue
        limits_ = entry.get("limits") or {}
        rows = list(entry["stages"].items()) + [("total", entry["total"])]
        if entry.get("fused"):
            rows.append(("fused", entry["fused"]))
        for name, stats in rows:
            flag = "*" if stats["variable"] else " "
            line = (f"{size:<10} {name:<9} {stats['mean_ms']:9.3f} {stats['median_ms']:9.3f} "
                    f"{stats['p90_ms']:9.3f} {stats['p99_ms']:9.3f} {stats['max_ms']:9.3f}{flag}")
            floor_key = "total" if name == "fused" else name
            if limits_ and floor_key in limits_["floor_ms"]:
                line += f"{limits_['floor_ms'][floor_key]:9.3f} {limits_['ratio'][name]:7.1f}x"
            if name in ("total", "fused"):
                line += f"  {stats['fps']:.1f} FPS"
            lines.append(line)
            size = ""
        costs = entry.get("costs")
        if costs:
            parts = ", ".join(f"{name} {c['gflop']:.2f} GFLOP / {c['min_mbytes']:.1f} MB"
                              for name, c in costs.items())
            lines.append(f"{'':<10} cost: {parts}")
        elif entry.get("costs_error"):
            lines.append(f"{'':<10} no FLOP count: {entry['costs_error']}")
    lines.append("times in ms; * = variable timings (CoV or (p90 - median)/median above "
                 f"{report['variation_threshold']:.0%})")
    warnings = [w for entry in report["sizes"] for w in entry.get("warnings", [])]
    lines.extend(f"warning: {w}" for w in warnings)
    lines.extend(f"note: {n}" for n in report["notes"])
    return "\n".join(lines)


def write_report(report: Dict[str, Any], out_dir: os.PathLike) -> Path:
    """Write ``bench.json`` into ``out_dir`` (created) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def plot_report(report: Dict[str, Any], path: os.PathLike) -> Optional[Path]:
    """Write the PNG plot (needs matplotlib); None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    entries = [e for e in report["sizes"] if "error" not in e]
    if not entries:
        return None
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    dist, breakdown = figure.subplots(1, 2)
    labels = [e["label"] for e in entries]
    dist.boxplot([e["samples_ms"]["total"] for e in entries], whis=(1, 99), showmeans=True)
    dist.set_xticks(range(1, len(labels) + 1), labels)
    medians = [e["total"]["median_ms"] for e in entries]
    if max(medians) / max(min(medians), 1e-9) > 20:
        dist.set_yscale("log")
    dist.set_ylabel("ms per frame")
    dist.set_title(f"latency per frame ({report['runs']} runs; whiskers p1-p99, triangle = mean)")
    stages = report["stages"]
    bottoms = np.zeros(len(entries))
    positions = np.arange(len(entries))
    for name in stages:
        shares = np.array([100.0 * e["stages"][name]["median_ms"] / max(sum(
            s["median_ms"] for s in e["stages"].values()), 1e-12) for e in entries])
        breakdown.bar(positions, shares, bottom=bottoms, label=name)
        bottoms += shares
    for x, entry in zip(positions, entries):
        text = f"{entry['total']['median_ms']:.4g} ms"
        ratio = (entry.get("limits") or {}).get("ratio", {}).get("total")
        if ratio is not None:
            text += f"\n{ratio:.3g}x floor"
        breakdown.annotate(text, (x, 101), ha="center", va="bottom", fontsize=8)
    breakdown.set_xticks(positions, labels)
    breakdown.set_ylim(0, 118)
    breakdown.set_ylabel("% of the median frame")
    breakdown.set_title("per-stage breakdown (medians)")
    breakdown.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.suptitle(f"{report['model']['name']} on {report['backend_detail']}", fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


# -- command line ---------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="latency per stage, percentiles and the distance to the hardware floor",
        description="Time an export directory per stage (upload, stage 1, middle step, stage 2, "
                    "download) at each size: warm-up, then timed runs; mean, median, p90, p99, max and "
                    "FPS; FLOPs, bytes and the floor they set on a device. Writes bench.json and "
                    "bench.png into --out.",
    )
    bench.add_argument("engine_dir", metavar="MODEL",
                       help="bundled model name or export directory (manifest.json, ONNX files, engines)")
    bench.add_argument("--sizes", default=DEFAULT_SIZES,
                       help=f"comma-separated: N (square), Np (16:9) or HxW (default {DEFAULT_SIZES})")
    bench.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "torch"],
                       help="inference backend (default: onnxruntime)")
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    bench.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16"],
                       help="network precision (default: auto)")
    bench.add_argument("--checkpoint", metavar="FILE", help="training checkpoint for --backend torch")
    bench.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    bench.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs per size (default 3)")
    bench.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs per size (default 20)")
    bench.add_argument("--out", default="bench-results", metavar="DIR",
                       help="folder for bench.json and bench.png (default: bench-results)")
    bench.add_argument("--device-table", default="auto", metavar="NAME",
                       help="floors for h100, h200, agx-orin, orin-nano, orin-nano-super or "
                            "custom:TFLOPS,GBPS (dense FP16 TFLOP/s, memory GB/s); auto: the running GPU "
                            "if known; none: no floors")
    bench.add_argument("--threshold", default="exact", choices=["exact", "histogram"],
                       help="2-means of the CPU middle step (default: exact)")
    bench.add_argument("--variation-threshold", type=float, default=VARIATION_THRESHOLD, metavar="F",
                       help=f"flag runs whose CoV or (p90 - median)/median exceeds F (default "
                            f"{VARIATION_THRESHOLD})")
    bench.add_argument("--no-plot", action="store_true", help="write bench.json only")
    bench.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    options: Dict[str, Any] = {}
    if args.checkpoint:
        options["checkpoint"] = args.checkpoint
    if args.threads:
        options["threads"] = args.threads
    report = run_bench(
        args.engine_dir, parse_sizes(args.sizes), backend=args.backend, device=args.device,
        precision=args.precision, warmup=args.warmup, runs=args.runs, device_table=args.device_table,
        threshold=args.threshold, variation_threshold=args.variation_threshold,
        log=lambda message: print(message, file=sys.stderr), **options,
    )
    print(format_report(report))
    path = write_report(report, args.out)
    print(f"wrote {path}")
    if not args.no_plot:
        png = plot_report(report, path.with_suffix(".png"))
        if png is not None:
            print(f"wrote {png}")
        elif any("error" not in e for e in report["sizes"]):
            print("plot skipped: it needs matplotlib (pip install matplotlib); the JSON has every figure")
    return 1 if any("error" in e for e in report["sizes"]) else 0

"""``dereflect bench``: per-stage latency, percentiles, and the distance to the hardware floor.

::

    dereflect bench exports/rm2s-lite --sizes 256,720p,1080p --backend onnxruntime --out bench/

For each size: a synthetic frame, ``--warmup`` untimed runs, then ``--runs`` timed runs of the
pipeline split into stages (RM2S: upload, stage1, middle, stage2, download; CRRN: upload,
crrn, download; plus downscale and upsample around them for a frame larger than the networks
take). A size is N (a square), HxW or a named size (720p, 4k: the names ``export engine`` takes,
:data:`dereflect.trt_api.NAMED_SIZES`). Each stage gets mean, median, p90, p99 and max, the whole
run the same plus FPS; the table shows a percentile only from enough runs to have one above it
(p90: 10, p99: 100), since from fewer it is an interpolation towards the slowest run. As trtexec
does, a run whose coefficient of variation or ``(p90 - median) / median`` exceeds
``--variation-threshold`` (5 %) is flagged: the machine was busy or clocks moved.

**What is timed.** What :meth:`~dereflect.remover.Remover.remove` runs for a frame (a float32
RGB one, :meth:`Remover.process <dereflect.remover.Remover.process>`: a uint8 photo adds its
conversion to float and back, strip by strip, not timed here). The model is opened by the same
route (:func:`dereflect.models.open_model`, any model reference) with the same ``max_side``
(default: the side the model's manifest recommends, else 1024; ``--max-side 0``: no limit, the
networks at the frame's full resolution). A frame that fits runs as one
:meth:`Remover.run_once <dereflect.remover.Remover.run_once>`, the method's one sequence on the
executor ``remove`` uses; a larger one as ``remove``'s default ``guided`` strategy runs it:
``downscale`` (area shrink to fit), that sequence at the reduced size, ``upsample`` (the fast
guided filter bringing the reflection layer back to the frame's resolution, on the host). The
report gives, for each size, the resolution the networks ran at. The timer hook is the
executor's own clock: the host monotonic clock for host arrays (ONNX Runtime; TensorRT engines
one at a time; torch on the CPU), where upload and download are the frame's layout conversions;
CUDA events on the stream where the frame stays on a GPU (torch on CUDA, TensorRT's RM2S device
path), where upload and download are the copies to and from the GPU. A TensorRT device path
replays a captured CUDA graph after its first frame; a graph cannot be split, so it is reported
as one ``graph`` stage (and a capture that failed is reported in the notes).

**The floor.** With ``--device-table`` (or ``auto`` on a GPU the table knows), each network's
FLOPs and minimum bytes are counted from its ONNX graph at the size the networks ran at
(:mod:`dereflect.tools.flops`, needs ``onnx``: the ``export`` extra), the middle step's
analytically. The downscale and upsample stages have no floor: a frame's floor is its networks'
and middle step's. When the table is the device in use, every stage's median is reported as a
multiple of its floor (a comparison); a table of another device (``agx-orin`` named on an x86
CPU) gives that device's floors as a prediction, with no multiples, and the report says so.

Outputs: ``bench.json`` (everything, raw samples included) and, where matplotlib is installed,
``bench.png`` (latency distribution per size and the per-stage breakdown, with the machine and
date); those of an earlier run in ``--out`` are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from dereflect import __version__
from dereflect.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE
from dereflect.cli_options import add_model_options, model_options
from dereflect.errors import DereflectError, InputError, MissingDependencyError
from dereflect.imageio import check_output_location, staged_file
from dereflect.methods.base import NULL_TIMER, EventTimer, Timer
from dereflect.tools.flops import DEVICE_NAMES, DEVICE_TABLE, device_spec, table_keys_for
from dereflect.trt_api import NAMED_SIZES, parse_frame_size

VARIATION_THRESHOLD = 0.05
DEFAULT_SIZES = "256,720p,1080p"
MAX_SIDE = 16384
REPORT_FORMAT = "dereflect-bench"
REPORT_FILES = ("bench.json", "bench.png")
#: Runs a percentile needs before the table shows it: one run above it (1 / (1 - p)).
PERCENTILE_MIN_RUNS = {"p90": 10, "p99": 100}


# -- sizes and statistics ----------------------------------------------------------------------

def parse_size(text: str) -> Tuple[str, int, int]:
    """``"256"`` (square), ``"HxW"`` or a named size (``"720p"``, ``"4k"``) -> (label, H, W).

    HxW and the names are ``export engine``'s grammar (:func:`dereflect.trt_api.parse_frame_size`).
    """
    label = str(text).strip().lower()
    if re.fullmatch(r"[0-9]+", label):
        height = width = int(label)
    else:
        try:
            height, width = parse_frame_size(label)
        except InputError:
            raise InputError(f"size {text!r} is not N (a square), HxW or one of {', '.join(NAMED_SIZES)} "
                             "(e.g. 256, 480x640, 720p, 4k)") from None
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise InputError(f"size {text!r} must have sides between 1 and {MAX_SIDE}")
    return label, height, width


def parse_sizes(text: str) -> List[Tuple[str, int, int]]:
    """``--sizes``: comma-separated sizes (:func:`parse_size`), each frame size once."""
    parts = [part.strip() for part in str(text).split(",")]
    if not any(parts):
        raise InputError("--sizes needs at least one size, e.g. 256,720p")
    if not all(parts):
        raise InputError(f"--sizes {text!r} has an empty item; list sizes with one comma between each, e.g. 256,720p")
    sizes = [parse_size(part) for part in parts]
    seen: Dict[Tuple[int, int], str] = {}
    for label, height, width in sizes:
        if (height, width) in seen:
            raise InputError(f"--sizes gives {height}x{width} twice ({seen[(height, width)]} and {label}); "
                             "list each size once")
        seen[(height, width)] = label
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
    # From fewer runs than p90 needs, p90 is the slowest runs interpolated: no test of variation then.
    spread = (p90 - median) / median if median > 0 and values.size >= PERCENTILE_MIN_RUNS["p90"] else 0.0
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


def variation_excess(cov: float, p90_spread: float, threshold: float = VARIATION_THRESHOLD) -> Dict[str, float]:
    """trtexec's test: the relative spreads above ``threshold``, by name ("CoV", "(p90 - median)/median")."""
    figures = {"CoV": cov, "(p90 - median)/median": p90_spread}
    return {name: value for name, value in figures.items() if value > threshold}


def is_variable(cov: float, p90_spread: float, threshold: float = VARIATION_THRESHOLD) -> bool:
    """Whether timings are unreliable: either relative spread exceeds ``threshold`` (:func:`variation_excess`)."""
    return bool(variation_excess(cov, p90_spread, threshold))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


# -- the model, opened as remove opens it ----------------------------------------------------

class BenchPipeline:
    """A model opened for timing: the Remover ``remove`` would use, with the same options (``max_side``
    included: by default the model's).

    :meth:`run_frame` is what ``remove`` runs for a frame; :meth:`run` one network pass at the
    image's own size, whatever ``max_side`` (what the side-by-side benchmarks compare).
    """

    def __init__(self, model: Any, backend: Optional[str] = None, **options: Any) -> None:
        from dereflect.models import open_model

        # A tiled frame runs the networks once per tile: a stage table of one pass per frame would
        # show only the last tile's.
        if options.get("large_image", "guided") != "guided":
            raise InputError("bench times remove's guided handling of large frames, not large_image 'tile'")
        self.remover = open_model(model, backend=backend, **options)
        self.manifest = self.remover.manifest
        self.method = self.remover.method
        description = self.remover.describe()
        self.backend = self.remover.backend
        self.on_gpu = description.on_gpu
        self.element_bytes = description.element_bytes
        self.description = description.text
        executor = self.remover.executor
        clock = ("CUDA events on the stream the frame stays on; upload is the frame's copy to the GPU, download "
                 "the result's copy back (downscale, upsample: the host work between two events)"
                 if isinstance(executor.timer(), EventTimer)
                 else "the host monotonic clock; upload/download are the frame's layout conversions on the host "
                      "(a network's own copies to and from a GPU are in its stage)")
        # (What a frame larger than the networks take adds around this, run_bench notes where one is.)
        self.notes: List[str] = [f"each run is what remove runs for the frame: Remover.run_once on "
                                 f"{type(executor).__name__}; stages timed with {clock}"]
        if "middle" in self.method.stages and executor is self.remover._host:
            self.notes.append(f"middle step on the CPU (threshold={self.remover.settings.threshold})")

    @property
    def stages(self) -> Tuple[str, ...]:
        return self.method.stages

    def run(self, image: np.ndarray, timer: Timer) -> Any:
        """One network pass (:meth:`Remover.run_once <dereflect.remover.Remover.run_once>`) at ``image``'s size."""
        return self.remover.run_once(image, timer=timer)

    def run_frame(self, image: np.ndarray, timer: Timer) -> np.ndarray:
        """What ``remove`` runs for an HxWx3 float32 RGB frame (:meth:`Remover.process
        <dereflect.remover.Remover.process>`), each stage timed; returns the background."""
        return self.remover.background_of(image, timer=timer)

    def timer(self) -> Timer:
        return self.remover.executor.timer()

    def close(self) -> None:
        self.remover.close()


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

def time_stages(pipeline: Any, image: np.ndarray, warmup: int, runs: int,
                run: Optional[Callable[[np.ndarray, Timer], Any]] = None) -> Dict[str, List[float]]:
    """``warmup`` untimed runs of ``run`` (default ``pipeline.run``), then ``runs`` timed ones, each with
    a fresh ``pipeline.timer()``: samples (ms) per stage and ``total``."""
    run = run or pipeline.run
    for _ in range(warmup):
        run(image, NULL_TIMER)
    samples: Dict[str, List[float]] = {}
    for _ in range(runs):
        timer = pipeline.timer()
        run(image, timer)
        for name, value in timer.read().items():
            samples.setdefault(name, []).append(value)
    return samples


def device_in_use(on_gpu: bool) -> str:
    """What the run's time is measured on: the GPU's name, or the CPU's."""
    if on_gpu:
        from dereflect.trt_api import gpu_info

        return gpu_info()[0]
    return _cpu_name()


def _table_keys_in_use() -> Set[str]:
    """The device table entries the GPU in use may be (its name; on a Jetson, the board's)."""
    from dereflect.trt_api import gpu_info, jetson_model, system_memory_gib

    board = jetson_model()
    return table_keys_for(gpu_info()[0], board, system_memory_gib() if board else None)


def table_matches(spec: Any, on_gpu: bool) -> bool:
    """Whether the device table ``spec`` describes the device the run is timed on.

    Custom rates are the user's own statement about their device and are taken as given.
    """
    if spec.key == "custom":
        return True
    return on_gpu and spec.key in _table_keys_in_use()


def resolve_device_table(choice: Optional[str], on_gpu: bool) -> Optional[Any]:
    """The DeviceSpec for ``--device-table`` (``auto``: the running GPU when the table knows which it is)."""
    if choice is None or str(choice).lower() in ("", "none"):
        return None
    if str(choice).lower() != "auto":
        return device_spec(choice)
    if not on_gpu:
        return None
    keys = _table_keys_in_use()
    # An Orin Nano may run in its Super mode or not: with two candidates, auto picks neither.
    return DEVICE_TABLE[keys.pop()] if len(keys) == 1 else None


def size_costs(pipeline: BenchPipeline, height: int, width: int, element_bytes: Optional[int]) -> Dict[str, Any]:
    """flops.Cost per network (from the FP32 ONNX files) and for the middle step, in the method's order,
    with the networks at ``height`` x ``width``."""
    from dereflect.tools.flops import pipeline_costs

    manifest = pipeline.manifest
    if not all(spec.onnx for spec in manifest.networks.values()):
        raise MissingDependencyError("no ONNX files to count FLOPs in: a training checkpoint is timed as is; "
                                     "export it (dereflect export onnx) for FLOPs and floors")
    files = [(name, manifest.path_of(name)) for name in pipeline.method.network_names]
    return pipeline_costs(files, height, width, pipeline.method.stages, element_bytes)


def limits(costs: Dict[str, Any], device: Any, stage_stats: Dict[str, Dict[str, Any]],
           total: Dict[str, Any], compare: bool = True) -> Dict[str, Any]:
    """Floor per stage and for the whole frame (the sum of the stages' in ``costs``: downscale and upsample
    have none), and (``compare``: the table is the device in use) each measured median as a multiple of
    it. Another device's floors are a prediction: no multiples."""
    floors = {name: cost.floor_ms(device) for name, cost in costs.items()}
    floors["total"] = sum(floors.values())
    result: Dict[str, Any] = {"device": device.key, "floor_ms": floors, "prediction": not compare,
                              "bound": {name: cost.bound(device) for name, cost in costs.items()}}
    if compare:
        ratios = {name: stage_stats[name]["median_ms"] / floors[name] for name in costs if name in stage_stats}
        ratios["total"] = total["median_ms"] / floors["total"]
        result["ratio"] = ratios
    return result


def bench_size(pipeline: BenchPipeline, label: str, height: int, width: int, warmup: int, runs: int,
               device: Optional[Any], variation_threshold: float = VARIATION_THRESHOLD,
               compare: bool = True) -> Dict[str, Any]:
    """Timings, statistics, costs and floors of one frame size (see :func:`run_bench`), the costs and
    floors at the size the networks ran at; ``compare``: the device table is the device in use (see
    :func:`limits`)."""
    net_height, net_width = pipeline.remover.network_size(height, width)
    image = synthetic_frame(height, width)
    samples = time_stages(pipeline, image, warmup, runs, run=pipeline.run_frame)
    stats = {name: summarize(values, variation_threshold) for name, values in samples.items()
             if len(values) == runs}
    result: Dict[str, Any] = {
        "label": label, "height": height, "width": width,
        "network_height": net_height, "network_width": net_width,
        "stages": {name: stats[name] for name in stage_order(pipeline.stages) if name in stats},
        "total": stats["total"],
        "samples_ms": samples,
    }
    excess = variation_excess(stats["total"]["cov"], stats["total"]["p90_spread"], variation_threshold)
    figures = ", ".join(f"{name} {_percent(value)} > {_percent(variation_threshold)}" for name, value in excess.items())
    result["warnings"] = [f"{label} total: timings vary ({figures}); the machine was busy or clocks changed"] \
        if excess else []
    try:
        costs = size_costs(pipeline, net_height, net_width, pipeline.element_bytes)
    except MissingDependencyError as exc:
        result["costs"] = None
        result["costs_error"] = str(exc)
        return result
    result["costs"] = {name: cost.to_dict(device) for name, cost in costs.items()}
    if device is not None:
        result["limits"] = limits(costs, device, result["stages"], result["total"], compare)
    return result


def stage_order(method_stages: Sequence[str]) -> Tuple[str, ...]:
    """Every stage a frame may report, in the order they run: downscale (a frame larger than the networks
    take), the method's stages (or a CUDA graph's one), upsample."""
    return ("downscale", *method_stages, "graph", "upsample")


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
    model: Any,
    sizes: Sequence[Tuple[str, int, int]],
    backend: Optional[str] = None,
    warmup: int = 3,
    runs: int = 20,
    device_table: Optional[str] = "auto",
    variation_threshold: float = VARIATION_THRESHOLD,
    log: Optional[Callable[[str], Any]] = None,
    **options: Any,
) -> Dict[str, Any]:
    """Benchmark a model (any model reference) at each ``(label, H, W)`` size; returns the report.

    ``options`` are :func:`dereflect.models.open_model`'s (``device``, ``precision``, ``threshold``,
    ``max_side``, the backend's own). Each frame runs as ``remove`` runs it: with ``max_side`` (default
    the model's; 0: no limit), a frame larger than the networks take is scaled down for them and
    guided-upsampled back (see :meth:`BenchPipeline.run_frame`). A size that fails is reported with its
    error; the others run.
    """
    if int(warmup) < 0 or int(runs) < 1:
        raise InputError(f"--warmup must be >= 0 and --runs >= 1, got {warmup} and {runs}")
    if not variation_threshold > 0:
        raise InputError(f"--variation-threshold must be positive, got {variation_threshold}")
    pipeline = BenchPipeline(model, backend, **options)
    manifest = pipeline.manifest
    try:
        spec = resolve_device_table(device_table, pipeline.on_gpu)
        in_use = device_in_use(pipeline.on_gpu)
        compare = spec is not None and table_matches(spec, pipeline.on_gpu)
        notes = list(pipeline.notes)
        if spec is None and str(device_table).lower() == "auto":
            where = (f"the table has no single entry for the GPU {in_use}" if pipeline.on_gpu
                     else f"this run is on the CPU ({in_use})")
            notes.append(f"no floors: --device-table auto uses the running GPU's table entry and {where}; name a "
                         f"device ({DEVICE_NAMES} or custom:TFLOPS,GBPS) to get its floors")
        elif spec is None:
            notes.append("no floors: --device-table none")
        elif not compare:
            notes.append(f"the floors are a prediction for {spec.name}, not a comparison: this run is on {in_use}, "
                         "so its times are not set against them (no 'x floor' multiples)")
        max_hw = pipeline.remover.max_hw
        if any(pipeline.remover.network_size(height, width) != (height, width) for _, height, width in sizes):
            notes.append(f"frames larger than {max_hw[0]}x{max_hw[1]} run as remove runs them: downscale to fit, "
                         "the networks, upsample (guided filter) back to the frame, both on the host at the "
                         "frame's resolution" + ("; these two have no floor" if spec is not None else ""))
        results = []
        for label, height, width in sizes:
            if log:
                net_height, net_width = pipeline.remover.network_size(height, width)
                log(f"{label} ({height}x{width}, networks at {net_height}x{net_width}): {warmup} warm-up + "
                    f"{runs} timed runs")
            try:
                results.append(bench_size(pipeline, label, height, width, int(warmup), int(runs), spec,
                                          variation_threshold, compare))
            except DereflectError as exc:
                results.append({"label": label, "height": height, "width": width, "error": str(exc)})
        cost_errors = list(dict.fromkeys(e["costs_error"] for e in results if e.get("costs_error")))
        notes.extend(f"no FLOPs, bytes or floors: {error}" for error in cost_errors)
        short = {name: needed for name, needed in PERCENTILE_MIN_RUNS.items() if int(runs) < needed}
        if short:
            needs = ", ".join(f"{name} needs --runs {needed} or more" for name, needed in short.items())
            notes.append(f"{' and '.join(short)} not shown: from {int(runs)} runs no run lies above "
                         f"{'them' if len(short) > 1 else 'it'}, so the figure (kept in the JSON) is an interpolation "
                         f"towards the slowest run; {needs}")
        # Only TensorRT's device executor captures graphs; the others have no such attribute.
        capture_error = getattr(pipeline.remover.executor, "graph_capture_error", None)
        if capture_error:
            notes.append(f"CUDA graph capture failed ({capture_error}): every frame was enqueued without a graph, "
                         "so the times include the launch overhead a replay saves")
        return {
            "format": REPORT_FORMAT,
            "format_version": 2,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dereflect_version": __version__,
            "machine": machine_info(pipeline.on_gpu),
            "model": {"dir": str(manifest.directory), "name": manifest.name, "method": manifest.method},
            "backend": pipeline.backend,
            "backend_detail": pipeline.description,
            "device": options.get("device", "auto"),
            "precision": options.get("precision", "auto"),
            "element_bytes": pipeline.element_bytes,
            "threshold": getattr(pipeline.remover.settings, "threshold", None),
            "max_hw": list(max_hw) if max_hw else None,
            "warmup": int(warmup),
            "runs": int(runs),
            "variation_threshold": variation_threshold,
            "device_table": spec.to_dict() if spec is not None else None,
            "device_in_use": in_use,
            "floors": None if spec is None else ("comparison" if compare else "prediction"),
            "stages": list(pipeline.stages),
            "notes": notes,
            "sizes": results,
        }
    finally:
        pipeline.close()


# -- output ---------------------------------------------------------------------------------------

def format_report(report: Dict[str, Any]) -> str:
    """The report as a plain-text table (medians and percentiles in ms)."""
    max_hw = report.get("max_hw")
    lines = [
        f"dereflect bench: {report['model']['name']} ({report['model']['method']}) on "
        f"{report['backend_detail']}, {report['warmup']} warm-up + {report['runs']} timed runs",
        (f"networks at up to {max_hw[0]}x{max_hw[1]}, larger frames scaled down as remove does "
         "(--max-side; 0: no limit)") if max_hw else "networks at each frame's full resolution (no max side)",
    ]
    device = report.get("device_table")
    compare = report.get("floors") == "comparison"
    if device:
        rates = f"{device['fp16_tflops']:g} TFLOP/s FP16, {device['bandwidth_gbps']:g} GB/s"
        if compare:
            lines.append(f"floors for {device['name']} ({rates}), the device in use")
        else:
            lines.append(f"PREDICTED floors for {device['name']} ({rates}): not the device in use "
                         f"({report.get('device_in_use', 'unknown')}), so not a comparison")
    cells = [entry["label"] if "error" in entry else
             f"{entry['label']} (networks at {entry['network_height']}x{entry['network_width']})"
             for entry in report["sizes"]]
    width = max([10] + [len(cell) for cell in cells])
    header = f"{'size':<{width}} {'stage':<9} {'mean':>9} {'median':>9} {'p90':>9} {'p99':>9} {'max':>9}"
    if device:
        header += f" {'floor':>9} {'x floor':>8}" if compare else f" {'predicted':>9}"
    lines.append(header)
    for entry, size in zip(report["sizes"], cells):
        if "error" in entry:
            lines.append(f"{size:<{width}} error: {entry['error']}")
            continue
        limits_ = entry.get("limits") or {}
        rows = list(entry["stages"].items()) + [("total", entry["total"])]
        for name, stats in rows:
            flag = "*" if stats["variable"] else " "
            p90, p99 = (f"{stats[f'{p}_ms']:9.3f}" if stats["runs"] >= PERCENTILE_MIN_RUNS[p] else f"{'n/a':>9}"
                        for p in ("p90", "p99"))
            line = (f"{size:<{width}} {name:<9} {stats['mean_ms']:9.3f} {stats['median_ms']:9.3f} "
                    f"{p90} {p99} {stats['max_ms']:9.3f}{flag}")
            if limits_ and name in limits_["floor_ms"]:
                line += f"{limits_['floor_ms'][name]:9.3f}"
                if "ratio" in limits_:
                    line += f" {limits_['ratio'][name]:7.1f}x"
            if name == "total":
                line += f"  {stats['fps']:.1f} FPS"
            lines.append(line)
            size = ""
        costs = entry.get("costs")
        if costs:
            parts = ", ".join(f"{name} {c['gflop']:.2f} GFLOP / {c['min_mbytes']:.1f} MB"
                              for name, c in costs.items())
            lines.append(f"{'':<{width}} cost: {parts}")
    lines.append("times in ms; * = variable timings (CoV or (p90 - median)/median above "
                 f"{_percent(report['variation_threshold'])})")
    warnings = [w for entry in report["sizes"] for w in entry.get("warnings", [])]
    lines.extend(f"warning: {w}" for w in warnings)
    lines.extend(f"note: {n}" for n in report["notes"])
    return "\n".join(lines)


def check_out_dir(out_dir: os.PathLike, overwrite: bool = False, plot: bool = True) -> None:
    """Check, before any timing, that the report can be written into ``out_dir``: InputError for any of
    :func:`dereflect.imageio.check_output_location`'s reasons and, without ``overwrite``, for the report
    files of an earlier run there (``bench.png`` only when ``plot``)."""
    out = Path(out_dir)
    check_output_location(out, folder=True)
    names = REPORT_FILES if plot else REPORT_FILES[:1]
    existing = [out / name for name in names if os.path.lexists(out / name)]
    if existing and not overwrite:
        if len(existing) == 1:
            raise InputError(f"{existing[0]}: file exists; pass --overwrite to replace it")
        raise InputError(f"{out}: {', '.join(path.name for path in existing)} exist already (an earlier run); "
                         "pass --overwrite to replace them")


def write_report(report: Dict[str, Any], out_dir: os.PathLike) -> Path:
    """Write ``bench.json`` into ``out_dir`` (created) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    with staged_file(path) as staged:
        staged.write_text(json.dumps(report, indent=2) + "\n")
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
    labels = [f"{e['label']}\n(networks {e['network_height']}x{e['network_width']})" for e in entries]
    # Whiskers at the extremes: from tens of runs, a p1 or p99 would be the extremes interpolated.
    dist.boxplot([e["samples_ms"]["total"] for e in entries], whis=(0, 100), showmeans=True)
    dist.set_xticks(range(1, len(labels) + 1), labels)
    medians = [e["total"]["median_ms"] for e in entries]
    if max(medians) / max(min(medians), 1e-9) > 20:
        dist.set_yscale("log")
    dist.set_ylabel("ms per frame")
    dist.set_title(f"latency per frame ({report['runs']} runs; whiskers min-max, triangle = mean)")
    # Sizes differ in their stages: only the larger frames are resampled.
    stages = [name for name in stage_order(report["stages"]) if any(name in e["stages"] for e in entries)]
    bottoms = np.zeros(len(entries))
    positions = np.arange(len(entries))
    for name in stages:
        shares = np.array([100.0 * e["stages"][name]["median_ms"] / max(sum(
            s["median_ms"] for s in e["stages"].values()), 1e-12) if name in e["stages"] else 0.0
            for e in entries])
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
    figure.suptitle(plot_title(report), fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def plot_title(report: Dict[str, Any]) -> str:
    """The plot's title: the model and backend, then the machine and when it ran."""
    machine = report["machine"]
    created = _dt.datetime.fromisoformat(report["created"]).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{report['model']['name']} on {report['backend_detail']}\n"
            f"{report['device_in_use']} ({machine['platform']}), {created}")


# -- command line ---------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="latency per stage, percentiles and the distance to the hardware floor",
        description="Time what remove runs for a frame, per stage (upload, stage 1, middle step, stage 2, "
                    "download; downscale and upsample around them when the frame is larger than --max-side), "
                    "at each size: warm-up, then timed runs; mean, median, p90, p99, max and FPS. The report "
                    "says at which resolution the networks ran for each size. FLOPs, bytes and the floor they "
                    "set on a device (counted at that resolution) need the onnx package (pip install "
                    "'dereflect[export]'); floors of a device other than the one in use are a prediction, not a "
                    "comparison. Writes bench.json into --out, and bench.png where matplotlib is installed (pip "
                    "install matplotlib).",
    )
    add_model_options(bench, positional=True, output=False)
    bench.add_argument("--sizes", default=DEFAULT_SIZES,
                       help=f"comma-separated, each once: N (square), HxW or a name ({', '.join(NAMED_SIZES)}) "
                            f"(default: {DEFAULT_SIZES})")
    bench.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed runs per size (default: 3)")
    bench.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs per size (default: 20)")
    bench.add_argument("--out", default="bench-results", metavar="DIR",
                       help="folder for bench.json, and bench.png with matplotlib (default: bench-results)")
    bench.add_argument("--device-table", default="auto", metavar="NAME",
                       help=f"floors for {DEVICE_NAMES} or "
                            "custom:TFLOPS,GBPS (dense FP16 TFLOP/s, memory GB/s); auto: the running GPU "
                            "if known; none: no floors. Needs onnx (pip install 'dereflect[export]') "
                            "(default: auto)")
    bench.add_argument("--variation-threshold", type=float, default=VARIATION_THRESHOLD, metavar="F",
                       help=f"flag runs whose CoV or (p90 - median)/median exceeds F (default: "
                            f"{VARIATION_THRESHOLD})")
    bench.add_argument("--no-plot", action="store_true", help="write bench.json only, no bench.png")
    bench.add_argument("--overwrite", action="store_true",
                       help="replace the bench.json and bench.png of an earlier run in --out (default: off, "
                            "refused before any timing)")
    bench.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    # Before any timing: a folder that cannot be written, or an earlier run's report, would otherwise stop it
    # after all of it.
    check_out_dir(args.out, args.overwrite, plot=not args.no_plot)
    report = run_bench(
        args.model, parse_sizes(args.sizes), warmup=args.warmup, runs=args.runs, device_table=args.device_table,
        variation_threshold=args.variation_threshold, log=lambda message: print(message, file=sys.stderr),
        **model_options(args),
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
    failed = sum("error" in e for e in report["sizes"])
    if failed == len(report["sizes"]):
        return EXIT_USAGE  # nothing measured
    return EXIT_SOME_FAILED if failed else EXIT_OK

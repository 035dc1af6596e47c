"""The GPU benchmark suite in one call: Markdown tables on stdout, everything as JSON in --out.

::

    python benchmarks/gpu_suite.py                     # a CUDA machine (torch with CUDA; cupy for the kernel)
    python benchmarks/gpu_suite.py --cpu-smoke         # anywhere: tiny sizes on the CPU, to check it runs

For each preset (random weights: latency does not depend on them; see random_export.py):

1. this SDK's pipeline per stage at each size on the PyTorch backend in FP16
   (``dereflect.tools.bench.run_bench``): what ``Remover.remove`` runs, staged with CUDA events,
   with the networks at each size in full (``max_side=0``), as the authors' structure runs them;
2. FLOPs, minimum bytes, the floor on the device (``dereflect.tools.flops``; ``--device-table auto``
   picks the running GPU's entry) and each median as a multiple of it;
3. the authors' structure with the same checkpoint (``authors_baseline.AuthorsPipeline``:
   eager FP32, stage-1 output to the host, OpenCV Sobel + scikit-learn KMeans, back to the
   device, stage 2), per stage, and the ratio authors / SDK.

Then the middle step alone by size: fused kernel (cupy) vs this SDK's CPU step vs the plain
torch step vs the authors' OpenCV + scikit-learn step, with the kernel's floor.

``--cpu-smoke`` runs the same code on the CPU in FP32 with tiny sizes, the lite preset and a
few runs; without a GPU it uses the H100 row of the device table as a stand-in so the floor
code runs too. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

SMOKE = {"sizes": "64,96x128", "presets": "lite", "warmup": 1, "runs": 3, "authors_runs": 2}
#: module -> what provides it; checked before anything heavy is imported.
REQUIREMENTS = {
    "dereflect": "this checkout: pip install -e '.[train,export]'",
    "torch": "PyTorch (a CUDA build on the GPU machine)",
    "onnx": "pip install onnx",
    "onnxruntime": "pip install onnxruntime",
    "safetensors": "pip install safetensors",
    "sklearn": "pip install scikit-learn",
    "cv2": "pip install opencv-python",
}


def _log(message: str) -> None:
    print(f"[gpu_suite] {message}", file=sys.stderr, flush=True)


def _ms(stats: Optional[Dict[str, Any]], key: str = "median_ms") -> str:
    from dereflect.tools.bench import PERCENTILE_MIN_RUNS

    percentile = key.split("_")[0]
    if not stats or stats.get("runs", 0) < PERCENTILE_MIN_RUNS.get(percentile, 0):
        return "n/a"  # from fewer runs a percentile is the slowest runs interpolated, as bench says
    return f"{stats[key]:.3g}{'*' if stats.get('variable') else ''}"


def _ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return lines


def run_preset(preset: str, workdir: Path, sizes: Sequence[Tuple[str, int, int]], device: str, precision: str,
               table: Optional[str], args: argparse.Namespace) -> Dict[str, Any]:
    """SDK bench report and the authors' structure stats for one preset."""
    from authors_baseline import AuthorsPipeline
    from dereflect.tools.bench import run_bench, summarize, synthetic_frame, time_stages
    from random_export import CHECKPOINT_NAME, make_random_export

    start = time.time()
    export_dir = make_random_export(workdir / preset, preset)
    checkpoint = export_dir / CHECKPOINT_NAME
    _log(f"{preset}: random export in {time.time() - start:.0f} s")
    sdk = run_bench(export_dir, sizes, backend="torch", device=device, precision=precision,
                    warmup=args.warmup, runs=args.runs, device_table=table or "none", checkpoint=checkpoint,
                    max_side=0, log=_log)  # networks at each size in full, as the authors' structure runs
    authors_pipeline = AuthorsPipeline(checkpoint, device=device)
    authors = {}
    for label, height, width in sizes:
        _log(f"{preset} authors' structure {label}: {args.authors_runs} runs")
        samples = time_stages(authors_pipeline, synthetic_frame(height, width), 1, args.authors_runs)
        authors[label] = {name: summarize(values) for name, values in samples.items()}
    del authors_pipeline
    return {"sdk": sdk, "authors": authors}


def middle_step_rows(sizes: Sequence[Tuple[str, int, int]], device: str, args: argparse.Namespace) -> Dict[str, Any]:
    import cv2
    from authors_baseline import middle_step_samples
    from dereflect.tools.bench import summarize, synthetic_frame

    results = {}
    for label, height, width in sizes:
        _log(f"middle step alone {label}")
        image = synthetic_frame(height, width)
        # A plausible stage-1 output: a smoothed copy (fewer edges than I, as a background estimate has).
        stage1 = cv2.GaussianBlur(image, (0, 0), 2.0)
        results[label] = {"height": height, "width": width, "stats": {}}
        try:
            samples = middle_step_samples(image, stage1, device, args.warmup, args.runs, args.authors_runs)
        except Exception as exc:  # noqa: BLE001 - one failing size must not lose the others' figures
            traceback.print_exc()
            results[label]["error"] = repr(exc)
            continue
        results[label]["stats"] = {name: summarize(values) if values else None for name, values in samples.items()}
    return results


def markdown(report: Dict[str, Any]) -> str:
    spec = report["device_table"]
    lines = [f"# GPU suite: {report['machine'].get('gpu', 'no GPU')} ({report['mode']})", ""]
    lines.append(f"torch {report['machine'].get('torch')}, precision {report['precision']}, device {report['device']}"
                 f", {report['warmup']} warm-up + {report['runs']} runs (authors: {report['authors_runs']}); "
                 "medians in ms, * = variable timings (CoV or (p90 - median)/median > 5 %).")
    if spec:
        lines.append(f"Floors for {spec['name']}: {spec['fp16_tflops']:g} TFLOP/s FP16, "
                     f"{spec['bandwidth_gbps']:g} GB/s, {spec['fp32_tflops'] or 'unknown'} TFLOP/s FP32.")
    for preset, data in report["presets"].items():
        if "error" in data:
            lines += ["", f"## {preset}: failed: {data['error']}"]
            continue
        sdk = data["sdk"]
        lines += ["", f"## {preset}: this SDK per stage ({sdk['backend_detail']})", ""]
        rows = []
        for entry in sdk["sizes"]:
            if "error" in entry:
                rows.append([entry["label"], f"error: {entry['error']}"] + [""] * 9)
                continue
            stages, limits = entry["stages"], entry.get("limits") or {}
            ratio = limits.get("ratio", {})
            rows.append([
                f"{entry['label']} ({entry['height']}x{entry['width']})",
                *(_ms(stages.get(name)) for name in ("upload", "stage1", "middle", "stage2", "download")),
                _ms(entry["total"]), _ms(entry["total"], "p99_ms"), f"{entry['total']['fps']:.1f}",
                f"{limits['floor_ms']['total']:.3g}" if limits else "n/a",
                _ratio(ratio.get("total")),
            ])
        lines += _table(["size", "upload", "stage1", "middle", "stage2", "download", "total", "p99", "FPS",
                         "floor", "total / floor"], rows)
        lines += ["", f"## {preset}: cost and floor per stage", ""]
        rows = []
        for entry in sdk["sizes"]:
            costs, limits = entry.get("costs"), entry.get("limits")
            if not costs:
                continue
            row = [entry["label"]]
            for name in ("stage1", "middle", "stage2"):
                cost = costs[name]
                row.append(f"{cost['gflop']:.3g} GFLOP, {cost['min_mbytes']:.3g} MB, "
                           f"{cost['activation_mbytes']:.3g} MB act.")
                if limits:
                    row.append(f"{limits['floor_ms'][name]:.3g} ({limits['bound'][name]}), "
                               f"{_ratio(limits.get('ratio', {}).get(name))}")
                else:
                    row.append("n/a")
            rows.append(row)
        lines += _table(["size", "stage1 cost", "stage1 floor ms, measured / floor", "middle cost",
                         "middle floor", "stage2 cost", "stage2 floor"], rows)
        lines += ["", f"## {preset}: the authors' structure (eager FP32, host middle step) vs this SDK", ""]
        rows = []
        for entry in sdk["sizes"]:
            authors = data["authors"].get(entry["label"])
            if "error" in entry or authors is None:
                continue
            sdk_best = entry["total"]["median_ms"]
            copies = sum(authors[name]["median_ms"] for name in ("upload", "to_host", "to_device", "download"))
            rows.append([
                entry["label"], _ms(authors["total"]), _ms(authors["stage1"]), _ms(authors["middle"]),
                _ms(authors["stage2"]), f"{copies:.3g}", f"{sdk_best:.3g}",
                _ratio(authors["total"]["median_ms"] / sdk_best),
            ])
        lines += _table(["size", "authors total", "stage1", "middle (host)", "stage2", "copies", "SDK best",
                         "authors / SDK"], rows)
    lines += ["", "## Middle step alone (median ms; GPU ones by CUDA events, tensors already on the device)", ""]
    names: List[str] = []
    for entry in report["middle_step"].values():
        names.extend(n for n in entry["stats"] if n not in names)
    rows = []
    for label, entry in report["middle_step"].items():
        if "error" in entry:
            rows.append([label, f"failed: {entry['error']}"])
            continue
        row = [label] + [_ms(entry["stats"].get(name)) for name in names]
        if spec:
            floor = entry["floor_ms"]
            kernel = entry["stats"].get("fused kernel (cupy)")
            row += [f"{floor:.3g}", _ratio(kernel["median_ms"] / floor if kernel else None)]
        rows.append(row)
    lines += _table(["size"] + names + (["kernel floor", "kernel / floor"] if spec else []), rows)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script")
    parser.add_argument("--sizes", help="default 256,720p,1080p (smoke: 64,96x128)")
    parser.add_argument("--presets", help="comma-separated U-Net presets (default lite,paper; smoke: lite)")
    parser.add_argument("--warmup", type=int, help="untimed runs (default 3; smoke 1)")
    parser.add_argument("--runs", type=int, help="timed runs of the SDK and the middle steps (default 20; smoke 3)")
    parser.add_argument("--authors-runs", type=int, help="timed runs of the authors' structure (default 5; smoke 2)")
    parser.add_argument("--device-table", default="auto",
                        help="a device table entry (h100, h200, ...: 'dereflect bench --help' lists them), "
                             "custom:TFLOPS,GBPS or auto (the running GPU)")
    parser.add_argument("--out", default="gpu-suite-results", help="folder for gpu_suite.json and gpu_suite.md")
    args = parser.parse_args(argv)
    defaults = SMOKE if args.cpu_smoke else {"sizes": "256,720p,1080p", "presets": "lite,paper", "warmup": 3,
                                             "runs": 20, "authors_runs": 5}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    missing = [f"{module} ({hint})" for module, hint in REQUIREMENTS.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        print("gpu_suite: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    from dereflect.errors import DereflectError

    try:
        return _suite(args, argv)
    except DereflectError as exc:
        print(f"gpu_suite: error: {exc}", file=sys.stderr)
        return 2


def _suite(args: argparse.Namespace, argv: Optional[List[str]]) -> int:
    import torch
    from dereflect.imageio import check_output_location
    from dereflect.tools.bench import machine_info, parse_sizes
    from dereflect.tools.flops import device_for_gpu, device_spec, middle_step_cost
    from dereflect.train.models.rm2s import UNetConfig

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("gpu_suite: torch sees no CUDA GPU; run with --cpu-smoke to check the script on the CPU",
              file=sys.stderr)
        return 2
    device, precision = ("cuda", "fp16") if cuda else ("cpu", "fp32")
    table: Optional[str] = None
    if args.device_table != "auto":
        table = device_spec(args.device_table).key if not args.device_table.startswith("custom:") \
            else args.device_table
    elif cuda:
        found = device_for_gpu(torch.cuda.get_device_name(0))
        table = found.key if found else None
    else:
        table = "h100"
    spec = device_spec(table) if table else None
    sizes = parse_sizes(args.sizes)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for preset in presets:
        UNetConfig.preset(preset)  # an unknown one: InputError naming those there are, before any run
    check_output_location(Path(args.out), folder=True)  # before minutes of measuring, not after
    machine = machine_info(on_gpu=cuda)
    machine["torch"] = torch.__version__
    if cuda:
        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["cuda"] = torch.version.cuda
    report: Dict[str, Any] = {
        "mode": "cpu smoke test" if args.cpu_smoke else "GPU", "machine": machine, "device": device,
        "precision": precision, "warmup": args.warmup, "runs": args.runs, "authors_runs": args.authors_runs,
        "device_table": spec.to_dict() if spec else None, "presets": {}, "middle_step": {},
        "command": " ".join(["python", "benchmarks/gpu_suite.py"] + list(argv if argv is not None else sys.argv[1:])),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    started = time.time()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="dereflect-gpu-suite-") as work:
        for preset in presets:
            try:
                report["presets"][preset] = run_preset(preset, Path(work), sizes, device, precision, table, args)
            except Exception as exc:  # noqa: BLE001 - keep the other presets' figures
                traceback.print_exc()
                report["presets"][preset] = {"error": repr(exc)}
            if cuda:
                torch.cuda.empty_cache()
            # Saved after every part: a run stopped by a time limit keeps what it measured.
            save(report, out)
    report["middle_step"] = middle_step_rows(sizes, device, args)
    for label, height, width in sizes:
        report["middle_step"][label]["floor_ms"] = (
            middle_step_cost(height, width).floor_ms(spec) if spec else None)
    report["seconds"] = time.time() - started
    print(save(report, out))
    _log(f"done in {report['seconds']:.0f} s; wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")
    failed = [p for p, data in report["presets"].items() if "error" in data]
    return 1 if failed else 0


def save(report: Dict[str, Any], out: Path) -> str:
    """Write gpu_suite.json and gpu_suite.md into ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    # The figures first: a table that fails to render must not cost a lease's measurements.
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "gpu_suite.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())

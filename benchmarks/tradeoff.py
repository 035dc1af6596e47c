"""The README's trade-off table: per model variant, its cost, CPU latency, a device floor and quality.

A *variant* is a model reference with the longest side its networks run at (``--max-side``;
larger frames go through the guided upsampling, see ``dereflect.remover``): the CPU real-time
variants are the same networks at reduced resolution.

    python benchmarks/tradeoff.py rm2s-lite@1024 rm2s-lite@384 crrn-lite@1024 \\
        --quality rm2s-lite@1024=eval/rm2s-real/report.json ...

Columns: GFLOP per megapixel the networks see (the compute budget), GFLOP per 1080p frame at the
variant's resolution, median CPU latency of ``Remover.remove`` on 640x360 and 1280x720 uint8
frames (this machine, ONNX Runtime), the predicted AGX Orin floor for a 1080p frame (FLOPs and
bytes of the networks and the middle step at the variant's resolution against 42 TFLOP/s FP16 and
204.8 GB/s; the guided upsampling is not counted), and the mean PSNR of each ``dereflect eval``
report given with ``--quality``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from dereflect.models import open_model
from dereflect.remover import Remover, fit_size
from dereflect.tools.bench import synthetic_frame
from dereflect.tools.flops import Cost, device_spec, pipeline_costs

SIZES = {"360p": (360, 640), "720p": (720, 1280)}
FLOOR_SIZE = (1080, 1920)


def parse_variant(text: str) -> Tuple[str, Optional[int]]:
    model, _, side = text.partition("@")
    return model, (int(side) if side else 1024)


def latency_ms(remover: Remover, height: int, width: int, warmup: int, runs: int) -> float:
    frame = (synthetic_frame(height, width) * 255).astype(np.uint8)
    for _ in range(warmup):
        remover.remove(frame)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        remover.remove(frame)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def network_costs(remover: Remover, height: int, width: int) -> Dict[str, Cost]:
    """FLOPs of the networks and the middle step for one frame of ``height`` x ``width`` network input."""
    manifest = remover.manifest
    files = [(name, manifest.path_of(name)) for name in remover.method.network_names]
    return pipeline_costs(files, height, width, remover.method.stages)


def row(variant: str, warmup: int, runs: int, qualities: Dict[str, List[str]]) -> List[str]:
    model, side = parse_variant(variant)
    remover = open_model(model, max_side=side)
    try:
        per_mp = sum(c.flops for c in network_costs(remover, 1000, 1000).values()) / 1e9
        net_h, net_w, _ = fit_size(*FLOOR_SIZE, remover.max_hw or FLOOR_SIZE)
        costs = network_costs(remover, net_h, net_w)
        orin = device_spec("agx-orin")
        frame_gflop = sum(c.flops for c in costs.values()) / 1e9
        floor = sum(c.floor_ms(orin) for c in costs.values())
        cpu = [latency_ms(remover, h, w, warmup, runs) for h, w in SIZES.values()]
    finally:
        remover.close()
    return [variant, f"{per_mp:.1f}", f"{frame_gflop:.1f} ({net_w}x{net_h})", f"{cpu[0]:.0f}", f"{cpu[1]:.0f}",
            f"{floor:.2f}", *qualities.get(variant, [])]


def read_quality(specs: Sequence[str]) -> Tuple[List[str], Dict[str, List[str]]]:
    """``VARIANT=REPORT.json`` pairs -> the quality columns (one per data set, in the order given)."""
    columns: List[str] = []
    values: Dict[str, Dict[str, str]] = {}
    for spec in specs:
        variant, _, path = spec.partition("=")
        report = json.loads(open(path, encoding="utf-8").read())
        column = f"{report['data']['dir'].rstrip('/').split('/')[-1]} PSNR (do nothing)"
        if column not in columns:
            columns.append(column)
        mean = report["mean"]
        baseline = mean["baseline"]["psnr"]  # null in JSON where the input is the ground truth (infinite)
        values.setdefault(variant, {})[column] = (f"{mean['model']['psnr']:.2f} "
                                                  f"({'inf' if baseline is None else format(baseline, '.2f')})")
    return columns, {v: [cells.get(c, "-") for c in columns] for v, cells in values.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="MODEL@MAXSIDE", help="e.g. rm2s-lite@1024 rm2s-lite@384")
    parser.add_argument("--quality", action="append", default=[], metavar="VARIANT=REPORT.json",
                        help="a dereflect eval report.json for a variant (repeatable; one column per data set)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per size (default 2)")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per size (default 10)")
    args = parser.parse_args(argv)
    columns, qualities = read_quality(args.quality)
    header = ["variant", "GFLOP/MP", "GFLOP per 1080p frame (network input)", "CPU ms 640x360",
              "CPU ms 1280x720", "AGX Orin floor ms (1080p)", *columns]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for variant in args.variants:
        print("| " + " | ".join(row(variant, args.warmup, args.runs, qualities)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

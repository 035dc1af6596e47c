"""The README's trade-off table: per model variant, its cost, CPU latency, a device floor and quality.

A *variant* is a model reference with the longest side its networks run at (``--max-side``;
larger frames go through the guided upsampling, see ``dereflect.remover``): the CPU real-time
variants are the same networks at reduced resolution.

    python benchmarks/tradeoff.py crrn-lite crrn-lite@160 crrn-lite@1024 rm2s-lite \\
        --quality crrn-lite=eval/crrn-real/report.json ...

A variant without ``@SIDE`` runs at its model's own side (the bundled models: 224), as ``dereflect
remove`` does. The table starts with the machine, the date and the number of runs.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from dereflect.errors import DereflectError, InputError
from dereflect.manifest import check_max_side
from dereflect.models import open_model, open_source
from dereflect.remover import Remover
from dereflect.tools.bench import machine_info, size_costs, synthetic_frame
from dereflect.tools.flops import device_spec
from dereflect.trt_api import NAMED_SIZES

SIZES = {name: NAMED_SIZES[name] for name in ("360p", "720p")}
FLOOR_SIZE = NAMED_SIZES["1080p"]


def parse_variant(text: str) -> Tuple[str, Any]:
    """``MODEL@SIDE`` -> (model, side); a bare ``MODEL`` runs at its own side ("model")."""
    model, at, side = text.partition("@")
    if not model:
        raise InputError(f"variant {text!r} names no model; write MODEL or MODEL@SIDE, e.g. crrn-lite@160")
    if not at:
        return model, "model"
    try:
        return model, int(side)
    except ValueError:
        raise InputError(f"variant {text!r}: the side after @ must be a whole number of pixels, "
                         f"e.g. crrn-lite@160") from None


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


def row(variant: str, model: str, side: Any, warmup: int, runs: int,
        qualities: Dict[str, List[str]]) -> List[str]:
    remover = open_model(model, max_side=side)
    try:
        per_mp = sum(c.flops for c in size_costs(remover, 1000, 1000, None).values()) / 1e9
        net_h, net_w = remover.network_size(*FLOOR_SIZE)
        costs = size_costs(remover, net_h, net_w, None)
        orin = device_spec("agx-orin")
        frame_gflop = sum(c.flops for c in costs.values()) / 1e9
        floor = sum(c.floor_ms(orin) for c in costs.values())
        cpu = [latency_ms(remover, h, w, warmup, runs) for h, w in SIZES.values()]
    finally:
        remover.close()
    return [variant, f"{per_mp:.1f}", f"{frame_gflop:.1f} ({net_h}x{net_w})", f"{cpu[0]:.0f}", f"{cpu[1]:.0f}",
            f"{floor:.2f}", *qualities.get(variant, [])]


def read_quality(specs: Sequence[str]) -> Tuple[List[str], Dict[str, List[str]]]:
    """``VARIANT=REPORT.json`` pairs -> the quality columns (one per data set, in the order given)."""
    columns: List[str] = []
    values: Dict[str, Dict[str, str]] = {}
    for spec in specs:
        variant, _, path = spec.partition("=")
        if not path:
            raise InputError(f"--quality {spec!r}: write VARIANT=REPORT.json")
        try:
            report = json.loads(open(path, encoding="utf-8").read())
            column = f"{report['data']['dir'].rstrip('/').split('/')[-1]} PSNR (do nothing)"
            mean = report["mean"]
            model_psnr = float(mean["model"]["psnr"])
            baseline = mean["baseline"]["psnr"]  # null in JSON where the input is the ground truth (infinite)
        except OSError as exc:
            raise InputError(f"--quality {path}: cannot read it ({exc.strerror or exc})") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"--quality {path}: not a report.json of dereflect eval") from None
        if column not in columns:
            columns.append(column)
        values.setdefault(variant, {})[column] = (f"{model_psnr:.2f} "
                                                  f"({'inf' if baseline is None else format(baseline, '.2f')})")
    return columns, {v: [cells.get(c, "-") for c in columns] for v, cells in values.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="MODEL[@SIDE]",
                        help="e.g. crrn-lite (its own side) crrn-lite@160 rm2s-lite@1024")
    parser.add_argument("--quality", action="append", default=[], metavar="VARIANT=REPORT.json",
                        help="a dereflect eval report.json for a variant (repeatable; one column per data set)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per size (default 2)")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per size (default 10)")
    args = parser.parse_args(argv)
    try:
        return _table(args)
    except DereflectError as exc:
        print(f"tradeoff: error: {exc}", file=sys.stderr)
        return 2


def _table(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0:
        raise InputError(f"--runs must be at least 1 and --warmup at least 0, got {args.runs} and {args.warmup}")
    # Every variant checked before anything is printed or timed (a table redirected to a file stays whole).
    variants = [parse_variant(variant) for variant in args.variants]
    if len(set(args.variants)) < len(args.variants):
        raise InputError(f"a variant is given twice in {' '.join(args.variants)}; list each once")
    for model, side in variants:
        open_source(model)
        if side != "model":
            check_max_side(side)
    columns, qualities = read_quality(args.quality)
    machine = machine_info()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine['cpu']} ({machine['cpu_count']} "
          f"logical CPUs), {machine['platform']}; median of {args.runs} runs after {args.warmup} untimed; "
          f"uint8 frames through Remover.remove\n")
    header = ["variant", "GFLOP/MP", "GFLOP per 1080p frame (network input)", "CPU ms 640x360",
              "CPU ms 1280x720", "AGX Orin floor ms (1080p)", *columns]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for variant, (model, side) in zip(args.variants, variants):
        print("| " + " | ".join(row(variant, model, side, args.warmup, args.runs, qualities)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

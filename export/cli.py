"""``dereflect export``: onnx, engine, verify and check subcommands.

Nothing heavy is imported here at import time: each subcommand imports its modules (and
torch, onnx or TensorRT) when it runs, through ``dereflect.errors.require`` so a missing extra
fails with the install line that fixes it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, List

from dereflect.errors import ModelError, require


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX / TensorRT and verify it (needs: pip install 'dereflect[export]')",
    )
    commands = parser.add_subparsers(dest="export_command", metavar="STEP")

    onnx = commands.add_parser("onnx",
                               help="checkpoint -> export directory (ONNX, FP16 ONNX, goldens, manifest)")
    onnx.add_argument("checkpoint", metavar="CHECKPOINT", help="an RM2S stage-2 or CRRN checkpoint")
    onnx.add_argument("-o", "--out", required=True, metavar="DIR", help="export directory to create")
    onnx.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the FP16 ONNX files")
    onnx.add_argument("--no-golden", dest="golden", action="store_false", help="skip the golden test files")
    onnx.add_argument("--force", action="store_true", help="replace an earlier export in DIR")
    onnx.add_argument("--name", default=None, help="model name in the manifest (default: the checkpoint's name)")
    onnx.add_argument("--opset", type=int, default=17,
                      help="ONNX opset (default 17, the highest TensorRT 8.5 reads)")
    onnx.set_defaults(func=run_onnx)

    engine = commands.add_parser("engine", help="build TensorRT engines on this device (needs TensorRT)")
    engine.add_argument("directory", metavar="DIR", help="export directory")
    precision = engine.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="fp16", action="store_true", default=True,
                           help="FP16 engines (default)")
    precision.add_argument("--fp32", dest="fp16", action="store_false", help="FP32 engines")
    for bound, default in (("min", "1x3x128x128"), ("opt", "720p"), ("max", "1080p")):
        engine.add_argument(f"--{bound}", metavar="SHAPE", default=None,
                            help=f"{bound} input shape of the profile: NxCxHxW, HxW or 480p/720p/1080p/... "
                                 f"(default {default})")
    engine.add_argument("--timing-cache", metavar="FILE", default=None,
                        help="timing cache file (default: one per TensorRT version and GPU in "
                             "~/.cache/dereflect)")
    engine.add_argument("--workspace", type=int, metavar="MIB", default=None,
                        help="builder workspace limit in MiB (default: TensorRT's)")
    engine.add_argument("--network", action="append", metavar="NAME",
                        help="build only this network (repeatable)")
    engine.set_defaults(func=run_engine)

    verify = commands.add_parser(
        "verify", help="run the networks on this device and compare with ONNX Runtime FP32 (goldens or your images)")
    verify.add_argument("model", metavar="MODEL", help="a bundled model's name or an export directory")
    verify.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                        help="onnxruntime (CPU, the ONNX files) or tensorrt (the engines built here) "
                             "(default: onnxruntime)")
    verify.add_argument("--fp16", action="store_true", help="with onnxruntime: verify the FP16 ONNX files")
    verify.add_argument("--network", action="append", metavar="NAME",
                        help="verify only this network (repeatable; default: all)")
    verify.add_argument("--images", metavar="DIR", default=None,
                        help="also compare on these images instead of the goldens: each network's outputs "
                             "against ONNX Runtime FP32 on the same inputs")
    verify.add_argument("--max-side", type=int, default=1024, metavar="N",
                        help="with --images: scale each image to this long side first (default 1024)")
    verify.add_argument("--min-psnr", type=float, default=None, metavar="DB",
                        help="pass limit in dB for every output (default: by precision: onnxruntime fp32 80, "
                             "fp16 45; tensorrt fp32 50, fp16 40)")
    verify.set_defaults(func=run_verify)

    check = commands.add_parser("check", help="static TensorRT compatibility report of the ONNX files")
    check.add_argument("directory", metavar="MODEL",
                       help="a bundled model's name, an export directory, or a single .onnx file")
    check.add_argument("--versions", default="8.5,10,11",
                       help="TensorRT versions, comma-separated (default 8.5,10,11)")
    check.set_defaults(func=run_check)

    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def run_onnx(args: argparse.Namespace) -> int:
    require("torch", "export", "exporting checkpoints")
    require("onnx", "export", "exporting checkpoints")
    from .onnx_export import export_onnx, export_summary

    manifest = export_onnx(args.checkpoint, args.out, fp16=args.fp16, opset=args.opset, golden=args.golden,
                           force=args.force, model_name=args.name)
    print("\n".join(export_summary(manifest)))
    return 0


def run_engine(args: argparse.Namespace) -> int:
    from .engine import build_engines

    _log_to_stderr()
    workspace = args.workspace * (1 << 20) if args.workspace else None
    infos = build_engines(args.directory, fp16=args.fp16, min_shape=args.min, opt_shape=args.opt,
                          max_shape=args.max, timing_cache=args.timing_cache, workspace=workspace,
                          networks=args.network)
    for name, info in infos.items():
        shapes = "; ".join(f"{k} {v['min']}..{v['max']} (opt {v['opt']})" for k, v in info.profiles.items())
        print(f"{name}: {info.engine} ({info.precision}, TensorRT {info.tensorrt_version}, {info.gpu_name} "
              f"sm {info.compute_capability}) {shapes}")
    print(f"check them with: dereflect export verify {args.directory} --backend tensorrt")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.model, backend=args.backend, fp16=args.fp16, networks=args.network, images=args.images,
                    max_side=args.max_side, min_psnr_db=args.min_psnr)
    print(report.format())
    return 0 if report.passed else 1


def _onnx_files(target: str) -> List[Path]:
    if Path(target).is_file() and Path(target).suffix == ".onnx":
        return [Path(target)]
    from dereflect.models import open_source

    source = open_source(target, check_hashes=False)
    if source.kind != "export":
        raise ModelError(f"{target} is a training checkpoint; export it first (dereflect export onnx)")
    manifest = source.manifest
    files = []
    for name, spec in manifest.networks.items():
        files.append(manifest.path_of(name))
        if spec.onnx_fp16:
            files.append(manifest.path_of(name, fp16=True))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"ONNX files listed in the manifest are missing: {', '.join(missing)}")
    return files


def run_check(args: argparse.Namespace) -> int:
    require("onnx", "export", "checking ONNX files")
    from .trt_support import check_trt_compat

    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    passed = True
    for path in _onnx_files(args.directory):
        report = check_trt_compat(path, versions)
        print(report.format())
        passed = passed and report.passed
    return 0 if passed else 1

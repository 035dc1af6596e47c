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

    verify = commands.add_parser("verify", help="run the networks on the golden files and compare")
    verify.add_argument("directory", metavar="DIR", help="export directory")
    verify.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                        help="onnxruntime (CPU, the ONNX files) or tensorrt (the engines built here)")
    verify.add_argument("--fp16", action="store_true", help="with onnxruntime: verify the FP16 ONNX files")
    verify.add_argument("--network", action="append", metavar="NAME",
                        help="verify only this network (repeatable)")
    verify.set_defaults(func=run_verify)

    check = commands.add_parser("check", help="static TensorRT compatibility report of the ONNX files")
    check.add_argument("directory", metavar="DIR", help="export directory (or a single .onnx file)")
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

    report = verify(args.directory, backend=args.backend, fp16=args.fp16, networks=args.network)
    print(report.format())
    return 0 if report.passed else 1


def _onnx_files(target: Path) -> List[Path]:
    if target.is_file() and target.suffix == ".onnx":
        return [target]
    from dereflect.manifest import load_manifest

    manifest = load_manifest(target, check_hashes=False)
    files = []
    for spec in manifest.networks.values():
        files.append(target / spec.onnx)
        if spec.onnx_fp16:
            files.append(target / spec.onnx_fp16)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"ONNX files listed in the manifest are missing: {', '.join(missing)}")
    return files


def run_check(args: argparse.Namespace) -> int:
    require("onnx", "export", "checking ONNX files")
    from .trt_support import check_trt_compat

    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    passed = True
    for path in _onnx_files(Path(args.directory)):
        report = check_trt_compat(path, versions)
        print(report.format())
        passed = passed and report.passed
    return 0 if passed else 1

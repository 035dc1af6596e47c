"""``dereflect export``: onnx, engine, verify and check subcommands.

Nothing heavy is imported here at import time: each subcommand imports its modules (and
torch, onnx or TensorRT) when it runs, through ``dereflect.errors.require`` so a missing extra
fails with the install line that fixes it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, List

from dereflect.errors import InputError, ModelError, require
from dereflect.manifest import DEFAULT_MAX_SIDE
from dereflect.models import BUNDLED_MODELS
from dereflect.stop_signals import StopSignals, exit_status
from dereflect.trt_api import DEFAULT_PROFILE, NAMED_SIZES

EXPORT_MODEL_HELP = f"a bundled model ({', '.join(BUNDLED_MODELS)}) or an export directory"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX, build TensorRT engines, verify and check models",
        description="onnx needs pip install 'dereflect[export]' (torch, onnx), check needs onnx, engine needs "
                    "TensorRT (on Jetson: JetPack's; elsewhere pip install 'dereflect[trt]'); verify needs only "
                    "the core install (and TensorRT for --backend tensorrt).",
    )
    commands = parser.add_subparsers(dest="export_command", metavar="STEP")

    onnx = commands.add_parser("onnx",
                               help="checkpoint -> export directory (ONNX, FP16 ONNX, goldens, manifest)")
    onnx.add_argument("checkpoint", metavar="CHECKPOINT",
                      help="an RM2S stage-2 or CRRN training checkpoint (.safetensors); a bundled model or an "
                           "export becomes one with 'dereflect train from-export MODEL -o FILE'")
    onnx.add_argument("-o", "--out", required=True, metavar="DIR", help="export directory to create")
    onnx.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the FP16 ONNX files")
    onnx.add_argument("--no-golden", dest="golden", action="store_false", help="skip the golden test files")
    onnx.add_argument("--force", action="store_true", help="replace an earlier export in DIR")
    onnx.add_argument("--name", default=None, help="model name in the manifest (default: the checkpoint's name)")
    onnx.add_argument("--max-side", type=int, default=None, metavar="N",
                      help="record the longest side the networks should run at (the scale the model was trained "
                           "to see); the runtime scales larger frames down and guides the result back up "
                           "(default: the side the checkpoint records: its training's --val-max-side, or that "
                           "of the export it was rebuilt from; older checkpoints record none: the runtime's "
                           f"{DEFAULT_MAX_SIDE})")
    onnx.add_argument("--opset", type=int, default=17,
                      help="ONNX opset (default: 17, the highest TensorRT 8.5 reads)")
    onnx.set_defaults(func=run_onnx)

    engine = commands.add_parser(
        "engine", help="build TensorRT engines on this device into a folder of yours (needs TensorRT)",
        description="Copy a model's export (manifest, ONNX and FP16 ONNX files, goldens) into DIR and build one "
                    "TensorRT engine per network there, with a sidecar recording TensorRT, GPU and profile. DIR is "
                    "then a self-contained export directory: check it with 'dereflect export verify DIR "
                    "--backend tensorrt' and run it with '--model DIR --backend tensorrt'. Engines are tied to "
                    "the TensorRT version and the GPU: build them on the device that runs them. The timing cache "
                    "is kept in $DEREFLECT_CACHE (see --timing-cache).")
    engine.add_argument("model", metavar="MODEL", help=EXPORT_MODEL_HELP)
    engine.add_argument("-o", "--out", metavar="DIR", default=None,
                        help="folder for the copy and the engines; an existing one holding this export is "
                             "reused, and the export directory itself builds in place (default: ./MODEL-engines "
                             "in the current directory; never inside the installed package)")
    precision = engine.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="fp16", action="store_true", default=True,
                           help="FP16 engines (default)")
    precision.add_argument("--fp32", dest="fp16", action="store_false", help="FP32 engines")
    model_default = {"min": "", "opt": " for a model without a max_side; else a 720p frame as the model's max_side "
                     "scales it, 128x224 for the bundled models, kept under --max",
                     "max": " for a model without a max_side; else the max_side square, 224x224 for the bundled "
                     "models (the most remove feeds their networks), widened to hold --opt"}
    for bound, default in DEFAULT_PROFILE.items():
        engine.add_argument(f"--{bound}", metavar="SHAPE", default=None,
                            help=f"{bound} frame size of the profile: HxW, a name ({', '.join(NAMED_SIZES)}) or "
                                 f"1xCxHxW (batch 1: the runtime runs one frame at a time) (default: {default}"
                                 f"{model_default[bound]})")
    engine.add_argument("--timing-cache", metavar="FILE", default=None,
                        help="timing cache file (default: timing-<TensorRT>-<GPU>.cache in $DEREFLECT_CACHE, "
                             "else ~/.cache/dereflect)")
    engine.add_argument("--workspace", type=int, metavar="MIB", default=None,
                        help="builder workspace limit in MiB (default or 0: TensorRT's, up to the GPU's memory)")
    engine.add_argument("--network", action="append", metavar="NAME",
                        help="build only this network; repeatable (default: all)")
    engine.add_argument("--no-progress", action="store_true",
                        help="no progress bars of the builder's phases (TensorRT 10 and later report them; "
                             "default: shown)")
    engine.set_defaults(func=run_engine)

    verify = commands.add_parser(
        "verify", help="run the networks on this device and compare with ONNX Runtime FP32 (goldens or your images)",
        description="Run each network of MODEL on the backend and compare its outputs with ONNX Runtime FP32: on the "
                    "export's golden cases (inputs and outputs written at export), or with --images on your own "
                    "photos (each run through the model on ONNX Runtime FP32 to get every network's inputs). A "
                    "model without goldens is compared on the same generated images, with the reference computed "
                    "here. Prints PSNR and largest error per network, case and output, the worst per output, and "
                    "the pass limit used.")
    verify.add_argument("model", metavar="MODEL", help=EXPORT_MODEL_HELP)
    verify.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                        help="onnxruntime (CPU, the ONNX files) or tensorrt (the engines built here) "
                             "(default: onnxruntime)")
    verify.add_argument("--fp16", action="store_true", help="with onnxruntime: verify the FP16 ONNX files")
    verify.add_argument("--network", action="append", metavar="NAME",
                        help="verify only this network (repeatable; default: all)")
    verify.add_argument("--images", metavar="DIR", default=None,
                        help="compare on the images in DIR instead of the goldens: each network's outputs "
                             "against ONNX Runtime FP32 on the same inputs; an image that cannot be read is named "
                             "and skipped (exit status 1) (default: the goldens)")
    verify.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="with --images: scale each image to fit this long side first, as remove does "
                             "(0: full size; default: the side the model records, as remove runs it, else "
                             f"{DEFAULT_MAX_SIDE})")
    verify.add_argument("--min-psnr", type=float, default=None, metavar="DB",
                        help="pass limit in dB for every output (default: by precision: onnxruntime fp32 80, "
                             "fp16 45; tensorrt fp32 50, fp16 40)")
    verify.set_defaults(func=run_verify)

    check = commands.add_parser(
        "check", help="static TensorRT compatibility report of the ONNX files",
        description="Check every ONNX file of MODEL (FP32 and FP16) against the operator tables of each TensorRT "
                    "version, without TensorRT (needs onnx: pip install 'dereflect[export]'). Exit status 1 when "
                    "a file fails for a version.")
    check.add_argument("directory", metavar="MODEL", help=EXPORT_MODEL_HELP + ", or a single .onnx file")
    check.add_argument("--versions", default="8.5,10,11",
                       help="TensorRT versions, comma-separated (default: 8.5,10,11)")
    check.set_defaults(func=run_check)

    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def run_onnx(args: argparse.Namespace) -> int:
    require("torch", "export", "exporting checkpoints")
    require("onnx", "export", "exporting checkpoints")
    from .onnx_export import export_onnx, export_summary

    manifest = export_onnx(args.checkpoint, args.out, fp16=args.fp16, opset=args.opset, golden=args.golden,
                           force=args.force, model_name=args.name, max_side=args.max_side)
    print("\n".join(export_summary(manifest)))
    return 0


def run_engine(args: argparse.Namespace) -> int:
    from .engine import build_engines, plan_engine_dir, require_tensorrt

    workspace = None if args.workspace is None else args.workspace * (1 << 20)
    # What needs no TensorRT first (model, networks, shapes, workspace, folder): a mistake is named as such on any
    # machine. Then TensorRT, before anything is copied: without it the folder would be made for nothing.
    plan = plan_engine_dir(args.model, args.out, networks=args.network, min_shape=args.min, opt_shape=args.opt,
                           max_shape=args.max, workspace=workspace)
    require_tensorrt()
    _log_to_stderr()
    manifest = plan.prepare()
    # Ctrl+C or SIGTERM: the build in progress is cancelled (TensorRT 10+) or finished, the engines built kept.
    with StopSignals() as signals:
        infos = build_engines(manifest.directory, fp16=args.fp16, min_shape=args.min, opt_shape=args.opt,
                              max_shape=args.max, timing_cache=args.timing_cache, workspace=workspace,
                              networks=args.network, progress=not args.no_progress, stop=signals)
    for name, info in infos.items():
        shapes = "; ".join(f"{k} {v['min']}..{v['max']} (opt {v['opt']})" for k, v in info.profiles.items())
        print(f"{name}: {info.engine} ({info.precision}, TensorRT {info.tensorrt_version}, {info.gpu_name} "
              f"sm {info.compute_capability}) {shapes}")
    if signals.received:
        print(f"dereflect: stopped by {signals.received} with {len(infos)} engine(s) built, kept in "
              f"{manifest.directory}; run the command again to build the rest (--network NAME builds one)",
              file=sys.stderr)
        return exit_status(signals.received)
    print(f"check them with: dereflect export verify {manifest.directory} --backend tensorrt")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    if args.max_side is not None and not args.images:
        raise InputError("--max-side sizes your photos (--images DIR); the goldens are checked at the size "
                         "they were recorded at")
    max_side = "model" if args.max_side is None else args.max_side
    report = verify(args.model, backend=args.backend, fp16=args.fp16, networks=args.network, images=args.images,
                    max_side=max_side, min_psnr_db=args.min_psnr)
    for message in report.unread.values():
        print(f"dereflect: error: {message}; skipped", file=sys.stderr)  # as remove names a file it skips
    print(report.format())
    if not report.compared:
        return 2
    # An image that could not be read is an item that failed, as in remove.
    return 0 if report.passed and not report.unread else 1


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
    from .trt_support import check_trt_compat, parse_versions

    versions = parse_versions(args.versions)
    passed = True
    for path in _onnx_files(args.directory):
        report = check_trt_compat(path, versions)
        print(report.format())
        passed = passed and report.passed
    return 0 if passed else 1

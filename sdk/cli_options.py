"""The model options every command that runs a model shares: declared once, read once.

``remove``, ``video``, ``eval`` and ``bench`` take the same model reference (a bundled model's
name, an export directory or a training checkpoint) and the same options, which
:func:`open_from_args` hands to :func:`dereflect.models.open_model`. (``export verify`` checks the
networks of an export on a backend, not the Remover, and declares its own options.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict

from dereflect.backends.base import BACKENDS, PRECISIONS, BackendOptions
from dereflect.methods.rm2s import THRESHOLDS, MiddleStepSettings
from dereflect.models import BUNDLED_MODELS
from dereflect.remover import DEFAULT_MAX_SIDE, LARGE_IMAGE_STRATEGIES

MODEL_HELP = (f"a bundled model ({', '.join(BUNDLED_MODELS)}), an export directory or a training checkpoint "
              "(.safetensors, runs on torch)")


def add_model_options(parser: argparse.ArgumentParser, positional: bool = False, output: bool = True) -> None:
    """Add the model reference (``MODEL`` or ``-m``/``--model``) and the runtime options to ``parser``.

    ``--max-side`` (the resolution the networks run at) is for every command. ``output``: also what
    shapes the output image, ``--large-image`` and ``--strength`` (not for ``bench``, which times
    ``remove``'s default handling of a frame).
    """
    if positional:
        parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    else:
        # -m: the short form users reach for (no command that takes --model uses -m for anything else).
        parser.add_argument("-m", "--model", metavar="MODEL", default=None,
                            help=f"{MODEL_HELP} (default: {BUNDLED_MODELS[0]})")
    group = parser.add_argument_group("model options")
    backend_defaults = BackendOptions()
    group.add_argument("--backend", default=None, choices=list(BACKENDS),
                       help="inference backend (default: onnxruntime for exports, torch for checkpoints)")
    group.add_argument("--device", default=backend_defaults.device, help="auto, cpu, cuda or cuda:N")
    group.add_argument("--precision", default=backend_defaults.precision, choices=PRECISIONS,
                       help="network precision; fp16 runs the export's FP16 ONNX files")
    group.add_argument("--checkpoint", metavar="FILE", default=None,
                       help="torch backend on an export directory: the training checkpoint it was made from "
                            "(default: none; an export runs on torch only with it)")
    group.add_argument("--threads", type=int, metavar="N", default=None,
                       help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    rm2s_defaults = MiddleStepSettings()
    group.add_argument("--threshold", choices=THRESHOLDS, default=None,
                       help=f"RM2S: how the CPU middle step finds its 2-means threshold (default: "
                            f"{rm2s_defaults.threshold}; the GPU kernel always bins a histogram)")
    group.add_argument("--c1", type=float, default=None, metavar="C",
                       help=f"RM2S: reflection-mask threshold offset (default: the model's, {rm2s_defaults.c1:g})")
    group.add_argument("--c2", type=float, default=None, metavar="C",
                       help=f"RM2S: background-mask threshold offset (default: the model's, {rm2s_defaults.c2:g})")
    larger = ("use --large-image" if output
              else "are scaled down to it and guided-upsampled back, as remove does by default")
    group.add_argument("--max-side", type=int, default=None, metavar="N",
                       help=f"longest side the networks run at; larger images {larger} (0: no limit; default: "
                            f"the side the model recommends, {DEFAULT_MAX_SIDE} for models without one)")
    if output:
        group.add_argument("--large-image", default=LARGE_IMAGE_STRATEGIES[0], choices=LARGE_IMAGE_STRATEGIES,
                           help="guided: run scaled down, guided-upsample the reflection layer; "
                                "tile: overlapping full-resolution tiles with blended seams")
        group.add_argument("--strength", type=float, default=None, metavar="K",
                           help="how much of the model's change to apply, 0 to 2: 0 leaves the input as it "
                                "is, below 1 changes less (photos without a reflection are left more alone), "
                                "above 1 amplifies the change, errors included (default: 1, the model's output)")


def model_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword options of :func:`dereflect.models.open_model` that ``args`` set."""
    options: Dict[str, Any] = {"backend": args.backend, "device": args.device, "precision": args.precision}
    for key in ("checkpoint", "threads", "threshold", "c1", "c2", "max_side", "strength"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    if hasattr(args, "large_image"):
        options["large_image"] = args.large_image
    return options


def open_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    """The Remover the command line asks for."""
    from dereflect.models import open_model

    remover = open_model(args.model, **{**model_options(args), **overrides})
    if remover.backend != "tensorrt" and remover.manifest.directory is not None:
        from dereflect.trt_api import engine_paths

        built = [name for name in remover.manifest.networks
                 if engine_paths(remover.manifest.directory, name)[0].is_file()]
        if built:
            # A folder from export engine opens on ONNX Runtime by default: its engines would sit unused.
            print(f"note: {args.model} holds TensorRT engines ({', '.join(built)}); this run uses "
                  f"{remover.backend}: pass --backend tensorrt to run them", file=sys.stderr)
    return remover

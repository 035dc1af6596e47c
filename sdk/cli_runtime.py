"""``dereflect remove`` (images and folders) and ``dereflect video`` (files and cameras)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Tuple

from dereflect.cli_options import add_model_options, open_from_args
from dereflect.errors import DereflectError, InputError

from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, is_image_file

INTERMEDIATE_SUFFIXES = {
    "stage1": "stage-1 estimate B1",
    "confidence": "confidence map C as a colour map (dark: no edge)",
    "mask_background": "background edge mask",
    "mask_reflection": "reflection edge mask",
    "reflection": "reflection layer I - B (clipped to [0, 1])",
    "gradient": "CRRN background gradient",
}


def register(subparsers: Any) -> None:
    remove = subparsers.add_parser(
        "remove",
        help="remove reflections from images",
        description="Remove reflections from image files and folders of images. A single input file with an "
                    "image file name as -o writes that file; otherwise -o is a folder and outputs keep the "
                    "input names. Inputs are never overwritten.",
    )
    remove.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders")
    remove.add_argument("-o", "--output", required=True, metavar="OUT", help="output file or folder")
    remove.add_argument("--save-intermediates", action="store_true",
                        help="also write NAME.stage1.png, NAME.confidence.png, NAME.mask_background.png, "
                             "NAME.mask_reflection.png and NAME.reflection.png next to each output")
    remove.add_argument("--overwrite", action="store_true", help="replace existing output files")
    remove.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS:,})")
    add_model_options(remove)
    remove.set_defaults(func=run_remove)


def _collect_inputs(inputs: List[str]) -> List[Path]:
    files: List[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
            if not found:
                raise InputError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise InputError(f"{path}: file not found")
    return files


def plan_outputs(inputs: List[str], output: str) -> List[Tuple[Path, Path]]:
    """(input, output) pairs: one file to a file name, else into the folder ``output``."""
    files = _collect_inputs(inputs)
    out = Path(output)
    single = len(inputs) == 1 and Path(inputs[0]).is_file()
    if single and is_image_file(out) and not out.is_dir():
        return [(files[0], out)]
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; with several inputs -o must be a folder")
    pairs = []
    seen = {}
    for path in files:
        target = out / path.name
        if target in seen:
            raise InputError(f"{path} and {seen[target]} would both be written to {target}; rename one")
        seen[target] = path
        pairs.append((path, target))
    return pairs


def _save_intermediates(result: Any, target: Path, overwrite: bool) -> List[Path]:
    import cv2
    import numpy as np

    from .imageio import write_image

    written = []
    base = target.with_suffix("")

    def name(key: str) -> Path:
        return base.with_name(f"{base.name}.{key}.png")

    if result.stage1 is not None:
        written.append(write_image(name("stage1"), result.stage1, overwrite=overwrite))
    if result.confidence is not None:
        conf = result.confidence
        edges = conf[conf > 0]
        scaled = np.zeros(conf.shape, np.uint8)
        if edges.size:
            # The 99th percentile, not the maximum: a few extreme ratios would leave the rest dark.
            top = float(np.percentile(edges, 99))
            scaled = (np.clip(conf / top, 0, 1) * 255).astype(np.uint8)
        coloured = cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO)[:, :, ::-1]
        written.append(write_image(name("confidence"), coloured, overwrite=overwrite))
    for key in ("mask_background", "mask_reflection", "gradient"):
        value = getattr(result, key)
        if value is not None:
            plane = value.astype(np.float32)
            if key == "gradient" and plane.max() > 0:
                plane = plane / plane.max()
            grey = np.repeat(plane[:, :, None], 3, axis=2)
            written.append(write_image(name(key), grey, overwrite=overwrite))
    written.append(write_image(name("reflection"), np.clip(result.reflection, 0, 1), overwrite=overwrite))
    return written


def run_remove(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .imageio import read_image, write_image

    pairs = plan_outputs(args.inputs, args.output)
    for source, target in pairs:
        if target.exists() and source.resolve() == target.resolve():
            raise InputError(f"{target}: refusing to overwrite the input image; choose another output")
    remover = open_from_args(args)
    failures = 0
    with tqdm(pairs, unit="image", disable=len(pairs) < 2, file=sys.stderr) as bar:
        for source, target in bar:
            try:
                rgb, info = read_image(source, max_pixels=args.max_pixels or None)
                if args.save_intermediates:
                    result = remover.remove_with_intermediates(rgb)
                    background = result.background
                else:
                    background = remover.remove(rgb)
                write_image(target, background, info, overwrite=args.overwrite)
                if args.save_intermediates:
                    _save_intermediates(result, target, args.overwrite)
                bar.write(f"{source} -> {target}")
            except DereflectError as exc:
                failures += 1
                bar.write(f"dereflect: error: {exc}", file=sys.stderr)
    if failures:
        print(f"dereflect: {failures} of {len(pairs)} image(s) failed", file=sys.stderr)
        return 1
    return 0


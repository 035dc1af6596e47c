"""``dereflect eval``: score a model against ground truth, beside a "do nothing" baseline.

::

    from dereflect.tools.evaluate import evaluate
    report = evaluate("exports/rm2s-lite", "data/real20_420", resize="short:420", out_dir="eval/real20")
    print(report.to_markdown())

**Dataset layouts** (``layout=``; ``"auto"`` tries them in this order):

* ``paired`` (aliases ``real20``, ``nature``): ``DIR/blended/NAME.*`` (input) with
  ``DIR/transmission_layer/NAME.*`` (ground-truth background), the layout Real20 and Nature
  are distributed in; or ``DIR/input/`` with ``DIR/target/``. Files pair by stem, so the
  extensions may differ.
* ``ceilnet``: CEILNet's synthetic triplets, ``DIR/NAME-input.*`` with ``DIR/NAME-label1.*``
  (background); ``NAME-label2.*`` (reflection) may be present and is not needed.
* ``sir2``: SIR^2 (SolidObject, Postcard and WildScene subsets) in either of its two common
  forms, searched recursively below ``DIR`` (hidden folders skipped):

  - as repackaged by most reflection-removal code (ERRNet and later):
    ``DIR/<subset>/blended/NAME.*`` with ``DIR/<subset>/transmission_layer/NAME.*``
    (``reflection_layer/`` ignored); image names are ``<subset>/NAME``;
  - as captured, with one letter per layer: ``m`` mixture (input), ``g`` ground-truth
    background, ``r`` reflection (ignored). Either files ``m.*``, ``g.*`` in a folder per scene
    (the name is the folder's path below ``DIR``), or ``PREFIX_m.*``, ``PREFIX_g.*`` (the name
    is ``<folder>/PREFIX``). Letters match case-insensitively.

A name present on one side only (an input without ground truth or the reverse) raises
InputError listing them: a silently smaller test set would give incomparable numbers.

**Region masks** (``masks=DIR``) give the regional SSIMr / SIr of CRRN: ``DIR/<name>.*`` per
image (nested folders for SIR2 names), white (> 0.5) where the region is. Every image needs
one; an all-black mask leaves that image's regional scores empty (null) and out of the mean.
``masks="auto"`` derives each pair's mask from the pair itself (:func:`reflection_mask`): for real
pairs without drawn masks (Zhang et al.'s, your own), the regional scores say what a model does
where the reflection is, which whole-image PSNR mixes with how little it changes elsewhere.

**Resize protocol** (``resize=``): ``"native"`` scores at the files' resolution;
``"short:N"`` first resizes input, ground truth and mask so the short side is N pixels (aspect
kept, long side rounded; OpenCV INTER_AREA when shrinking, INTER_CUBIC when enlarging, nearest
for masks). Published Real20 numbers differ by up to 1 dB between short sides 300, 420 and
512, so the protocol is written into every report. Independently, the runtime runs the
networks at most ``max_side`` pixels on the long side (by default the side the model records, else 1024) and
guided-upsamples the result; the report records that limit and how many images it touched.

**Metrics** are computed on the background as RGB float in [0, 1] (data range 1) with
:mod:`dereflect.tools.metrics`: PSNR, SSIM (skimage's Gaussian-window definition), SI, and with
masks SSIMr / SIr. Means are plain means of the per-image values. The baseline row scores the
input itself as the background.

**Models**: an export directory (ONNX Runtime by default, any runtime backend), a training
checkpoint ``.safetensors`` (PyTorch, extra ``train``; an RM2S stage-1 checkpoint is scored
as stage 1 alone), or any object with ``remove_with_intermediates(image, colour_order="RGB") -> Result`` such as
a :class:`~dereflect.remover.Remover`.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import math
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from dereflect import __version__
from dereflect.backends.base import BackendOptions
from dereflect.cli import EXIT_OK, EXIT_SOME_FAILED
from dereflect.cli_options import add_model_options, model_options
from dereflect.errors import InputError, ModelError
from dereflect.imageio import (
    as_float_rgb,
    check_output_location,
    is_image_file,
    one_line_error,
    read_image,
    staged_file,
    write_image,
)
from dereflect.remover import LARGE_IMAGE_STRATEGIES, at_strength
from dereflect.stop_signals import StopSignals, exit_status
from dereflect.tools.bench import machine_info
from dereflect.tools.datasets import (
    LAYOUTS,
    Pair,
    PathLike,
    check_pair_sizes,
    filter_pairs,
    find_pairs,
    read_name_list,
    read_pair,
)
from dereflect.tools.metrics import (
    AUTO_MASK_BLUR,
    AUTO_MASK_LEVEL,
    RADIUS,
    SIGMA,
    WINDOW,
    best_channel_gains,
    psnr,
    reflection_mask,
    si,
    si_region,
    ssim,
    ssim_region,
)

BASE_METRICS = ("psnr", "ssim", "si")
REGION_METRICS = ("ssimr", "sir")
METRIC_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "si": "SI", "ssimr": "SSIMr", "sir": "SIr"}
BASELINE_LABEL = "do nothing (input as output)"
CONTACT_COLUMNS = ("input", "stage 1", "confidence", "result", "ground truth")
#: The columns of the eval contact sheet only some methods have (RM2S's); left out when no row has them.
OPTIONAL_COLUMNS = ("stage 1", "confidence")
#: The contact sheet's last column for photos without ground truth: what the model took away.
CHANGE_COLUMN = "4x |change|"
CONTACT_TILE = 160
DEFAULT_CONTACT_IMAGES = 4
#: ImageScores' rows after the best channel gains (--colour-fitted)
FITTED_ROWS = ("model_fitted", "baseline_fitted")
REPORT_FILES = {"markdown": "report.md", "json": "report.json", "contact_sheet": "contact_sheet.png"}

# --------------------------------------------------------------------------- resize protocol


def parse_resize(spec: str) -> Optional[int]:
    """``"native"`` -> None, ``"short:N"`` -> N (the short side in pixels)."""
    text = str(spec).strip().lower()
    if text == "native":
        return None
    match = re.fullmatch(r"short:(\d+)", text)
    if not match:
        raise InputError(f"resize must be 'native' or 'short:N' (e.g. short:420), not {spec!r}")
    short = int(match.group(1))
    if short < WINDOW:
        raise InputError(f"resize short:{short} is too small: SSIM needs at least {WINDOW} pixels a side")
    return short


def describe_resize(short: Optional[int]) -> str:
    if short is None:
        return "native: images scored at the files' resolution"
    return (f"short:{short}: input, ground truth and mask resized so the short side is {short} px "
            "(aspect kept, long side rounded; INTER_AREA when shrinking, INTER_CUBIC when enlarging, "
            "nearest for masks)")


def resize_short(image: np.ndarray, short: Optional[int], nearest: bool = False) -> np.ndarray:
    """``image`` resized so its short side is ``short`` (None: unchanged); see the module doc."""
    if short is None:
        return image
    height, width = image.shape[:2]
    scale = short / min(height, width)
    if scale == 1.0:
        return image
    size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    if nearest:
        return cv2.resize(image.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return np.clip(cv2.resize(image, size, interpolation=interpolation), 0.0, 1.0)


#: ``masks=AUTO_MASKS`` derives each pair's reflection-region mask from the pair (see reflection_mask).
AUTO_MASKS = "auto"


def _auto_mask_level() -> str:
    """The level an automatic mask's pixels exceed, in 8-bit steps as written: "12/255"."""
    return f"{round(AUTO_MASK_LEVEL * 255)}/255"


def _masks_text(masks: str) -> str:
    if masks == AUTO_MASKS:
        return (f"derived from each pair: input brighter than ground truth by > {_auto_mask_level()} "
                f"after a {AUTO_MASK_BLUR:g}-px blur")
    return f"from {masks}"


def load_pair(pair: Pair, short: Optional[int] = None, auto_mask: bool = False
              ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Input and ground truth (RGB float32 in [0, 1]; None for a photo without one) and the mask
    (bool HxW or None; with ``auto_mask`` the pair's :func:`reflection_mask`), resized."""
    if pair.target is None:
        return resize_short(read_image(pair.input)[0], short), None, None
    image, target = read_pair(pair)
    mask = None
    if pair.mask is not None:
        mask_rgb, _ = read_image(pair.mask)
        if mask_rgb.shape[:2] != image.shape[:2]:
            raise InputError(
                f"{pair.name}: mask {pair.mask} is {mask_rgb.shape[0]}x{mask_rgb.shape[1]}, the image "
                f"{image.shape[0]}x{image.shape[1]}"
            )
        mask = resize_short(mask_rgb.mean(axis=2) > 0.5, short, nearest=True)
    image, target = resize_short(image, short), resize_short(target, short)
    return image, target, reflection_mask(image, target) if auto_mask else mask


# --------------------------------------------------------------------------- models


def load_model(model: Any, **options: Any) -> Any:
    """``model`` as is when it has ``remove_with_intermediates``, else opened by the one route
    (:func:`dereflect.models.open_model`: a bundled name, an export directory or a checkpoint)."""
    if hasattr(model, "remove_with_intermediates"):
        return model
    from dereflect.models import open_model

    return open_model(model, **options)


def _subset_of(name: str) -> Optional[str]:
    """The sub-folder a pair's name starts with (SIR2's ``WildScene/54``: ``WildScene``), else None."""
    head, sep, _ = name.partition("/")
    return head if sep else None


class PredictionFolder:
    """Outputs made elsewhere (another method's, a paper's released results), scored as a model's: the
    output of pair NAME is ``DIR/NAME.*`` (SIR2's ``<subset>/NAME`` in a sub-folder), at the pair's own
    size, resized by the same protocol as the pair."""

    backend = "precomputed outputs"

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"--predictions: {self.folder} is not a folder of outputs")
        self.name = self.folder.name

    def result(self, pair: Pair, image: np.ndarray, short: Optional[int]) -> Any:
        """The output for ``pair`` as the model's result would be: ``background`` at ``image``'s size."""
        from types import SimpleNamespace

        stem = self.folder / pair.name
        found = sorted(path for path in stem.parent.glob(f"{glob.escape(stem.name)}.*") if is_image_file(path))
        if not found:
            raise InputError(f"--predictions: no output for pair '{pair.name}' in {self.folder} "
                             f"(expected {pair.name}.png or another image file named so)")
        output = resize_short(read_image(found[0])[0], short)
        if output.shape != image.shape:
            raise InputError(f"--predictions: {found[0]} is {output.shape[0]}x{output.shape[1]} after the resize "
                             f"protocol, the pair's input {image.shape[0]}x{image.shape[1]}: outputs must have "
                             "their input's size")
        return SimpleNamespace(background=output, scale=1.0)


def describe_model(model: Any, source: Any = None) -> Dict[str, Any]:
    """What the report says about the model: name, method, backend, file and runtime limits."""
    manifest = getattr(model, "manifest", None)
    runs_itself = hasattr(source, "remove_with_intermediates") or isinstance(source, PredictionFolder)
    path = None if source is None or runs_itself else Path(source)
    method = getattr(model, "method", None)
    info: Dict[str, Any] = {
        "name": getattr(manifest, "name", None) or getattr(model, "name", None)
        or (path.stem if path is not None else type(model).__name__),
        "method": getattr(method, "name", method),
        "backend": getattr(model, "backend", None),
        "source": str(path) if path is not None else None,
        "max_side": None,
        "large_image": getattr(model, "large_image", None),
        "strength": getattr(model, "strength", None),
    }
    max_hw = getattr(model, "max_hw", None)
    if max_hw:
        info["max_side"] = int(max(max_hw))
    if hasattr(model, "describe"):
        # Where and at what precision the networks ran: fp16 and fp32 runs of one model score differently.
        info["runtime"] = getattr(model.describe(), "text", None)
    networks = getattr(manifest, "networks", None) or {}
    if networks:
        # Which weights were scored: the files' SHA-256 as the manifest checks them.
        info["networks"] = {name: {"onnx": spec.onnx, "sha256": spec.sha256} for name, spec in networks.items()}
    training = ((getattr(manifest, "checkpoint", None) or {}).get("metadata") or {}).get("training")
    if training:
        info["training"] = training
    return info


# --------------------------------------------------------------------------- report


def _clean(value: Optional[float]) -> Optional[float]:
    """JSON has no infinity (PSNR of identical images) or NaN: those become null."""
    return value if value is not None and math.isfinite(value) else None


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (e.g. in recorded training metadata) made null."""
    if isinstance(value, float):
        return _clean(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class ImageScores:
    """Per-image scores of the model, of the baseline (the input itself) and, when asked for, of the
    global-gain baseline (the input times three fixed channel gains)."""

    name: str
    height: int
    width: int
    model: Dict[str, Optional[float]]
    baseline: Dict[str, Optional[float]]
    seconds: float
    scale: float = 1.0
    gain: Optional[Dict[str, Optional[float]]] = None
    #: mean absolute change the model made, |output - input| in [0, 1]
    change: float = 0.0
    #: with colour fitting: the model's output and the input, each after its best channel gains
    model_fitted: Optional[Dict[str, Optional[float]]] = None
    baseline_fitted: Optional[Dict[str, Optional[float]]] = None

    def to_dict(self) -> Dict[str, Any]:
        out = {
            "name": self.name, "height": self.height, "width": self.width,
            "model": {k: _clean(v) for k, v in self.model.items()},
            "baseline": {k: _clean(v) for k, v in self.baseline.items()},
            "seconds": round(self.seconds, 4), "scale": self.scale, "mean_change": round(self.change, 6),
        }
        if self.gain is not None:
            out["gain_baseline"] = {k: _clean(v) for k, v in self.gain.items()}
        for key in FITTED_ROWS:
            if getattr(self, key) is not None:
                out[key] = {k: _clean(v) for k, v in getattr(self, key).items()}
        return out


@dataclass
class Report:
    """The result of :func:`evaluate`: per-image scores, means and the protocol they were made under."""

    model: Dict[str, Any]
    data: Dict[str, Any]
    protocol: Dict[str, Any]
    metrics: Tuple[str, ...]
    images: List[ImageScores]
    contact_sheet: Optional[np.ndarray] = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat("T", "seconds"))
    #: the global-gain baseline's gains and where they come from (None: not scored)
    gain_baseline: Optional[Dict[str, Any]] = None
    #: whether the model and the input were also scored after their best channel gains
    colour_fitted: bool = False
    #: False for photos without ground truth (layout "photos"): nothing scored, only the change measured
    ground_truth: bool = True
    #: the contact sheet's columns (None: all of :attr:`contact_columns`'s); those no row has are left out
    sheet_columns: Optional[Tuple[str, ...]] = None
    #: photos (layout "photos") that could not be read and were skipped: one line each, naming the file
    skipped: List[str] = field(default_factory=list)
    #: where it ran: OS, CPU, Python and library versions (``dereflect.tools.bench.machine_info``)
    machine: Dict[str, Any] = field(default_factory=dict)

    @property
    def model_label(self) -> str:
        """The model's name, with its strength where that is not the model's own output (1)."""
        return self.model["name"] + at_strength(self.model.get("strength"))

    def mean(self, row: str = "model", subset: Optional[str] = None) -> Dict[str, Optional[float]]:
        """Mean of each metric over the images where it is defined (``row``: "model", "baseline", "gain",
        "model_fitted" or "baseline_fitted"); ``subset``: over that subset's images only (:attr:`subsets`)."""
        images = [s for s in self.images if subset is None or _subset_of(s.name) == subset]
        out: Dict[str, Optional[float]] = {}
        for metric in self.metrics:
            values = [getattr(s, row)[metric] for s in images
                      if getattr(s, row) is not None and getattr(s, row)[metric] is not None]
            out[metric] = float(np.mean(values)) if values else None
        return out

    @property
    def mean_change(self) -> float:
        """Mean over the images of |output - input| (in [0, 1]); 0 with no images."""
        return float(np.mean([s.change for s in self.images])) if self.images else 0.0

    @property
    def seconds_per_image(self) -> float:
        return float(np.mean([s.seconds for s in self.images])) if self.images else 0.0

    @property
    def contact_columns(self) -> Tuple[str, ...]:
        """The contact sheet's columns: those drawn when it is made, else every one the data could have."""
        if self.sheet_columns is not None:
            return self.sheet_columns
        return CONTACT_COLUMNS if self.ground_truth else CONTACT_COLUMNS[:-1] + (CHANGE_COLUMN,)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "dereflect_version": __version__,
            "created": self.created,
            "model": self.model,
            "data": self.data,
            "protocol": self.protocol,
            "metrics": list(self.metrics),
            "mean": {
                "baseline": {k: _clean(v) for k, v in self.mean("baseline").items()},
                "model": {k: _clean(v) for k, v in self.mean("model").items()},
                "model_seconds_per_image": round(self.seconds_per_image, 4),
                "model_mean_change": round(self.mean_change, 6) if self.images else None,
                **({"gain_baseline": {k: _clean(v) for k, v in self.mean("gain").items()}}
                   if self.gain_baseline else {}),
                **{key: {k: _clean(v) for k, v in self.mean(key).items()} for key in FITTED_ROWS
                   if self.colour_fitted},
            },
            "gain_baseline": self.gain_baseline,
            **({"region_images": self.region_images} if set(REGION_METRICS) & set(self.metrics) else {}),
            **({"subsets": {subset: {"images": count,
                                     "baseline": {k: _clean(v) for k, v in self.mean("baseline", subset).items()},
                                     "model": {k: _clean(v) for k, v in self.mean("model", subset).items()}}
                            for subset, count in self.subsets.items()}} if self.subsets else {}),
            "machine": self.machine,
            "images": [s.to_dict() for s in self.images],
            **({"skipped": list(self.skipped)} if self.skipped else {}),
        }

    @property
    def subsets(self) -> Dict[str, int]:
        """Subset -> image count, for data sets whose pairs sit in sub-folders (SIR2's ``<subset>/NAME``):
        published tables report each subset apart. Empty when there are none, or only one."""
        counts: Dict[str, int] = {}
        for scores in self.images:
            subset = _subset_of(scores.name)
            if subset is not None:
                counts[subset] = counts.get(subset, 0) + 1
        return counts if len(counts) > 1 else {}

    @property
    def region_images(self) -> int:
        """How many images the region metrics (SSIMr, SIr) are averaged over: those whose region is not empty."""
        return sum(1 for s in self.images if s.model.get("ssimr") is not None)

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False) + "\n"

    def mean_table(self) -> str:
        """The Markdown table of means: baseline, model, and the model's gain over the baseline; for photos
        without ground truth, what the model did: images, mean change and time per image."""
        if not self.ground_truth:
            # Every score would be empty: a table of them would say nothing.
            return "\n".join([
                "| | images | mean change | s/image |", "|---|---|---|---|",
                f"| {self.model_label} | {len(self.images)} | {255 * self.mean_change:.2f} / 255 | "
                f"{self.seconds_per_image:.3f} |",
                "",
                "No ground truth: nothing scored. Mean change: |output - input| per pixel and channel.",
            ])
        labels = [METRIC_LABELS[m] for m in self.metrics]
        lines = ["| | " + " | ".join(labels) + " | s/image |", "|---" * (len(labels) + 2) + "|"]
        base, model = self.mean("baseline"), self.mean("model")
        lines.append(f"| {BASELINE_LABEL} | " + " | ".join(_fmt(m, base[m]) for m in self.metrics) + " | - |")
        lines.append(f"| {self.model_label} | " + " | ".join(_fmt(m, model[m]) for m in self.metrics)
                     + f" | {self.seconds_per_image:.3f} |")
        lines.append("| gain over do nothing | " + _differences(self.metrics, model, base) + " | |")
        if self.gain_baseline:
            gain = self.mean("gain")
            label = "global gain (" + ", ".join(f"{g:.3f}" for g in self.gain_baseline["gain"]) + ")"
            lines.insert(3, f"| {label} | " + " | ".join(_fmt(m, gain[m]) for m in self.metrics) + " | - |")
            lines.append("| gain over global gain | " + _differences(self.metrics, model, gain) + " | |")
        if self.colour_fitted:
            fitted_base, fitted_model = self.mean("baseline_fitted"), self.mean("model_fitted")
            lines.append(f"| {BASELINE_LABEL}, colour fitted | "
                         + " | ".join(_fmt(m, fitted_base[m]) for m in self.metrics) + " | - |")
            lines.append(f"| {self.model_label}, colour fitted | "
                         + " | ".join(_fmt(m, fitted_model[m]) for m in self.metrics) + " | |")
            lines.append("| gain over do nothing, colour fitted | "
                         + _differences(self.metrics, fitted_model, fitted_base) + " | |")
        if self.images:
            lines.append(f"\nMean change the model made: {255 * self.mean_change:.2f} / 255 per pixel and channel")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        p, d = self.protocol, self.data
        lines = [
            f"# dereflect eval: {self.model_label}",
            "",
            f"- Model: {self.model_label} ({self.model.get('method') or 'unknown method'}, "
            f"backend {self.model.get('backend') or 'n/a'})" + (f", from {self.model['source']}"
                                                               if self.model.get("source") else ""),
            f"- Data: {d['dir']} (layout {d['layout']}, {d['images']} images"
            + (f", region masks {_masks_text(d['masks'])}" if d.get("masks") else "") + ")",
            *([f"- Region metrics (SSIMr, SIr): over {self.region_images} of {len(self.images)} images (the others' "
               "region is empty)"] if set(REGION_METRICS) & set(self.metrics) else []),
            f"- Resize protocol: {p['resize_description']}",
            f"- Network resolution: {p['network_resolution']}",
            f"- Metrics: {p['metrics']}" if self.ground_truth else
            "- Metrics: none (no ground truth); mean change |output - input| per pixel and channel",
            *([f"- Contact sheet: {REPORT_FILES['contact_sheet']} ({' | '.join(self.contact_columns)})"]
              if self.contact_sheet is not None else []),
            f"- dereflect {__version__}, {self.created}"
            + (f"; {self.model['runtime']}" if self.model.get("runtime") else "")
            + (f"; {self.machine.get('cpu')}, Python {self.machine.get('python')}" if self.machine else ""),
            *([f"- **Partial**: stopped {p['stopped']}"] if p.get("stopped") else []),
            *([f"- **Skipped**: {len(self.skipped)} unreadable image(s), not in the means: "
               + "; ".join(self.skipped)] if self.skipped else []),
            "",
            "## Mean",
            "",
            self.mean_table(),
            "",
            *(self._subset_table() if self.subsets and self.ground_truth else []),
            "## Per image (input -> model)" if self.ground_truth else "## Per image",
            "",
        ]
        if not self.ground_truth:
            lines += ["| image | size | mean change | s |", "|---|---|---|---|"]
            lines += [f"| {s.name} | {s.height}x{s.width} | {255 * s.change:.2f} / 255 | {s.seconds:.3f} |"
                      for s in self.images]
            return "\n".join(lines) + "\n"
        labels = [METRIC_LABELS[m] for m in self.metrics]
        lines.append("| image | size | " + " | ".join(f"{lab} in | {lab} out" for lab in labels) + " |")
        lines.append("|---" * (2 + 2 * len(labels)) + "|")
        for s in self.images:
            cells = [f"{_fmt(m, s.baseline[m])} | {_fmt(m, s.model[m])}" for m in self.metrics]
            lines.append(f"| {s.name} | {s.height}x{s.width} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def _subset_table(self) -> List[str]:
        """Markdown lines: the mean per subset (input -> model), as published tables give SIR2's."""
        labels = [METRIC_LABELS[m] for m in self.metrics]
        lines = ["## Mean per subset (input -> model)", "",
                 "| subset | images | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
        for subset, count in self.subsets.items():
            base, model = self.mean("baseline", subset), self.mean("model", subset)
            lines.append(f"| {subset} | {count} | "
                         + " | ".join(f"{_fmt(m, base[m])} -> {_fmt(m, model[m])}" for m in self.metrics) + " |")
        return lines + [""]

    def write(self, out_dir: PathLike) -> Dict[str, Path]:
        """Write report.md, report.json and (when made) contact_sheet.png into ``out_dir``, replacing an
        earlier report there (:func:`check_out_dir` refuses that up front without ``overwrite``)."""
        out = Path(out_dir)
        check_output_location(out, folder=True)
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        for key, text in (("markdown", self.to_markdown()), ("json", self.to_json())):
            path = out / REPORT_FILES[key]
            with staged_file(path) as staged:
                staged.write_text(text)
            written[key] = path
        sheet = out / REPORT_FILES["contact_sheet"]
        if self.contact_sheet is not None:
            written["contact_sheet"] = write_image(sheet, self.contact_sheet, overwrite=True)
        elif os.path.lexists(sheet):
            # An earlier report's sheet beside this report would pass for its own.
            sheet.unlink()
        return written


def _differences(metrics: Sequence[str], a: Dict[str, Optional[float]], b: Dict[str, Optional[float]]) -> str:
    return " | ".join(_fmt(m, a[m] - b[m], signed=True) if a[m] is not None and b[m] is not None else "-"
                      for m in metrics)


def read_gain_baseline(spec: Any) -> Dict[str, Any]:
    """The global-gain baseline from "R,G,B" or a JSON file ``{"gain": [r, g, b], ...}`` (written by
    ``dereflect train fit-gain``); returns ``{"gain": [...], "source": ...}``."""
    text = str(spec)
    path = Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            gain = data["gain"]
            source = {**{k: v for k, v in data.items() if k not in ("gain", "pairs")}, "file": text}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"--gain-baseline {path}: not a gain file ({exc!r}); expected {{\"gain\": [r, g, b]}}") \
                from None
    else:
        try:
            gain, source = [float(v) for v in text.split(",")], {"given": text}
        except ValueError:
            raise InputError(f"--gain-baseline {text!r}: give R,G,B (three numbers) or a gain JSON file") from None
    if (len(gain) != 3 or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g)
                                  and g > 0 for g in gain)):
        raise InputError(f"--gain-baseline: three positive gains (R, G, B) needed, got {gain!r}")
    return {"gain": [float(g) for g in gain], "source": source}


def fit_global_gain(pairs: Sequence[Pair]) -> List[float]:
    """The three channel gains g minimising sum over all pixels of (g * input - background)^2.

    One least-squares gain per channel from the photo through glass to its clean layer, pooled
    over every pixel of every pair: the ``--gain-baseline`` row scores what correcting only the
    glass's overall tint and light loss achieves, so a model's gain over it is what it does beyond
    that (the "global gain" row of the README's results). The pairs are read as ``train fit-gain``
    reads --real (``dereflect.train.data.read_real_pairs``, which names every pair of two sizes first).
    """
    num = np.zeros(3)
    den = np.zeros(3)
    for pair in pairs:
        image, target, _ = load_pair(pair)
        flat_i, flat_t = image.reshape(-1, 3).astype(np.float64), target.reshape(-1, 3).astype(np.float64)
        num += (flat_i * flat_t).sum(0)
        den += (flat_i * flat_i).sum(0)
    if not len(pairs) or np.any(den <= 0):
        raise InputError("fitting a global gain needs at least one pair with non-black inputs")
    return [float(g) for g in num / den]


def _fmt(metric: str, value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    sign = "+" if signed else ""
    return f"{value:{sign}.2f}" if metric == "psnr" else f"{value:{sign}.4f}"


def score(output: np.ndarray, target: np.ndarray,
          mask: Optional[np.ndarray] = None) -> Dict[str, Optional[float]]:
    """PSNR, SSIM, SI (and SSIMr, SIr with a mask; None for an empty mask) of RGB images in [0, 1]."""
    scores: Dict[str, Optional[float]] = {"psnr": psnr(output, target), "ssim": ssim(output, target),
                                          "si": si(output, target)}
    if mask is not None:
        empty = not mask.any()
        scores["ssimr"] = None if empty else ssim_region(output, target, mask)
        scores["sir"] = None if empty else si_region(output, target, mask)
    return scores


# --------------------------------------------------------------------------- contact sheet


def confidence_colours(confidence: np.ndarray) -> np.ndarray:
    """A confidence map as RGB uint8: the inferno colour map over [0, the 99th percentile of the edges
    (C > 0)], brighter values saturated; black where there is no edge. What the contact sheet and
    ``dereflect remove --save-intermediates`` (NAME.confidence.png) show."""
    edges = confidence[confidence > 0]
    scaled = np.zeros(confidence.shape, np.uint8)
    if edges.size:
        # The 99th percentile, not the maximum: a few extreme ratios would leave the rest dark.
        top = float(np.percentile(edges, 99))
        scaled = (np.clip(confidence / top, 0, 1) * 255).astype(np.uint8)
    return cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO)[:, :, ::-1].copy()


_FONT = cv2.FONT_HERSHEY_SIMPLEX
_HEADER = 22
_CAPTION = 18
_GAP = 4
_BACKGROUND = 32


#: Font scales tried in turn for a label too wide for its column, before it is cut short.
_FONT_SCALES = (0.4, 0.35, 0.3)
#: Letters without an ASCII decomposition that have a usual spelling in ASCII.
_ASCII_SPELLINGS = {"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L",
                    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ı": "i", "–": "-", "—": "-",
                    "‘": "'", "’": "'", "“": '"', "”": '"', "…": "...", "→": "->", "×": "x", "µ": "u"}


def ascii_label(text: str) -> str:
    """``text`` in the ASCII that OpenCV's Hershey fonts draw: accents dropped (NFKD: "é" -> "e"), a few
    letters spelt out ("ß" -> "ss"), "?" only for what has no ASCII form (a CJK name, say).

    cv2.putText draws every byte beyond ASCII as "?", so "café" would read "caf??" and a name in another
    script a row of "?"; this keeps as much of the name readable as there is.
    """
    out = []
    for char in unicodedata.normalize("NFKD", text):
        if char.isascii():
            out.append(char)
        elif unicodedata.combining(char):
            continue  # the accent of the letter before it
        else:
            out.append(_ASCII_SPELLINGS.get(char, "?"))
    return "".join(out)


def _fitted(text: str, width: int) -> Tuple[str, float]:
    """``text`` (ASCII) and the font scale that draw it at most ``width`` px wide: the largest of
    :data:`_FONT_SCALES` that fits, else the smallest with the text cut short, "~" marking the cut."""
    for scale in _FONT_SCALES:
        if cv2.getTextSize(text, _FONT, scale, 1)[0][0] <= width:
            return text, scale
    scale = _FONT_SCALES[-1]
    while text and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        text = text[:-2] + "~" if len(text) > 2 else ""
    return text, scale


def _text(canvas: np.ndarray, text: str, x: int, y: int, width: int, centre: bool = False) -> None:
    """Draw ``text`` at baseline (x, y), within ``width`` px (smaller or cut short to fit: labels of
    neighbouring columns must not run into each other); ``centre``: centred in that width."""
    text, scale = _fitted(ascii_label(text), max(0, width))
    if not text:
        return
    if centre:
        x += (width - cv2.getTextSize(text, _FONT, scale, 1)[0][0]) // 2
    cv2.putText(canvas, text, (x, y), _FONT, scale, (235, 235, 235), 1, cv2.LINE_AA)


def _tile(image: Optional[np.ndarray], tile: int) -> np.ndarray:
    """``image`` (float RGB in [0, 1] or uint8 RGB; None: "n/a") letterboxed into a tile x tile box."""
    box = np.full((tile, tile, 3), _BACKGROUND, np.uint8)
    if image is None:
        _text(box, "n/a", 2, tile // 2 + 4, tile - 4, centre=True)
        return box
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    height, width = image.shape[:2]
    scale = min(tile / height, tile / width)
    size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    top, left = (tile - size[1]) // 2, (tile - size[0]) // 2
    box[top:top + size[1], left:left + size[0]] = small
    return box


def contact_row(image: np.ndarray, result: Any, target: Optional[np.ndarray],
                tile: int = CONTACT_TILE) -> List[np.ndarray]:
    """The five tiles of one image: input | stage 1 | confidence | result | ground truth (without
    one: 4x the absolute change, what the model took away)."""
    confidence = getattr(result, "confidence", None)
    stage1 = getattr(result, "stage1", None)
    background = as_float_rgb(result.background)
    last = target if target is not None else np.clip(4.0 * np.abs(image - background), 0.0, 1.0)
    return [_tile(image, tile), _tile(stage1, tile),
            _tile(confidence_colours(confidence) if confidence is not None else None, tile),
            _tile(background, tile), _tile(last, tile)]


def contact_sheet(rows: Sequence[Tuple[str, List[np.ndarray]]], tile: int = CONTACT_TILE,
                  columns: Sequence[str] = CONTACT_COLUMNS) -> np.ndarray:
    """Labelled grid (RGB uint8): a header with ``columns``, then a caption and tiles per row (as many
    tiles as columns).

    Size: height ``22 + n * (18 + tile + 4)``, width ``4 + len(columns) * (tile + 4)``. Labels are drawn
    in ASCII (:func:`ascii_label`), each within its column (a smaller font, or cut short).
    """
    width = _GAP + len(columns) * (tile + _GAP)
    height = _HEADER + len(rows) * (_CAPTION + tile + _GAP)
    sheet = np.full((height, width, 3), 16, np.uint8)
    for col, label in enumerate(columns):
        _text(sheet, label, _GAP + col * (tile + _GAP) + 2, _HEADER - 7, tile - 2)
    for index, (caption, tiles) in enumerate(rows):
        top = _HEADER + index * (_CAPTION + tile + _GAP)
        _text(sheet, caption, _GAP + 2, top + _CAPTION - 5, width - 2 * _GAP)
        for col, image in enumerate(tiles):
            left = _GAP + col * (tile + _GAP)
            sheet[top + _CAPTION:top + _CAPTION + tile, left:left + tile] = image
    return sheet


def _contact_indices(count: int, wanted: int) -> List[int]:
    """Up to ``wanted`` indices spread evenly over ``count`` images, first and last included."""
    if wanted <= 0:
        return []
    if wanted >= count:
        return list(range(count))
    if wanted == 1:
        return [0]
    return sorted({int(round(i * (count - 1) / (wanted - 1))) for i in range(wanted)})


# --------------------------------------------------------------------------- evaluation


def check_out_dir(out_dir: PathLike, overwrite: bool = False) -> None:
    """Check, before any work, that the report can be written into ``out_dir``.

    InputError for any of :func:`dereflect.imageio.check_output_location`'s reasons (e.g. ``out_dir`` is a
    file), and, without ``overwrite``, when it holds report files already (an earlier run's), naming them.
    """
    out = Path(out_dir)
    check_output_location(out, folder=True)
    existing = [out / name for name in REPORT_FILES.values() if os.path.lexists(out / name)]
    if existing and not overwrite:
        if len(existing) == 1:
            raise InputError(f"{existing[0]}: file exists; pass --overwrite to replace it")
        raise InputError(f"{out}: {', '.join(path.name for path in existing)} exist already (an earlier report); "
                         "pass --overwrite to replace them")


def check_options(limit: Optional[int] = None, contact_images: int = DEFAULT_CONTACT_IMAGES,
                  out_dir: Optional[PathLike] = None, overwrite: bool = False) -> None:
    """The checks of :func:`evaluate`'s options that need no data or model: InputError before any work."""
    if limit is not None and int(limit) < 1:
        raise InputError(f"limit must be a positive number of images, not {limit}")
    if int(contact_images) < 0:
        raise InputError(f"--contact-images must be 0 (no contact sheet) or a positive number of rows, "
                         f"not {contact_images}")
    if out_dir is not None:
        check_out_dir(out_dir, overwrite)


def evaluate(
    model: Any,
    data_dir: PathLike,
    layout: str = "auto",
    resize: str = "native",
    masks: Optional[PathLike] = None,
    limit: Optional[int] = None,
    out_dir: Optional[PathLike] = None,
    *,
    names: Optional[PathLike] = None,
    gain_baseline: Any = None,
    colour_fitted: bool = False,
    contact_images: int = DEFAULT_CONTACT_IMAGES,
    progress: bool = True,
    stop: Optional[StopSignals] = None,
    overwrite: bool = False,
    predictions: bool = False,
    **options: Any,
) -> Report:
    """Score ``model`` on ``data_dir`` beside the do-nothing baseline; see the module doc.

    ``model``: a bundled model's name, an export directory, a training checkpoint (.safetensors)
    or an object with ``remove_with_intermediates``. ``names``: a file listing the pairs to score
    (a validation split). ``limit``: score only the first N images (sorted by name).
    ``out_dir``: also write report.md, report.json and contact_sheet.png there; an earlier report there
    is replaced only with ``overwrite`` (else InputError before any work).
    ``contact_images``: rows of the contact sheet (spread over the set; 0: none).
    ``masks``: region masks for SSIMr / SIr, a folder or ``"auto"`` (each pair's reflection_mask).
    ``gain_baseline``: also score the input times three channel gains ("R,G,B" or a JSON file from
    ``dereflect train fit-gain``), the baseline a model must beat on real photos.
    ``colour_fitted``: also score the output and the input each after its best channel gains against
    the ground truth (three numbers per image taken from the truth: not a method, a measure of how
    much of a score is global colour and brightness, which a real pair's two shots also differ in).
    ``stop``: a :class:`dereflect.stop_signals.StopSignals` in force; once it has received a signal
    the run ends between two images and the report holds those scored (``protocol["stopped"]``).
    ``options``: how the model is run (``backend``, ``device``, ``precision``, ``max_side``, ...:
    :func:`dereflect.models.open_model`'s).
    """
    short = parse_resize(resize)
    check_options(limit, contact_images, out_dir, overwrite)
    auto_mask = masks == AUTO_MASKS
    used_layout, pairs = find_pairs(data_dir, layout, None if auto_mask else masks)
    if names is not None:
        pairs = filter_pairs(pairs, read_name_list(names), keep=True, where=str(data_dir))
    if limit is not None:
        pairs = pairs[: int(limit)]
    # Every pair of two sizes in one error before the model is loaded, not the first one mid-run.
    check_pair_sizes(pairs, data_dir)
    gains = read_gain_baseline(gain_baseline) if gain_baseline is not None else None
    if predictions and options:
        raise InputError(f"--predictions scores outputs made elsewhere: model options ({', '.join(sorted(options))}) "
                         "do not apply")
    runner = PredictionFolder(model) if predictions else load_model(model, **options)
    try:
        report = _run(runner, describe_model(runner, model), pairs, short, masks is not None, auto_mask,
                      contact_images, progress, gains, stop, colour_fitted)
    finally:
        if runner is not model and hasattr(runner, "close"):
            runner.close()
    if report.skipped and not report.images and "stopped" not in report.protocol:
        raise InputError(f"{data_dir}: none of the {len(report.skipped)} image(s) could be read (see the warnings "
                         "above); nothing to look at")
    report.machine = machine_info()
    report.data = {"dir": str(Path(data_dir).resolve()), "layout": used_layout, "images": len(report.images),
                   "masks": str(masks) if masks is not None else None, "limit": limit,
                   "names": str(names) if names is not None else None}
    if out_dir is not None:
        report.write(out_dir)
    return report


def _run(runner: Any, model_info: Dict[str, Any], pairs: List[Pair], short: Optional[int], regions: bool,
         auto_mask: bool, contact_images: int, progress: bool,
         gains: Optional[Dict[str, Any]] = None, stop: Optional[StopSignals] = None,
         colour_fitted: bool = False) -> Report:
    """Score ``pairs``; ``regions``: SSIMr / SIr too, inside each pair's mask (``auto_mask``: its
    reflection_mask, else the mask file attached to the pair); ``colour_fitted``: the model's output
    and the input also after their best channel gains against the ground truth."""
    from tqdm import tqdm

    metrics = BASE_METRICS + (REGION_METRICS if regions else ())
    chosen = set(_contact_indices(len(pairs), contact_images))
    rows: List[Tuple[str, List[np.ndarray]]] = []
    # Which of the optional columns (stage 1, confidence) some row of the sheet has: the others are left out.
    drawn = {column: False for column in OPTIONAL_COLUMNS}
    images: List[ImageScores] = []
    skipped: List[str] = []
    reduced = 0
    stopped_by = None
    bar = tqdm(pairs, unit="image", disable=None if progress else True, file=sys.stderr, desc="dereflect eval")
    for index, pair in enumerate(bar):
        if stop is not None and stop.received:
            stopped_by = stop.received
            break
        try:
            image, target, mask = load_pair(pair, short, auto_mask)
        except InputError as exc:
            if pair.target is not None:
                raise  # a pair left out would make the means incomparable with other runs on the set
            # Photos are only looked at: one bad file is that file's news, as in `remove`, not the run's end.
            skipped.append(one_line_error(exc, pair.input))
            bar.write(f"dereflect: warning: skipping {skipped[-1]}", file=sys.stderr)
            continue
        start = time.perf_counter()
        result = (runner.result(pair, image, short) if isinstance(runner, PredictionFolder)
                  else runner.remove_with_intermediates(image, colour_order="RGB"))
        seconds = time.perf_counter() - start
        background = as_float_rgb(result.background)
        if background.shape != image.shape:
            raise ModelError(f"{pair.name}: the model returned {background.shape} for a {image.shape} input")
        change = float(np.abs(background - image).mean())
        if target is None:
            nothing = {metric: None for metric in metrics}
            scores = ImageScores(pair.name, image.shape[0], image.shape[1], model=dict(nothing), baseline=nothing,
                                 seconds=seconds, scale=float(getattr(result, "scale", 1.0)), change=change)
        else:
            scores = ImageScores(pair.name, image.shape[0], image.shape[1], model=score(background, target, mask),
                                 baseline=score(image, target, mask), seconds=seconds,
                                 scale=float(getattr(result, "scale", 1.0)), change=change)
        if gains is not None and target is not None:
            gained = np.clip(image * np.asarray(gains["gain"], np.float32), 0.0, 1.0)
            scores.gain = score(gained, target, mask)
        if colour_fitted and target is not None:
            scores.model_fitted, scores.baseline_fitted = (
                score(np.clip(x * best_channel_gains(x, target), 0.0, 1.0), target, mask) for x in (background, image))
        images.append(scores)
        reduced += int(scores.scale < 1.0 or getattr(result, "tiles", 1) > 1)
        if index in chosen:
            caption = (f"{pair.name}   PSNR {_fmt('psnr', scores.baseline['psnr'])} -> "
                       f"{_fmt('psnr', scores.model['psnr'])} dB" if target is not None else
                       f"{pair.name}   mean change {255 * change:.1f} / 255")
            rows.append((caption, contact_row(image, result, target)))
            drawn["stage 1"] |= getattr(result, "stage1", None) is not None
            drawn["confidence"] |= getattr(result, "confidence", None) is not None
    max_side = model_info.get("max_side")
    if max_side:
        how = ("in overlapping tiles" if model_info.get("large_image") == "tile"
               else "scaled down, the result guided-upsampled")
        network_resolution = (f"networks run at the scored resolution up to {max_side} px on the long side, "
                              f"larger images {how} ({reduced} of {len(images)} image(s) here)")
    else:
        network_resolution = "networks run at the scored resolution (no size limit)"
    report = Report(
        model=model_info,
        data={},
        protocol={
            "resize": "native" if short is None else f"short:{short}",
            "resize_description": describe_resize(short),
            "network_resolution": network_resolution,
            "images_not_run_whole": reduced,
            **({"stopped": f"by {stopped_by} after {len(images)} of {len(pairs)} images; the means are of "
                           "those"} if stopped_by else {}),
            "metrics": "on the background, RGB float in [0, 1] (data range 1); PSNR over all pixels and "
                       f"channels; SSIM as skimage structural_similarity with an {WINDOW}x{WINDOW} Gaussian "
                       f"window (sigma {SIGMA:g}), population covariances, channel mean, {RADIUS}-px border "
                       "cropped; SI its "
                       "structure term; SSIMr/SIr the SSIM/SI map averaged over mask pixels; means are "
                       "means of per-image values",
        },
        metrics=metrics,
        images=images,
        gain_baseline=gains,
        colour_fitted=colour_fitted,
        ground_truth=all(p.target is not None for p in pairs),
        skipped=skipped,
    )
    if rows:
        # A CRRN model has no stage 1 or confidence map: two columns of "n/a" would say nothing.
        keep = [drawn.get(column, True) for column in report.contact_columns]
        columns = tuple(column for column, kept in zip(report.contact_columns, keep) if kept)
        rows = [(caption, [t for t, kept in zip(tiles, keep) if kept]) for caption, tiles in rows]
        report.contact_sheet = contact_sheet(rows, columns=columns)
        report.sheet_columns = columns
    return report


# --------------------------------------------------------------------------- command line


def register(subparsers: Any) -> None:
    """Add ``dereflect eval`` to the command line."""
    parser = subparsers.add_parser(
        "eval",
        help="score a model against ground truth (PSNR, SSIM, SI; SSIMr/SIr with masks)",
        description="Score a model on a dataset with ground-truth backgrounds, beside the do-nothing "
                    "baseline (the input scored as the output). Layouts: paired / Real20 / Nature "
                    "(blended/ + transmission_layer/, or input/ + target/), CEILNet triplets (NAME-input.* + "
                    "NAME-label1.*), SIR2 (sub-folders of blended/ + transmission_layer/, or m/g files). "
                    "Prints the mean table; --out writes report.md, report.json and contact_sheet.png.",
    )
    add_model_options(parser, positional=True)
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="dataset folder (required unless --flicker is given alone)")
    parser.add_argument("--flicker", action="store_true",
                        help="also measure flicker on a generated sequence (a static scene under a moving "
                             "reflection), per frame and with temporal smoothing (dereflect.temporal)")
    parser.add_argument("--predictions", action="store_true",
                        help="MODEL is a folder of outputs made elsewhere (another method's results): the output "
                             "of pair NAME is MODEL/NAME.* (SIR2: MODEL/<subset>/NAME.*), at its input's size; "
                             "scored as a model's, with no model options (default: MODEL is a model)")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout (default: auto)")
    parser.add_argument("--resize", default="native", metavar="native|short:N",
                        help="resize protocol: native resolution, or short side N px, e.g. short:420 "
                             "(default: native)")
    parser.add_argument("--masks", metavar=f"DIR|{AUTO_MASKS}",
                        help=f"region masks DIR/<name>.* for SSIMr and SIr, or '{AUTO_MASKS}': each pair's "
                             "reflection region, where the input is brighter than the ground truth by more than "
                             f"{_auto_mask_level()} (blurred for misalignment) (default: none, no SSIMr/SIr)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N images (default: all)")
    parser.add_argument("--out", metavar="DIR",
                        help="write report.md, report.json, contact_sheet.png here (default: print the report only)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report files of an earlier run in --out (default: off, refused before "
                             "any work)")
    parser.add_argument("--gain-baseline", metavar="R,G,B|FILE", default=None,
                        help="also score the global-gain baseline: the input times three channel gains, given as "
                             "R,G,B or a JSON file from 'dereflect train fit-gain' (default: not scored)")
    parser.add_argument("--colour-fitted", action="store_true",
                        help="also score the output and the input each after its best channel gains against the "
                             "ground truth: how much of the score is global colour and brightness (default: off)")
    parser.add_argument("--names", metavar="FILE",
                        help="score only the pairs named in FILE, one per line (e.g. train/splits/zhang89_val.txt) "
                             "(default: all pairs)")
    parser.add_argument("--contact-images", type=int, default=DEFAULT_CONTACT_IMAGES, metavar="N",
                        help=f"rows of the contact sheet (default: {DEFAULT_CONTACT_IMAGES}; 0: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_eval)


def _set_model_options(args: Any) -> Dict[str, Any]:
    """The model options the command line set away from their defaults (refused with --predictions)."""
    # The defaults add_model_options gives them: a value left at its default was not asked for.
    backend = BackendOptions()
    defaults = {"backend": None, "device": backend.device, "precision": backend.precision,
                "large_image": LARGE_IMAGE_STRATEGIES[0]}
    return {key: value for key, value in model_options(args).items() if value != defaults.get(key)}


def run_eval(args: Any) -> int:
    # Before the flicker measurement too: a bad option is one line before any work, not after it.
    check_options(args.limit, args.contact_images, args.out, args.overwrite)
    if args.flicker and args.predictions:
        raise InputError("--flicker runs a model on a generated sequence; --predictions has no model to run")
    if args.flicker:
        from dereflect.tools.flicker import measure_flicker

        remover = load_model(args.model, **model_options(args))
        try:
            measured = measure_flicker(remover)
        finally:
            remover.close()
        print(f"flicker of {args.model or 'the default model'}{at_strength(remover.strength)} (mean output "
              f"change, 8-bit levels, where the input did not change): per frame {measured['per_frame']:.3f}, "
              f"with temporal smoothing {measured['temporal']:.3f} (smoothed output off the per-frame one by "
              f"{measured['deviation']:.3f} on average)")
        if args.data is None:
            return EXIT_OK
    if args.data is None:
        raise InputError("--data DIR is required (or give --flicker to measure flicker only)")
    with StopSignals() as signals:  # Ctrl+C or SIGTERM: the images scored so far are reported
        report = evaluate(args.model, args.data, layout=args.layout, resize=args.resize, masks=args.masks,
                          limit=args.limit, out_dir=args.out, names=args.names, gain_baseline=args.gain_baseline,
                          colour_fitted=args.colour_fitted, contact_images=args.contact_images,
                          progress=not args.no_progress, stop=signals, overwrite=args.overwrite,
                          predictions=args.predictions,
                          **(_set_model_options(args) if args.predictions else model_options(args)))
    print(f"{report.model_label} on {report.data['dir']} ({report.data['layout']}, {report.data['images']} "
          f"images, resize {report.protocol['resize']})")
    print(report.mean_table())
    if report.contact_sheet is not None and args.out:
        print(f"contact sheet: {Path(args.out) / REPORT_FILES['contact_sheet']}")
    elif report.contact_sheet is not None and not report.ground_truth:
        # Without ground truth the sheet is what there is to look at.
        print("contact sheet: not written (--out DIR writes it)")
    if args.out:
        print(f"report written to {Path(args.out) / REPORT_FILES['markdown']}")
    if "stopped" in report.protocol:
        print(f"dereflect: stopped {report.protocol['stopped']}", file=sys.stderr)
        return exit_status(signals.received)
    if report.skipped:
        # As remove does: the rest was done, and the status says that not everything was.
        print(f"dereflect: {len(report.skipped)} of {len(report.skipped) + len(report.images)} image(s) could not "
              f"be read and were skipped; {len(report.images)} looked at", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK

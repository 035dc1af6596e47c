"""Training and evaluation data: photo discovery and decoding, datasets, batch samplers and loaders.

Every sample is a dict of CHW float32 tensors in [0, 1]: ``input`` (the mixture I), ``background``
(the clean target B) and ``reflection`` (R = I - B_t); :mod:`dereflect.train.synthesis` says what
each holds and how synthesised pairs are made. Every random choice of a sample comes from
:func:`~dereflect.train.synthesis.sample_rng`, so samples do not depend on the worker count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import cv2
import numpy as np
import torch
from dereflect.errors import InputError
from dereflect.imageio import IMAGE_EXTENSIONS, is_visible_image, some_names
from dereflect.tools.datasets import LAYOUT_WORDS, ground_truth_set, half_paired, read_pair
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from .synthesis import Recipe, RecipeMix, Size, SynthesisConfig, random_crop, sample_rng, synthesize

PathLike = Union[str, "os.PathLike[str]"]
SampleKey = Tuple[int, int, int]

# Distinct last words keep the per-epoch (sampler) and mix seed streams apart from the samples' own.
_SAMPLER_TAG = 0xB47C2
_MIX_TAG = 0x3E1F7


class ImageSkippedWarning(UserWarning):
    """An image in a training folder was unreadable or too small and is skipped."""


# Paths already warned about in this process: each bad image is reported once.
_WARNED: Set[str] = set()


@contextlib.contextmanager
def one_line_skip_warnings() -> Iterator[None]:
    """Inside, an :class:`ImageSkippedWarning` prints as one line ("warning: ..."); every other warning as
    before. The training commands run inside it; a program that imports this module keeps its own format.

    A skipped image is the user's news: Python's format adds the file, line number and source line of
    the library code that noticed it, which say nothing to them.
    """
    previous = warnings.formatwarning

    def one_line(message: Union[Warning, str], category: type, filename: str, lineno: int,
                 line: Optional[str] = None) -> str:
        if issubclass(category, ImageSkippedWarning):
            return f"warning: {message}\n"
        return previous(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


# --------------------------------------------------------------------------- discovery


def _as_folders(folders: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    if isinstance(folders, (str, os.PathLike)):
        return [Path(folders)]
    return [Path(f) for f in folders]


def _folder_names(folders: Sequence[Path]) -> str:
    # Names without their place: the same data elsewhere (another machine) reads the same.
    return ", ".join(f"{Path(folder).resolve().name}/" for folder in folders)


def find_images(
    folders: Union[PathLike, Sequence[PathLike]],
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
) -> List[Path]:
    """List the images under ``folders`` (recursively), sorted.

    A folder holding ``JPEGImages/`` (a VOC2012 tree) contributes only that subfolder.
    ``exclude`` drops file names starting with any of its prefixes (e.g. ``("test_",)`` keeps
    BSDS500's test split out); a non-empty ``include`` keeps only names starting with one of
    its prefixes. Hidden files are ignored. Raises InputError if nothing is found, or for a folder that
    holds one folder of a paired data set and not the other (``blended/`` without ``transmission_layer/``),
    or a data set with ground truth (see :func:`refuse_ground_truth_sets`).
    """
    roots = _as_folders(folders)
    for root in roots:
        problem = half_paired(root)
        if problem:  # a paired data set missing a folder: its photos are not what was meant
            raise InputError(f"{problem}; for pairs synthesised from photos, give a folder of photos")
    refuse_ground_truth_sets(roots)
    if isinstance(exclude, str):
        exclude = (exclude,)
    if isinstance(include, str):
        include = (include,)
    found: List[Path] = []
    for root in roots:
        if not root.is_dir():
            raise InputError(f"image folder '{root}' does not exist or is not a folder")
        voc = root / "JPEGImages"
        base = voc if voc.is_dir() else root
        for path in base.rglob("*"):
            name = path.name
            if not is_visible_image(path):
                continue
            if any(name.startswith(p) for p in exclude):
                continue
            if include and not any(name.startswith(p) for p in include):
                continue
            found.append(path)
    if not found:
        names = ", ".join(f"'{r}'" for r in roots)
        filters = ""
        if exclude or include:
            filters = f" after filtering (exclude={tuple(exclude)}, include={tuple(include)})"
        raise InputError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {names}{filters}; "
            "point the data option at folders of photos"
        )
    return sorted(set(found))


def refuse_ground_truth_sets(folders: Sequence[Path]) -> None:
    """InputError naming the first of ``folders`` that is a data set with ground truth (paired folders,
    CEILNet triplets, SIR2), which synthesis must not take for a folder of clean photos.

    Its photos through glass would be read as clean backgrounds (and the clean layers beside them
    as more photos): a run that trains without a word on reflections as if they were the scene.
    Such a folder is real pairs (``--real``) or a validation set (``--val``).
    """
    for root in folders:
        found = ground_truth_set(root)
        if found is None:
            continue
        layout, pairs = found
        # Pairs below it (SIR2's layout): say in which sub-folders, a photo folder may hold one such set.
        below = sorted({f"{pair.input.relative_to(root).parts[0]}/" for pair in pairs
                        if len(pair.input.relative_to(root).parts) > 1}) if layout == "sir2" else []
        inside = f" (in {some_names(below, 3)})" if below else ""
        raise InputError(f"{root} holds {len(pairs)} pairs with ground truth{inside}, {LAYOUT_WORDS[layout]}, "
                         "not clean photos: synthesis would take its photos through glass for clean backgrounds. "
                         "Pass it with --real DIR (real training pairs) or --val DIR (validation); --data takes "
                         "folders of photos without reflections")


# --------------------------------------------------------------------------- loading


def read_rgb(path: PathLike) -> np.ndarray:
    """An image file as HxWx3 float32 RGB in [0, 1], by the runtime's reader (16-bit kept, alpha and
    grey handled, EXIF orientation applied); InputError naming the file when it cannot be read."""
    from dereflect.imageio import read_image

    return read_image(path)[0]


def load_usable(path: PathLike, min_size: Optional[Size] = None) -> Optional[np.ndarray]:
    """Read a training image, or return None (warning once per path) if it cannot be used.

    ``min_size`` is ``(short, long)``: the image's short side must be at least ``short`` and
    its long side at least ``long`` (whichever orientation), so crops need no large upscaling.
    """
    try:
        img = read_rgb(path)
    except InputError as exc:
        _warn_once(path, f"skipping {exc}")
        return None
    if min_size is not None:
        h, w = img.shape[:2]
        if min(h, w) < min_size[0] or max(h, w) < min_size[1]:
            _warn_once(
                path,
                f"skipping image '{path}': {h}x{w} is smaller than the training crop "
                f"(needs a short side >= {min_size[0]} and a long side >= {min_size[1]})",
            )
            return None
    return img


def _warn_once(path: PathLike, message: str) -> None:
    key = str(path)
    if key in _WARNED:
        return
    _WARNED.add(key)
    # Progress bars on the terminal are lifted off their line for it and drawn again below.
    with tqdm.external_write_mode(file=sys.stderr):
        warnings.warn(message, ImageSkippedWarning, stacklevel=3)


class DecodedImages:
    """Decoded images kept in memory, so a training run decodes each file once instead of once per sample.

    An image is stored as uint8 when the reader's own conversion of those values gives back exactly the
    float32 image it returned (8-bit files), else as float32; :meth:`get` returns the reader's array bit for
    bit either way. All bytes sit in one torch tensor, which a spawned loader process receives as shared
    memory (torch.multiprocessing's pickling) rather than as a copy.
    """

    def __init__(self, items: Iterable[Tuple[int, np.ndarray]], budget_bytes: int):
        """Keep ``(key, image)`` items (HxWx3 float32 in [0, 1]) in order until ``budget_bytes`` is full.

        ``items`` is read lazily and only up to the first image that does not fit, so a generator that
        decodes files decodes one more than it keeps at most.
        """
        parts: List[Tuple[int, np.ndarray, Tuple[int, ...], bool]] = []
        total = 0
        for key, image in items:
            packed, is_uint8 = _pack(image)
            start = total + (-total % 4)  # float32 entries are read in place: keep them aligned
            if start + packed.nbytes > budget_bytes:
                break
            parts.append((int(key), packed, image.shape, is_uint8))
            total = start + packed.nbytes
        self._buffer = torch.empty(total, dtype=torch.uint8)
        flat = self._buffer.numpy()
        self._entries: Dict[int, Tuple[int, Tuple[int, ...], bool]] = {}
        offset = 0
        for key, packed, shape, is_uint8 in parts:
            offset += -offset % 4
            flat[offset:offset + packed.nbytes] = packed.reshape(-1).view(np.uint8)
            self._entries[key] = (offset, shape, is_uint8)
            offset += packed.nbytes

    @property
    def nbytes(self) -> int:
        return int(self._buffer.numel())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: int) -> Optional[np.ndarray]:
        """The image stored under ``key`` (a new float32 array), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        offset, shape, is_uint8 = entry
        count = int(np.prod(shape))
        flat = self._buffer.numpy()
        if is_uint8:
            return _from_uint8(flat[offset:offset + count].reshape(shape))
        return flat[offset:offset + 4 * count].view(np.float32).reshape(shape).copy()


def _from_uint8(values: np.ndarray) -> np.ndarray:
    # The image reader's conversion (dereflect.imageio), so that uint8 storage is exact for 8-bit files.
    return np.multiply(values, np.float32(1.0 / 255.0), dtype=np.float32)


def _pack(image: np.ndarray) -> Tuple[np.ndarray, bool]:
    """(uint8 values, True) when they give ``image`` back exactly, else (float32 copy, False)."""
    values = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if np.array_equal(_from_uint8(values), image):
        return values, True
    return np.ascontiguousarray(image, dtype=np.float32), False


class _ImagePool:
    """Paths plus a per-process record of the ones found unusable, and optionally the decoded images."""

    def __init__(self, paths: List[Path], min_size: Size, what: str, folders: Sequence[Path]):
        self.paths = paths
        self.min_size = min_size
        self.what = what
        self.folders = folders
        self.bad: Set[int] = set()
        self.decoded: Optional[DecodedImages] = None

    def __len__(self) -> int:
        return len(self.paths)

    def keep_decoded(self, budget_bytes: int, progress: bool = True) -> int:
        """Decode the usable images in order and keep them, up to ``budget_bytes``; returns the bytes kept.

        Unusable images met on the way are warned about and recorded as :meth:`find` would. ``progress``:
        a progress bar while decoding, on a terminal only (see :func:`decoding_bar`).
        """
        with decoding_bar(len(self.paths), f"decoding {self.what}s", progress) as bar:
            def usable() -> Iterator[Tuple[int, np.ndarray]]:
                for j, path in enumerate(self.paths):
                    img = None if j in self.bad else load_usable(path, self.min_size)
                    bar.update(1)
                    if img is None:
                        self.bad.add(j)
                    else:
                        yield j, img

            self.decoded = DecodedImages(usable(), budget_bytes)
        return self.decoded.nbytes

    def find(self, start: int, avoid: Optional[int] = None) -> Tuple[int, np.ndarray]:
        """Load the first usable image at or after ``start`` (cyclically), skipping ``avoid``.

        The probe order depends only on which files are unusable, a property of the files,
        so the choice is the same in every worker.
        """
        n = len(self.paths)
        for step in range(n):
            j = (start + step) % n
            if j == avoid or j in self.bad:
                continue
            img = self.decoded.get(j) if self.decoded is not None else None
            if img is None:
                img = load_usable(self.paths[j], self.min_size)
            if img is not None:
                return j, img
            self.bad.add(j)
        names = ", ".join(f"'{f}'" for f in self.folders)
        need = "two usable images" if avoid is not None else "a usable image"
        raise InputError(
            f"no {self.what} images can be used in {names}: synthesis needs {need} at least "
            f"{self.min_size[0]} px on the short side and {self.min_size[1]} px on the long side "
            "that OpenCV can decode (see the ImageSkippedWarning messages)"
        )


def decoding_bar(total: int, description: str, progress: bool = True, unit: str = "image") -> tqdm:
    """The progress bar of decoding ``total`` files to keep in memory (a VOC-sized set takes minutes).

    Shown only when ``progress`` is true and standard error is a terminal (not in a log file); it is
    removed when done, the caller printing one summary line instead.
    """
    return tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if progress else True)


def _files(paths: Sequence[Path]) -> List[Tuple[str, int]]:
    """(name, size in bytes) of each file: what tells a data set's files apart without reading them all."""
    out = []
    for path in paths:
        try:
            out.append((path.name, path.stat().st_size))
        except OSError:  # gone since it was listed: it still counts as a different set
            out.append((path.name, -1))
    return out


def validation_set_record(dataset: Dataset) -> Optional[Dict[str, str]]:
    """What identifies a validation set: ``{"description": ..., "digest": ...}``, or None for a dataset
    that cannot say (one without ``describe_samples``).

    The trainer records it beside the best validation loss, and a resumed run carries that best over only
    when the digest is the same: a loss measured on other pairs is no bar to clear. The digest covers every
    file's name and size and every setting that changes the samples (recipe, seed, count, scale), but not
    where the folder lies, so a data set copied to another machine stays the same one.
    """
    indices = None
    if isinstance(dataset, Subset):  # the first --val-count pairs of a folder
        dataset, indices = dataset.dataset, [int(i) for i in dataset.indices]
    describe = getattr(dataset, "describe_samples", None)
    if describe is None:
        return None
    description, content = describe(indices)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"description": description, "digest": digest}


def training_data_record(dataset: Dataset) -> Dict[str, str]:
    """What a training set draws its samples from, in words: ``photos``, ``reflection layers`` and ``real
    pairs`` (with their share of the samples); empty for a dataset that cannot say.

    Recorded in checkpoints, so that a run resumed on other data can say what changed.
    """
    describe = getattr(dataset, "describe_sources", None)
    if describe is None:
        return {}
    return {"photos": "none", "reflection layers": "none", "real pairs": "none", **describe()}


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))


# --------------------------------------------------------------------------- datasets


class SyntheticPairs(Dataset):
    """Reflection pairs synthesised on the fly from folders of photos.

    Sample ``index`` of epoch ``e`` uses background image ``(index + e * length) % n`` (so
    short epochs still cycle through the collection) and a reflection image drawn from the
    sample's generator: from ``reflection_folders`` when given (real reflection layers, e.g.
    CRRN's RID or ``dereflect train reflection-layers``: no ghost, no blur, weighted per the
    recipe), otherwise from the same photos, never the background's own. Unreadable or too-small
    images are skipped with one :class:`ImageSkippedWarning` each (per process) and the next usable
    image is taken.

    ``dataset[i]`` uses the dataset's epoch (:meth:`set_epoch`) and the first size;
    ``dataset[(i, epoch, size_id)]`` (what :class:`MultiSizeBatchSampler` yields) names both,
    which keeps samples right with persistent workers that never see ``set_epoch``.
    ``exclude``/``include`` (file-name prefixes, see :func:`find_images`) apply to both the
    photos and the reflection folders.
    """

    keyed = True

    def __init__(
        self,
        folders: Union[PathLike, Sequence[PathLike]],
        config: Optional[Recipe] = None,
        seed: int = 0,
        length: Optional[int] = None,
        reflection_folders: Optional[Union[PathLike, Sequence[PathLike]]] = None,
        exclude: Sequence[str] = (),
        include: Sequence[str] = (),
    ):
        self.config = config if config is not None else SynthesisConfig()
        if int(seed) < 0:
            raise InputError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.epoch = 0
        min_size = self.config.min_source_size
        photo_dirs = _as_folders(folders)
        self._photos = _ImagePool(find_images(photo_dirs, exclude, include), min_size, "photo", photo_dirs)
        self._reflections: Optional[_ImagePool] = None
        if reflection_folders is not None:
            refl_dirs = _as_folders(reflection_folders)
            self._reflections = _ImagePool(
                find_images(refl_dirs, exclude, include), min_size, "reflection", refl_dirs
            )
        elif len(self._photos) < 2:
            raise InputError(
                f"only one image in {', '.join(str(f) for f in photo_dirs)}: synthesis draws the "
                "reflection from a different photo than the background, so it needs at least two"
            )
        self.length = len(self._photos) if length is None else int(length)
        if self.length < 1:
            raise InputError(f"length must be >= 1, got {length}")

    @property
    def sizes(self) -> List[Size]:
        return self.config.sizes

    @property
    def images(self) -> List[Path]:
        """The background photos, sorted."""
        return list(self._photos.paths)

    @property
    def reflection_images(self) -> List[Path]:
        """The reflection sources: the real reflection layers, or the photos."""
        return list((self._reflections or self._photos).paths)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by plain integer indices."""
        self.epoch = int(epoch)

    def describe_sources(self) -> Dict[str, str]:
        """The photos and reflection layers drawn from (see :func:`training_data_record`)."""
        out = {"photos": f"{len(self._photos)} photos in {_folder_names(self._photos.folders)}"}
        if self._reflections is not None:
            out["reflection layers"] = (f"{len(self._reflections)} images in "
                                        f"{_folder_names(self._reflections.folders)}")
        return out

    def describe_samples(self, indices: Optional[Sequence[int]] = None) -> Tuple[str, Dict[str, Any]]:
        """(description, everything the samples depend on) of samples ``indices`` (None: all) of epoch 0,
        the epoch validation uses (see :func:`validation_set_record`)."""
        count = self.length if indices is None else len(indices)
        content = {"recipe": self.config.to_dict(), "seed": self.seed,
                   "samples": self.length if indices is None else list(indices),
                   "photos": _files(self._photos.paths),
                   "reflections": _files(self._reflections.paths) if self._reflections is not None else None}
        return f"{count} pairs synthesised from {_folder_names(self._photos.folders)}", content

    def keep_decoded(self, budget_bytes: int, progress: bool = True) -> int:
        """Decode the photos (then the reflection layers) once and keep them in memory, up to ``budget_bytes``.

        Samples stay bit-identical; each kept file is no longer decoded per sample. Returns the bytes kept.
        ``progress``: a progress bar while decoding, on a terminal only.
        """
        used = self._photos.keep_decoded(budget_bytes, progress)
        if self._reflections is not None:
            used += self._reflections.keep_decoded(budget_bytes - used, progress)
        return used

    def __len__(self) -> int:
        return self.length

    def _key(self, key: Union[int, SampleKey]) -> SampleKey:
        if isinstance(key, (tuple, list)):
            index, epoch, size_id = (int(k) for k in key)
        else:
            index, epoch, size_id = int(key), self.epoch, 0
        if not 0 <= index < self.length:
            raise IndexError(f"sample index {index} out of range for {self.length} samples")
        if not 0 <= size_id < len(self.config.size):
            raise IndexError(f"size id {size_id} out of range for sizes {self.sizes}")
        return index, epoch, size_id

    def _draw(self, index: int, epoch: int, rng: np.random.Generator):
        n = len(self._photos)
        bg_start = (index + epoch * self.length) % n
        if self._reflections is None:
            r_start = int(rng.integers(n - 1))
            r_start += r_start >= bg_start
        else:
            r_start = int(rng.integers(len(self._reflections)))
        bg_idx, bg = self._photos.find(bg_start)
        if self._reflections is None:
            r_idx, refl = self._photos.find(r_start, avoid=bg_idx)
        else:
            r_idx, refl = self._reflections.find(r_start)
        return bg_idx, bg, r_idx, refl

    def sources(self, key: Union[int, SampleKey]) -> Dict[str, Path]:
        """The files sample ``key`` is made from: ``{'background': path, 'reflection': path}``."""
        index, epoch, _ = self._key(key)
        bg_idx, _, r_idx, _ = self._draw(index, epoch, sample_rng(self.seed, epoch, index))
        return {"background": self._photos.paths[bg_idx], "reflection": self.reflection_images[r_idx]}

    def sample_arrays(self, key: Union[int, SampleKey]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input, background, reflection) as HxWx3 float32 arrays in [0, 1]."""
        index, epoch, size_id = self._key(key)
        rng = sample_rng(self.seed, epoch, index)
        _, bg, _, refl = self._draw(index, epoch, rng)
        config = self.config.pick(rng) if isinstance(self.config, RecipeMix) else self.config
        size = config.size[size_id]
        b = random_crop(bg, size, config, rng)
        r = random_crop(refl, size, config, rng)
        return synthesize(b, r, config, rng, real_reflection=self._reflections is not None)

    def __getitem__(self, key: Union[int, SampleKey]) -> Dict[str, torch.Tensor]:
        mixture, background, reflection = self.sample_arrays(key)
        return {
            "input": _to_tensor(mixture),
            "background": _to_tensor(background),
            "reflection": _to_tensor(reflection),
        }


def read_real_pairs(root: PathLike, exclude_names: Sequence[str] = ()) -> Tuple[str, List[Any]]:
    """The layout and pairs of a ``--real`` folder, less ``exclude_names`` (a validation split): the one
    reading of --real, for training (:class:`RealPairs`), ``train fit-gain`` and ``train reflection-layers``.

    Every layout --val and eval read (a SIR2 or CEILNet folder is pairs as much as a paired one is); every
    pair whose two images differ in size is named in one error, before any work: read per sample, such
    a pair would stop a run mid-way, and only the first would be named.
    """
    from dereflect.tools.datasets import check_pair_sizes, detect_layout, filter_pairs, find_pairs

    layout = detect_layout(root, hint="Photos without ground truth go to --data (pairs are synthesised from them)")
    _, pairs = find_pairs(root, layout)
    if exclude_names:
        pairs = filter_pairs(pairs, exclude_names, keep=False, where=str(root))
    check_pair_sizes(pairs, root)
    return layout, pairs


class RealPairs(Dataset):
    """Real photo pairs as training samples: a folder in any layout with ground truth that ``dereflect eval``
    and ``--val`` read (:func:`dereflect.tools.datasets.find_pairs`: a paired folder such as zhang89,
    CEILNet triplets, SIR2).

    Each sample takes pair ``(index + epoch * n) % n``, one random geometry (flip, rotation, scaled
    crop as in :func:`random_crop`) applied identically to the photo and its clean layer, and one
    per-channel brightness/colour factor ``exp(N(0, colour_jitter))`` applied to both (so the pair's
    own colour relation is kept). ``exclude_names`` holds back a validation split. Images are
    read per sample (as synthesis reads its photos) unless :meth:`keep_decoded` keeps them in memory.
    """

    keyed = True
    is_real = True

    def __init__(self, root: PathLike, size: Any = 256, seed: int = 0, exclude_names: Sequence[str] = (),
                 crop_scale: Tuple[float, float] = (0.3, 1.0), flip_p: float = 0.75, rotate90: bool = False,
                 colour_jitter: float = 0.1):
        self.geometry = SynthesisConfig(size=size, crop_scale=crop_scale, flip_p=flip_p, rotate90=rotate90)
        self.seed = int(seed)
        self.colour_jitter = float(colour_jitter)
        self.epoch = 0
        self.layout, pairs = read_real_pairs(root, exclude_names)
        self.names = [pair.name for pair in pairs]
        self.pairs = pairs
        self.root = Path(root)
        self._decoded: Optional[DecodedImages] = None

    @property
    def sizes(self) -> List[Size]:
        return self.geometry.sizes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def describe_sources(self) -> Dict[str, str]:
        """The pairs drawn from (see :func:`training_data_record`)."""
        # The paired layout keeps the words earlier runs recorded (a resumed run compares them).
        layout = "" if self.layout == "paired" else f" ({self.layout} layout)"
        return {"real pairs": f"{len(self)} pairs in {_folder_names([self.root])}{layout}"}

    def __len__(self) -> int:
        return len(self.pairs)

    def keep_decoded(self, budget_bytes: int, progress: bool = True) -> int:
        """Decode the pairs once (checking each as a sample would) and keep them, up to ``budget_bytes``.

        ``progress``: a progress bar while decoding, on a terminal only.
        """
        with decoding_bar(len(self), "decoding real pairs", progress, unit="pair") as bar:
            def images() -> Iterator[Tuple[int, np.ndarray]]:
                for index in range(len(self)):
                    inp, bg = self._read(index)
                    bar.update(1)
                    yield 2 * index, inp
                    yield 2 * index + 1, bg

            self._decoded = None  # read the files themselves, not an earlier copy
            self._decoded = DecodedImages(images(), budget_bytes)
        return self._decoded.nbytes

    def _read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        if self._decoded is not None:
            inp, bg = self._decoded.get(2 * index), self._decoded.get(2 * index + 1)
            if inp is not None and bg is not None:
                return inp, bg
        pair = self.pairs[index]
        inp, bg = read_pair(pair)
        short_min, long_min = self.geometry.min_source_size
        if min(inp.shape[:2]) < short_min or max(inp.shape[:2]) < long_min:
            raise InputError(f"{self.root}: pair '{pair.name}' ({inp.shape[0]}x{inp.shape[1]}) is smaller than "
                             f"the training crop {self.geometry.sizes}")
        return inp, bg

    def sample_arrays(self, key: Union[int, SampleKey]) -> Tuple[np.ndarray, np.ndarray]:
        """(input, background) HxWx3 float32 in [0, 1] of sample ``key``."""
        index, epoch, size_id = key if isinstance(key, (tuple, list)) else (int(key), self.epoch, 0)
        rng = sample_rng(self.seed, epoch, index)
        inp, bg = self._read((index + epoch * len(self)) % len(self))
        size = self.geometry.size[size_id]
        twin = np.random.default_rng()
        twin.bit_generator.state = rng.bit_generator.state  # the same geometry for both images
        i = random_crop(inp, size, self.geometry, rng)
        b = random_crop(bg, size, self.geometry, twin)
        if self.colour_jitter:
            factor = np.exp(rng.normal(0.0, self.colour_jitter, 3)).astype(np.float32)
            i, b = np.clip(i * factor, 0, 1), np.clip(b * factor, 0, 1)
        return i, b

    def __getitem__(self, key: Union[int, SampleKey]) -> Dict[str, torch.Tensor]:
        i, b = self.sample_arrays(key)
        return {"input": _to_tensor(i), "background": _to_tensor(b), "reflection": _to_tensor(np.clip(i - b, 0, 1))}


class MixedPairs(Dataset):
    """Several training sets in one: sample ``(index, epoch)`` draws its source with the given weights.

    Each sample also carries ``real`` (1.0 for a :class:`RealPairs` source, else 0.0), which the
    transfer loss uses to go easier on the slightly misaligned real pairs. All sources must have
    the same training sizes.
    """

    keyed = True

    def __init__(self, parts: Sequence[Tuple[Dataset, float]], seed: int = 0):
        if len(parts) < 1 or any(not w > 0 for _, w in parts):
            raise InputError("MixedPairs needs one or more (dataset, weight > 0) parts")
        sizes = [list(getattr(d, "sizes", [])) for d, _ in parts]
        if any(s != sizes[0] for s in sizes):
            raise InputError(f"MixedPairs: every part needs the same training sizes, got {sizes}")
        self.parts = [d for d, _ in parts]
        weights = np.asarray([w for _, w in parts], np.float64)
        self.weights = weights / weights.sum()
        self.seed = int(seed)
        self.epoch = 0
        self.length = max(len(d) for d in self.parts)

    @property
    def sizes(self) -> List[Size]:
        return list(self.parts[0].sizes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def describe_sources(self) -> Dict[str, str]:
        """Every part's sources (see :func:`training_data_record`), real pairs with their share of the samples."""
        out: Dict[str, str] = {}
        for part, weight in zip(self.parts, self.weights):
            for key, text in getattr(part, "describe_sources", dict)().items():
                if getattr(part, "is_real", False):
                    text = f"{text}, {weight:.0%} of the samples"
                out[key] = f"{out[key]}; {text}" if key in out else text
        return out

    def keep_decoded(self, budget_bytes: int, progress: bool = True) -> int:
        """Each part's images kept decoded in memory, in order, sharing ``budget_bytes`` (``progress``: a
        progress bar per part while decoding, on a terminal only)."""
        used = 0
        for part in self.parts:
            if hasattr(part, "keep_decoded"):
                used += part.keep_decoded(budget_bytes - used, progress)
        return used

    def part_of(self, key: Union[int, SampleKey]) -> int:
        """Which part sample ``key`` comes from."""
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), self.epoch)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index, _MIX_TAG]))
        return int(rng.choice(len(self.parts), p=self.weights))

    def __getitem__(self, key: Union[int, SampleKey]) -> Dict[str, torch.Tensor]:
        index, epoch, size_id = key if isinstance(key, (tuple, list)) else (int(key), self.epoch, 0)
        part = self.parts[self.part_of((index, epoch))]
        sample = dict(part[(index % len(part), epoch, size_id)])
        sample["real"] = torch.tensor(1.0 if getattr(part, "is_real", False) else 0.0)
        return sample


def fit_for_network(
    img: np.ndarray,
    size: Optional[Union[int, Size]] = None,
    multiple: int = 32,
    max_side: Optional[int] = None,
) -> np.ndarray:
    """Resize/crop an HxWxC image for a network that needs sides divisible by ``multiple``.

    ``size=None``: downscale so the long side is at most ``max_side`` (if given), then centre
    crop each side down to a multiple of ``multiple``. ``size`` (int or (h, w)): resize to cover
    it, then centre crop to it exactly.
    """
    h, w = img.shape[:2]
    if size is not None:
        th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (nw, nh), interpolation=interp)
        y0, x0 = (nh - th) // 2, (nw - tw) // 2
        return img[y0:y0 + th, x0:x0 + tw]
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    ch, cw = h // multiple * multiple, w // multiple * multiple
    if ch == 0 or cw == 0:
        raise InputError(f"image of {h}x{w} is smaller than {multiple} px on a side; the network needs more")
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return img[y0:y0 + ch, x0:x0 + cw]


class GroundTruthPairs(Dataset):
    """Fixed pairs with ground truth, in any layout ``dereflect eval`` reads (for validation).

    The files are found by :func:`dereflect.tools.datasets.find_pairs` (paired ``blended/`` +
    ``transmission_layer/`` or ``input/`` + ``target/`` folders, CEILNet triplets, SIR2), so
    training validates on pairs found exactly as the evaluation finds them. Each sample has
    ``input``, ``background``, ``reflection`` = ``clip(input - background, 0, 1)`` (CEILNet's
    label2 up to clipping) and ``name``. See :func:`fit_for_network` for ``size``,
    ``multiple`` and ``max_side``; ``count`` keeps the first pairs only.
    """

    def __init__(
        self,
        root: PathLike,
        layout: str = "auto",
        size: Optional[Union[int, Size]] = None,
        multiple: int = 32,
        max_side: Optional[int] = None,
        count: Optional[int] = None,
    ):
        from dereflect.tools.datasets import check_pair_sizes, find_pairs

        self.layout, self.pairs = find_pairs(root, layout)
        if count is not None:
            self.pairs = self.pairs[:count]  # the first ``count`` pairs (--val-count): only those are checked and read
        check_pair_sizes(self.pairs, root)  # every pair of two sizes in one error, before training starts
        self.root = Path(root)
        self.size = size
        self.multiple = int(multiple)
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.pairs)

    def _fit(self, img: np.ndarray) -> np.ndarray:
        return fit_for_network(img, self.size, self.multiple, self.max_side)

    def describe_samples(self, indices: Optional[Sequence[int]] = None) -> Tuple[str, Dict[str, Any]]:
        """(description, everything the samples depend on) of pairs ``indices`` (None: all); see
        :func:`validation_set_record`."""
        pairs = self.pairs if indices is None else [self.pairs[i] for i in indices]
        content = {"layout": self.layout, "size": self.size, "multiple": self.multiple, "max_side": self.max_side,
                   "pairs": [(pair.name, _files([f for f in (pair.input, pair.target) if f is not None]))
                             for pair in pairs]}
        side = f" at most {self.max_side} px on a side" if self.max_side else ""
        return f"{len(pairs)} pairs in {_folder_names([self.root])}{side}", content

    def __getitem__(self, index: int) -> Dict[str, Any]:
        pair = self.pairs[index]
        inp, bg = read_pair(pair)
        i, b = self._fit(inp), self._fit(bg)
        return {
            "input": _to_tensor(i),
            "background": _to_tensor(b),
            "reflection": _to_tensor(np.clip(i - b, 0.0, 1.0)),
            "name": pair.name,
        }


# --------------------------------------------------------------------------- loading


class MultiSizeBatchSampler(Sampler):
    """Seeded batches of sample keys ``(index, epoch, size_id)``, one size per batch.

    Each epoch's order and each batch's size come from ``SeedSequence([seed, epoch, tag])``.
    The epoch is :meth:`set_epoch`'s value; each pass then moves it on by one, so a loop that
    never calls ``set_epoch`` still sees new samples every epoch. With ``keys=False`` it
    yields plain indices (for datasets without seeds or sizes).

    Data-parallel training: with ``world_size`` ranks the order is cut into global batches of
    ``batch_size * world_size`` keys, one size each, and rank ``rank`` takes the ``rank``-th slice of
    ``batch_size``. So no two ranks draw the same sample, every rank has the same number of batches,
    and the ranks' batches together are exactly the batches of one process with the global batch size
    (with ``world_size=1`` the batches are those of earlier versions).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        n_sizes: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        keys: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or n_sizes < 1 or length < 1:
            raise InputError(
                f"need length, batch_size and n_sizes >= 1, got {length}, {batch_size}, {n_sizes}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not one of the {world_size} ranks")
        if world_size > 1 and not drop_last:
            raise InputError("splitting batches over ranks needs drop_last: a partial last batch would leave "
                             "some ranks without samples")
        if drop_last and length < batch_size * world_size:
            on_ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
            raise InputError(
                f"{length} samples cannot fill one batch of {batch_size}{on_ranks} with drop_last; "
                "lower the batch size or add images"
            )
        self.length = length
        self.batch_size = batch_size
        self.n_sizes = n_sizes
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.keys = keys
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next pass epoch ``epoch``, starting after its first ``skip_batches`` batches (resuming
        mid-epoch: the skipped keys are never loaded)."""
        if not 0 <= skip_batches < max(len(self), 1):
            raise InputError(f"cannot skip {skip_batches} of the {len(self)} batches of an epoch")
        self.epoch = int(epoch)
        self.skip = int(skip_batches)

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        if self.drop_last:
            return self.length // per_step
        return -(-self.length // per_step)

    def batches(self, epoch: int) -> List[List[Union[int, SampleKey]]]:
        """This rank's batches of ``epoch`` (without touching the sampler's epoch)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _SAMPLER_TAG]))
        order = rng.permutation(self.length) if self.shuffle else np.arange(self.length)
        per_step = self.batch_size * self.world_size
        out: List[List[Union[int, SampleKey]]] = []
        for b in range(len(self)):
            chunk = order[b * per_step:(b + 1) * per_step][self.rank * self.batch_size:
                                                              (self.rank + 1) * self.batch_size]
            size_id = int(rng.integers(self.n_sizes))  # one draw per global batch: all ranks take one size
            if self.keys:
                out.append([(int(i), epoch, size_id) for i in chunk])
            else:
                out.append([int(i) for i in chunk])
        return out

    def __iter__(self) -> Iterator[List[Union[int, SampleKey]]]:
        # The epoch is read when iteration actually starts: DataLoader may create and drop
        # an iterator without using it.
        epoch, skip = self.epoch, self.skip
        self.epoch += 1
        self.skip = 0
        yield from self.batches(epoch)[skip:]


class SeededLoader(DataLoader):
    """A DataLoader with ``set_epoch`` (forwarded to its batch sampler and dataset)."""

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next pass epoch ``epoch``, from its batch ``skip_batches`` on (see the sampler)."""
        self.batch_sampler.set_epoch(epoch, skip_batches)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def close(self) -> None:
        """Stop the worker processes now; the next pass starts new ones.

        Persistent workers otherwise live as long as the loader, and they ignore SIGTERM
        (:func:`_worker_init`): a loader still referenced when the interpreter exits (from an
        exception's traceback, say) would leave multiprocessing's exit handler waiting for them
        forever. PyTorch offers no public call for this; its iterator's own shutdown is used.
        """
        iterator, self._iterator = getattr(self, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def _worker_init(worker_id: int) -> None:
    # Samples draw from their own generators; seeding the globals anyway keeps any stray
    # np.random use deterministic, and one OpenCV thread per worker avoids oversubscription.
    # The seed is the loader generator's (see make_loader), distinct per rank and worker.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(1)
    # Ctrl+C reaches the whole process group (and systemd's SIGTERM the whole service): the trainer
    # stops between steps and shuts its workers down itself, while a worker killed by the signal
    # would fail the run. A worker whose trainer is gone exits by itself (PyTorch's watchdog).
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    workers: int = 2,
    drop_last: Optional[bool] = None,
    pin_memory: Optional[bool] = None,
    rank: int = 0,
    world_size: int = 1,
) -> SeededLoader:
    """A deterministic DataLoader over ``dataset``.

    Batches come from :class:`MultiSizeBatchSampler` (one size per batch for multi-size
    :class:`SyntheticPairs`; with ``world_size`` > 1 this rank's share of each global batch).
    ``drop_last`` defaults to ``shuffle`` (training); ``pin_memory`` (page-locked batches, so copies
    to the GPU can be asynchronous) to CUDA availability; workers persist across epochs and are
    spawned, so a script that builds a loader with workers needs an ``if __name__ == "__main__":``
    guard. Call ``loader.set_epoch(e)`` before epoch ``e`` (resuming); without it each pass over the
    loader moves on to the next epoch by itself.
    """
    sizes = getattr(dataset, "sizes", None)
    keyed = getattr(dataset, "keyed", False)
    sampler = MultiSizeBatchSampler(
        len(dataset),
        batch_size,
        n_sizes=len(sizes) if keyed and sizes else 1,
        seed=seed,
        shuffle=shuffle,
        drop_last=shuffle if drop_last is None else drop_last,
        keys=keyed,
        rank=rank,
        world_size=world_size,
    )
    workers = max(0, int(workers))
    return SeededLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        # Forked workers deadlock in OpenCV's thread pool once the parent has used it, so
        # workers start from a fresh interpreter.
        multiprocessing_context="spawn" if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        # Rank 0 keeps the seed earlier versions used; other ranks' workers get their own seeds.
        generator=torch.Generator().manual_seed(int(seed) + (int(rank) << 32)),
    )

"""Synthesised reflection pairs: the recipe, the blend, the crop, and the statistics matched to real glass.

Synthesis follows the RM2S authors' recipe (after Zhang et al. 2018), CRRN's weighted sum, or
the ``transfer`` recipe of later work; see :class:`SynthesisConfig`. :func:`synthesize` returns,
as HxWx3 float32 arrays in [0, 1]:

- the mixture I (what the camera sees through the glass);
- the clean background B, *before* the glass's transmission loss (the target both papers
  train towards);
- the reflection as it appears in I, in display space: ``R = I - B_t`` where ``B_t`` is the
  background as transmitted (scaled by the transmission factor, in display space). So
  ``I = B_t + R`` up to clipping. For CRRN's recipe with gamma 1 this is exactly
  ``beta * R_layer``; it is also the convention of CEILNet's triplets (label2 = input - label1
  up to clipping).

Randomness: every random choice of sample ``index`` in ``epoch`` comes from one
``numpy.random.Generator`` built from ``SeedSequence([seed, epoch, index, tag])``
(:func:`sample_rng`), so a sample is bit-identical whatever the worker count or the order
samples are drawn in. NumPy and OpenCV only: the datasets (:mod:`dereflect.train.data`) turn
these arrays into tensors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np
from dereflect.errors import InputError

Size = Tuple[int, int]

MODES = ("rm2s", "crrn", "transfer")

# Distinct last words keep the per-sample seed stream apart from the datasets' own streams.
_SAMPLE_TAG = 0x5A3D1

def _pair(value: Any, name: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"SynthesisConfig.{name} must be a (low, high) pair, got {value!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(
            f"SynthesisConfig.{name} must be a finite (low, high) pair with low <= high, got {value!r}"
        )
    return lo, hi


def _sizes(value: Any) -> Tuple[Size, ...]:
    """Normalise 256, (h, w) or [(h, w), ...] to a tuple of (h, w)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        sizes = [(int(value), int(value))]
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        sizes = [(int(value[0]), int(value[1]))]
    elif isinstance(value, (list, tuple)) and value:
        try:
            sizes = [(int(h), int(w)) for h, w in value]
        except (TypeError, ValueError) as exc:
            raise InputError(f"SynthesisConfig.size: cannot read {value!r} as a list of (h, w)") from exc
    else:
        raise InputError(f"SynthesisConfig.size must be an int, (h, w) or a list of (h, w), got {value!r}")
    if any(h < 8 or w < 8 for h, w in sizes):
        raise InputError(f"SynthesisConfig.size: every side must be at least 8 px, got {sizes}")
    return tuple(sizes)


#: ``crop_scale`` of the paper presets: the largest crop of the target aspect (the whole photo where
#: the aspects agree, else all of its shorter extent), resized to the target. CRRN trains "using whole
#: images" (its paper: patches without the reflection could degrade the result) and RM2S resizes its
#: synthesised images to 256x256; neither takes smaller crops. The aspect is kept rather than
#: squashed, so a reflection's shape is the photo's.
WHOLE_PHOTO: Tuple[float, float] = (1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """How training pairs are synthesised (recorded in checkpoints as the data recipe).

    Mode ``"rm2s"`` (Zhang et al. 2018, as in the RM2S authors' code), all in linear light
    (``x ** gamma``): ghost (optional) -> Gaussian blur of R, sigma ~ U(blur_sigma), kernel
    2*ceil(2 sigma)+1 -> overflow correction: per channel, over the pixels where T + R > 1,
    m = mean(T + R); R -= (m - 1) * att with att ~ U(overflow_attenuation); R clipped to
    [0, 1] -> T scaled by 1 - U(background_scale), R weighted by U(reflection_weight) times a
    Gaussian vignette -> I = T + R back to display space (``** 1/gamma``), clipped.

    Mode ``"crrn"``: ``I = alpha B + beta R`` (the overflow step is skipped); the preset uses
    gamma 1, alpha = 1 - U(0, 0.2), beta ~ U(0.1, 0.5), blurred R, two sizes.

    The three paper presets (:meth:`rm2s_stage1`, :meth:`rm2s_stage2`, :meth:`crrn`) take the
    whole photo (``crop_scale`` (1, 1), see :data:`WHOLE_PHOTO`): CRRN trains on whole images and
    RM2S resizes its synthesised images to 256x256; the field's default (0.5, 1.0) is for recipes
    built by hand.

    Mode ``"transfer"`` (what later work found transfers to real glass, read from the released code of ERRNet,
    DSRNet, RDNet and Zhang et al.): in linear light, R blurred with a kernel drawn from ``blur_kernels``
    (probabilities ``blur_kernel_p``) and sigma ~ U(blur_sigma), weighted by U(reflection_weight) times the
    vignette, T scaled by 1 - U(background_scale); then with probability ``screen_p`` a screen blend T + R - T
    R, else T + R with the overflow correction above. Last, the camera's colour and exposure change between the
    two shots: I is multiplied per channel by ``exp(s + d_c)``, s ~ N(colour_log_mean, colour_log_sd), d_c ~
    N(colour_channel_log_mean[c], colour_channel_log_sd), with values moment-matched to the real training pairs
    (see :func:`colour_ratios`).

    The ghost is the paper's kernel of two close impulses:
    ``R = (R + a * shift(R)) / ghost_divisor`` with an integer shift of up to
    ``ghost_max_shift`` of each side (never zero) and ``a ~ U(ghost_attenuation)``; the
    defaults (a = 1, divisor 1.25) are the authors' code. Real reflection layers (see
    :class:`SyntheticPairs`) already carry their real blur and ghosting: they skip the ghost
    and the blur but get the rest of the recipe.

    The vignette is exp(-d^2/2) with d measured in units of ``vignette_sigma`` times each side,
    centred at a uniformly random pixel (about the reach of Zhang et al.'s 560 px mask over a
    256 px crop). Geometry: with probability ``flip_p`` a flip (horizontal, vertical or both,
    uniformly), a rotation by k*90 degrees (k uniform in 0..3) if ``rotate90``, and a random
    crop whose side is ``U(crop_scale)`` of the largest crop of the target aspect (never
    smaller than the target, so crops are not upscaled), resized to the target size.
    Background and reflection get independent geometry.

    ``size`` may be 256, (h, w) or a list of (h, w) (multi-size training, one size per batch:
    see :class:`MultiSizeBatchSampler`); it is stored as a tuple of (h, w).
    """

    mode: str = "rm2s"
    size: Any = 256
    gamma: float = 2.2
    blur_sigma: Tuple[float, float] = (0.0, 3.0)
    ghost: bool = True
    ghost_max_shift: float = 15.0 / 256.0
    ghost_attenuation: Tuple[float, float] = (1.0, 1.0)
    ghost_divisor: float = 1.25
    overflow_attenuation: Tuple[float, float] = (1.08, 1.18)
    background_scale: Tuple[float, float] = (0.0, 1.0 / 3.0)
    reflection_weight: Tuple[float, float] = (0.0, 0.2)
    vignette: bool = True
    vignette_sigma: float = 0.3
    flip_p: float = 0.75
    rotate90: bool = True
    crop_scale: Tuple[float, float] = (0.5, 1.0)
    blur_kernels: Tuple[int, ...] = ()
    blur_kernel_p: Tuple[float, ...] = ()
    screen_p: float = 0.0
    colour_log_mean: float = 0.0
    colour_log_sd: float = 0.0
    colour_channel_log_mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    colour_channel_log_sd: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields in place once
        if self.mode not in MODES:
            raise InputError(f"SynthesisConfig.mode must be one of {MODES}, got {self.mode!r}")
        set_(self, "size", _sizes(self.size))
        for name in ("blur_sigma", "ghost_attenuation", "overflow_attenuation", "background_scale",
                     "reflection_weight", "crop_scale"):
            set_(self, name, _pair(getattr(self, name), name))
        for name in ("gamma", "ghost_max_shift", "ghost_divisor", "vignette_sigma", "flip_p", "screen_p",
                     "colour_log_mean", "colour_log_sd", "colour_channel_log_sd"):
            set_(self, name, float(getattr(self, name)))
        try:
            set_(self, "blur_kernels", tuple(int(k) for k in self.blur_kernels))
            set_(self, "blur_kernel_p", tuple(float(p) for p in self.blur_kernel_p))
            set_(self, "colour_channel_log_mean", tuple(float(v) for v in self.colour_channel_log_mean))
        except (TypeError, ValueError):
            raise InputError("SynthesisConfig: blur_kernels, blur_kernel_p and colour_channel_log_mean must be "
                             "lists of numbers") from None
        if any(k < 1 or k % 2 == 0 for k in self.blur_kernels):
            raise InputError(f"SynthesisConfig.blur_kernels must be odd sizes >= 1, got {self.blur_kernels}")
        if len(self.blur_kernel_p) != len(self.blur_kernels) or (
                self.blur_kernels and (min(self.blur_kernel_p) < 0 or abs(sum(self.blur_kernel_p) - 1) > 1e-6)):
            raise InputError("SynthesisConfig.blur_kernel_p needs one probability per blur kernel, summing to 1; "
                             f"got {self.blur_kernel_p} for {self.blur_kernels}")
        if len(self.colour_channel_log_mean) != 3:
            raise InputError("SynthesisConfig.colour_channel_log_mean needs 3 values (R, G, B)")
        if not 0.0 <= self.screen_p <= 1.0:
            raise InputError(f"SynthesisConfig.screen_p must be in [0, 1], got {self.screen_p}")
        if self.colour_log_sd < 0 or self.colour_channel_log_sd < 0:
            raise InputError("SynthesisConfig: colour_log_sd and colour_channel_log_sd must be >= 0")
        for name in ("ghost", "vignette", "rotate90"):
            set_(self, name, bool(getattr(self, name)))
        if self.gamma <= 0 or self.ghost_divisor <= 0 or self.vignette_sigma <= 0:
            raise InputError("SynthesisConfig: gamma, ghost_divisor and vignette_sigma must be > 0")
        if not 0.0 <= self.flip_p <= 1.0:
            raise InputError(f"SynthesisConfig.flip_p must be in [0, 1], got {self.flip_p}")
        if self.blur_sigma[0] < 0 or self.ghost_attenuation[0] < 0 or self.reflection_weight[0] < 0:
            raise InputError(
                "SynthesisConfig: blur_sigma, ghost_attenuation and reflection_weight must be >= 0"
            )
        if not (0.0 <= self.background_scale[0] and self.background_scale[1] < 1.0):
            raise InputError(
                f"SynthesisConfig.background_scale must lie in [0, 1), got {self.background_scale}"
            )
        if not 0.0 <= self.ghost_max_shift < 0.5:
            raise InputError(
                f"SynthesisConfig.ghost_max_shift must be in [0, 0.5), got {self.ghost_max_shift}"
            )
        if not (0.0 < self.crop_scale[0] and self.crop_scale[1] <= 1.0):
            raise InputError(f"SynthesisConfig.crop_scale must lie in (0, 1], got {self.crop_scale}")

    @property
    def sizes(self) -> List[Size]:
        """The target sizes as a list of (h, w)."""
        return list(self.size)

    @property
    def min_source_size(self) -> Size:
        """(short, long) side an image needs to give every target size without upscaling."""
        return max(min(s) for s in self.size), max(max(s) for s in self.size)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "size":
                value = [list(s) for s in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @property
    def primary(self) -> SynthesisConfig:
        """This recipe (as :attr:`RecipeMix.primary` is a mix's first): real pairs take its geometry."""
        return self

    def with_size(self, size: Any) -> SynthesisConfig:
        """The same recipe at other target size(s)."""
        return dataclasses.replace(self, size=size)

    def without_reflection(self) -> SynthesisConfig:
        """The same recipe with no reflection and no transmission loss: the input is the background.

        Mixed into training (``--clean-fraction``) these pairs teach a model to leave a photo
        that shows no reflection alone; without them every pair asks for a change, and a model
        alters clean photos too.
        """
        return dataclasses.replace(self, reflection_weight=(0.0, 0.0), background_scale=(0.0, 0.0),
                                   colour_log_mean=0.0, colour_log_sd=0.0,
                                   colour_channel_log_mean=(0.0, 0.0, 0.0), colour_channel_log_sd=0.0)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> SynthesisConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise InputError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown synthesis recipe keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def rm2s_stage1(cls, **overrides: Any) -> SynthesisConfig:
        """RM2S stage 1: Zhang et al. recipe with the ghost, the whole photo resized to 256x256."""
        return cls.from_dict({"mode": "rm2s", "ghost": True, "crop_scale": WHOLE_PHOTO, **overrides})

    @classmethod
    def rm2s_stage2(cls, **overrides: Any) -> SynthesisConfig:
        """RM2S stage 2: as stage 1 without the ghost (the authors' code adds it in stage 1 only)."""
        return cls.from_dict({"mode": "rm2s", "ghost": False, "crop_scale": WHOLE_PHOTO, **overrides})

    @classmethod
    def crrn(cls, **overrides: Any) -> SynthesisConfig:
        """CRRN: I = alpha B + beta R, alpha ~ U(0.8, 1), beta ~ U(0.1, 0.5), whole photos at 96x160 and 224x288.

        The reflection is blurred (sigma ~ U(0, 3), as in the RM2S authors' recipe), which the
        CRRN paper does not do: its reflections are photos captured through glass (its RID set,
        taken at random focal lengths, so with their own defocus), not available here. Ordinary
        photos stand in for them, and a sharp ordinary photo is not what those captures look
        like; the blur stands in for their defocus (``blur_sigma=0,0`` turns it off).
        """
        preset: Dict[str, Any] = {
            "mode": "crrn",
            "size": [(96, 160), (224, 288)],
            "gamma": 1.0,
            "blur_sigma": (0.0, 3.0),
            "ghost": False,
            "background_scale": (0.0, 0.2),
            "reflection_weight": (0.1, 0.5),
            "vignette": False,
            "crop_scale": WHOLE_PHOTO,
        }
        preset.update(overrides)
        return cls.from_dict(preset)

    @classmethod
    def transfer(cls, **overrides: Any) -> SynthesisConfig:
        """Later work's recipe (ERRNet, DSRNet, RDNet) with colour matched to real pairs.

        Blur kernels 5/7/9/11 (p 0.1/0.2/0.3/0.4), sigma 2-5, reflection scaled 0.4-1.0 under a
        vignette, 70 % screen blends and 30 % additive ones with ERRNet's 1.3 x overflow
        correction, in linear light. The colour terms come from ``colour_ratios`` on the 79
        training pairs of zhang89 (docs/TRAINING.md), less what the reflection itself adds.
        """
        preset: Dict[str, Any] = {
            "mode": "transfer",
            "ghost": False,
            "blur_sigma": (2.0, 5.0),
            "blur_kernels": (5, 7, 9, 11),
            "blur_kernel_p": (0.1, 0.2, 0.3, 0.4),
            "reflection_weight": (0.4, 1.0),
            "background_scale": (0.0, 0.1),
            "overflow_attenuation": (1.3, 1.3),
            "screen_p": 0.7,
            "crop_scale": (0.3, 1.0),
            **TRANSFER_COLOUR,
        }
        preset.update(overrides)
        return cls.from_dict(preset)


#: The transfer recipe's colour terms, moment-matched (docs/TRAINING.md, "Colour statistics"): on the
#: 79 zhang89 training pairs the log ratio of mean(blended) to mean(clean), averaged over channels,
#: has mean 0.228 and sd 0.239 (ratios clipped to [0.74, 2.5], which keeps two exposure outliers
#: from setting the spread), channel deviations (-0.045, 0.007, 0.038) with sds 0.03-0.07; the
#: recipe without colour terms gives 0.110 / 0.113 and (-0.011, -0.019, 0.030) with sds 0.04-0.09.
#: The colour change supplies the difference (means subtracted, variances subtracted).
TRANSFER_COLOUR: Dict[str, Any] = {
    "colour_log_mean": 0.118,
    "colour_log_sd": 0.21,
    "colour_channel_log_mean": (-0.034, 0.026, 0.008),
    "colour_channel_log_sd": 0.0,
}


@dataclasses.dataclass(frozen=True)
class RecipeMix:
    """Several recipes in one training set: each sample uses one, drawn with the given weights.

    A model trained on one recipe learns that recipe's habits (CRRN's dims the background and
    adds a strong veil, the RM2S one adds local, often faint reflections); one that must not
    harm either kind of photo is trained on both. Every recipe is given the first one's sizes,
    so multi-size batching works as with a single recipe.
    """

    recipes: Tuple[SynthesisConfig, ...]
    weights: Tuple[float, ...]

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields in place once
        recipes = tuple(self.recipes)
        weights = tuple(float(w) for w in self.weights)
        if len(recipes) < 2 or len(weights) != len(recipes):
            raise InputError(f"RecipeMix needs two or more recipes and one weight each, got {len(recipes)} "
                             f"recipes and {len(weights)} weights")
        if any(not w > 0 for w in weights):
            raise InputError(f"RecipeMix weights must be > 0, got {weights}")
        set_(self, "recipes", tuple(r.with_size(recipes[0].size) for r in recipes))
        set_(self, "weights", weights)

    @property
    def primary(self) -> SynthesisConfig:
        """The first recipe: its sizes and crop geometry are the mix's (real pairs take them too)."""
        return self.recipes[0]

    @property
    def size(self) -> Tuple[Size, ...]:
        return self.recipes[0].size

    @property
    def sizes(self) -> List[Size]:
        return self.recipes[0].sizes

    @property
    def min_source_size(self) -> Size:
        return self.recipes[0].min_source_size

    def with_size(self, size: Any) -> RecipeMix:
        return RecipeMix(tuple(r.with_size(size) for r in self.recipes), self.weights)

    def pick(self, rng: np.random.Generator) -> SynthesisConfig:
        """The recipe of one sample (one draw from ``rng``)."""
        p = np.asarray(self.weights) / sum(self.weights)
        return self.recipes[int(rng.choice(len(self.recipes), p=p))]

    def to_dict(self) -> Dict[str, Any]:
        """``{"mix": [{"weight": w, "recipe": {...}}, ...]}`` (JSON-serialisable)."""
        return {"mix": [{"weight": w, "recipe": r.to_dict()} for w, r in zip(self.weights, self.recipes)]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> RecipeMix:
        """Inverse of :meth:`to_dict`."""
        try:
            parts = list(data["mix"])
            return cls(tuple(SynthesisConfig.from_dict(dict(part["recipe"])) for part in parts),
                       tuple(part["weight"] for part in parts))
        except (KeyError, TypeError):
            raise InputError('a recipe mix is {"mix": [{"weight": W, "recipe": {...}}, ...]}') from None


Recipe = Union[SynthesisConfig, RecipeMix]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of every random choice for sample ``index`` of ``epoch``."""
    if min(seed, epoch, index) < 0:
        raise InputError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, _SAMPLE_TAG]))


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = img.shape[:2]
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)


def _ghost(r: np.ndarray, config: SynthesisConfig, rng: np.random.Generator) -> np.ndarray:
    h, w = r.shape[:2]
    my, mx = round(config.ghost_max_shift * h), round(config.ghost_max_shift * w)
    dy = dx = 0
    if my or mx:
        while dy == 0 and dx == 0:  # two *distinct* impulses
            dy, dx = int(rng.integers(-my, my + 1)), int(rng.integers(-mx, mx + 1))
    else:
        dx = 1
    a = rng.uniform(*config.ghost_attenuation)
    return (r + np.float32(a) * _shift(r, dy, dx)) / np.float32(config.ghost_divisor)


def _vignette(h: int, w: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    gy = np.exp(-0.5 * ((np.arange(h, dtype=np.float32) - cy) / (sigma * h)) ** 2)
    gx = np.exp(-0.5 * ((np.arange(w, dtype=np.float32) - cx) / (sigma * w)) ** 2)
    return np.outer(gy, gx).astype(np.float32)[:, :, None]


def synthesize(
    background: np.ndarray,
    reflection: np.ndarray,
    config: SynthesisConfig,
    rng: np.random.Generator,
    real_reflection: bool = False,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mix two HxWx3 float32 images in [0, 1] per ``config``; return (input, background, reflection).

    ``background`` is returned unchanged (the clean target); ``reflection`` is
    ``input - transmitted background`` (see the module docstring). ``real_reflection`` skips
    the ghost and the blur (a real reflection layer carries its own).
    """
    if background.shape != reflection.shape or background.ndim != 3 or background.shape[2] != 3:
        raise InputError(
            f"synthesize needs two HxWx3 images of one shape, got {background.shape} and {reflection.shape}"
        )
    g = config.gamma
    t = np.power(background.astype(np.float32), g)
    r = np.power(reflection.astype(np.float32), g)
    if config.ghost and not real_reflection:
        r = _ghost(r, config, rng)
    if not real_reflection:
        sigma = rng.uniform(*config.blur_sigma)
        if config.blur_kernels:
            k = int(config.blur_kernels[int(rng.choice(len(config.blur_kernels), p=config.blur_kernel_p))])
        else:
            k = 2 * math.ceil(2 * sigma) + 1
        if sigma > 0:
            r = cv2.GaussianBlur(r, (k, k), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    if config.mode == "transfer":
        return _blend_transfer(t, r, background, config, rng)
    if config.mode == "rm2s":
        r = _overflow_correct(t, r, rng.uniform(*config.overflow_attenuation))
    scale = 1.0 - rng.uniform(*config.background_scale)
    weight = rng.uniform(*config.reflection_weight)
    r = r * np.float32(weight)
    if config.vignette:
        r = r * _vignette(r.shape[0], r.shape[1], config.vignette_sigma, rng)
    t = t * np.float32(scale)
    inv = 1.0 / g
    mixture = np.power(np.clip(t + r, 0.0, 1.0), inv).astype(np.float32)
    transmitted = np.power(t, inv)
    refl = np.clip(mixture - transmitted, 0.0, 1.0).astype(np.float32)
    return mixture, background.astype(np.float32), refl


def _overflow_correct(t: np.ndarray, r: np.ndarray, att: float) -> np.ndarray:
    """Per channel, lower R by ``att`` times the mean overflow of T + R where it exceeds 1."""
    blend = t + r
    for c in range(3):
        over = blend[:, :, c] > 1
        if over.any():
            excess = float(blend[:, :, c][over].mean()) - 1.0
            r[:, :, c] -= np.float32(excess * att)
    return np.clip(r, 0.0, 1.0)


def _blend_transfer(t: np.ndarray, r: np.ndarray, background: np.ndarray, config: SynthesisConfig,
                    rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``transfer`` mode after the blur (see :class:`SynthesisConfig`); t and r in linear light."""
    r = r * np.float32(rng.uniform(*config.reflection_weight))
    if config.vignette:
        r = r * _vignette(r.shape[0], r.shape[1], config.vignette_sigma, rng)
    t = t * np.float32(1.0 - rng.uniform(*config.background_scale))
    if rng.random() < config.screen_p:
        mixed = t + r - t * r
    else:
        mixed = t + _overflow_correct(t, r, rng.uniform(*config.overflow_attenuation))
    shared = config.colour_log_mean
    if config.colour_log_sd:
        shared = rng.normal(shared, config.colour_log_sd)
    offsets = np.asarray(config.colour_channel_log_mean, np.float64)
    if config.colour_channel_log_sd:
        offsets = offsets + rng.normal(0.0, config.colour_channel_log_sd, 3)
    # The colour change is a camera's, so it applies in display space, after the blend.
    inv = 1.0 / config.gamma
    gain = np.exp(shared + offsets).astype(np.float32)
    mixture = np.clip(np.power(np.clip(mixed, 0.0, 1.0), inv) * gain, 0.0, 1.0).astype(np.float32)
    refl = np.clip(mixture - np.power(t, inv), 0.0, 1.0).astype(np.float32)
    return mixture, background.astype(np.float32), refl


def colour_ratios(inputs: Sequence[np.ndarray], backgrounds: Sequence[np.ndarray]) -> np.ndarray:
    """log(mean(input) / mean(background)) per channel for each pair: (N, 3), images HxWx3 in [0, 1].

    The statistic the ``transfer`` recipe's colour terms are matched on: on real pairs it holds
    both the light a reflection adds and the camera's colour/exposure change between the shots.
    """
    out = []
    for inp, bg in zip(inputs, backgrounds):
        num = np.asarray(inp, np.float64).reshape(-1, 3).mean(0)
        den = np.asarray(bg, np.float64).reshape(-1, 3).mean(0)
        if np.any(den <= 0) or np.any(num <= 0):
            raise InputError("colour_ratios: an image is black in some channel; its ratio is undefined")
        out.append(np.log(num / den))
    return np.asarray(out)


def reflection_layer(blended: np.ndarray, clean: np.ndarray, gamma: float = 2.2) -> np.ndarray:
    """The reflection of a real pair as an image: ``(blended^gamma - clean^gamma)+ ^ (1/gamma)``, HxWx3 in [0, 1].

    Synthesis linearises a reflection image with ``gamma`` and adds it to the linearised
    background, so this layer, added with weight 1 to its own clean layer, gives back the photo
    wherever the photo is the brighter of the two. Added to other photos (``--reflections``) it
    carries a real reflection's sharpness, colour and shape, which blurred photos do not: later
    work found synthetic training removes blurry reflections and leaves sharp ones (the CDR benchmark of Lei et al.).
    Where the pair is misaligned the layer also holds thin edges of the clean scene.
    """
    if blended.shape != clean.shape or blended.ndim != 3 or blended.shape[2] != 3:
        raise InputError(f"reflection_layer needs two HxWx3 images of one shape, got {blended.shape} and {clean.shape}")
    if gamma <= 0:
        raise InputError(f"gamma must be > 0, got {gamma}")
    linear = np.power(blended.astype(np.float32), gamma) - np.power(clean.astype(np.float32), gamma)
    return np.power(np.clip(linear, 0.0, 1.0), 1.0 / gamma).astype(np.float32)


def random_crop(
    img: np.ndarray,
    size: Size,
    config: SynthesisConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Random flip / rot90 / scaled crop of an HxWx3 float32 image in [0, 1] to ``size``."""
    th, tw = size
    k = int(rng.integers(4)) if config.rotate90 else 0
    flip = int(rng.integers(3)) - 1 if rng.random() < config.flip_p else None
    sh, sw = (tw, th) if k % 2 else (th, tw)  # crop in the source orientation, rotate after
    h, w = img.shape[:2]
    fit = min(h / sh, w / sw)  # zoom of the largest crop of the target aspect
    zoom = max(min(1.0, fit), fit * rng.uniform(*config.crop_scale))
    ch, cw = min(h, max(1, round(sh * zoom))), min(w, max(1, round(sw * zoom)))
    y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    crop = img[y0:y0 + ch, x0:x0 + cw]
    interp = cv2.INTER_AREA if zoom > 1.0 else cv2.INTER_LINEAR
    out = cv2.resize(crop, (sw, sh), interpolation=interp)
    if flip is not None:
        out = cv2.flip(out, flip)  # 1 horizontal, 0 vertical, -1 both
    out = np.rot90(out, k)
    # Interpolating floats can overshoot [0, 1] by a rounding error.
    return np.clip(np.ascontiguousarray(out, dtype=np.float32), 0.0, 1.0)

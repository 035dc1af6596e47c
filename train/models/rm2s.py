"""RM2S networks: the U-Net used by both stages and the WGAN critic of stage 2.

Reading of the paper's "6 levels of stride-two convolutional layers" (section IV.A) against the
authors' released code: the encoder has five stride-2 down blocks plus the bottleneck, a 4x4
*valid* conv to 4000 channels. At 128x128 the bottleneck takes the 4x4 map to 1x1, the sixth
reduction; the decoder mirrors it with the 4x4 stride-1 transposed conv and five stride-2 up blocks
(six "deconvolutional levels"). That reading gives the code's ~115 M parameters and its size rule
(sides multiples of 32, at least 128). In the up block the transposed conv keeps the concatenated
width and the two 5x5 convs reduce it: the only layout consistent with that count (reducing in the
transposed conv gives ~91 M).

"lite" (a few million parameters, for real time on a Jetson) keeps the U-Net shape but:
3x3 convs; the stride-2 conv and the transposed conv change the width themselves (so the first
block does not squeeze a full-resolution image into 3 channels at half resolution); narrower
widths; no bottleneck (the 4000-channel layer is ~65 M parameters and dominates cost at high
resolution), so any multiple of 32 works. Only Conv, ConvTranspose, BatchNorm (folded at export),
ReLU/LeakyReLU, Concat and Sigmoid are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from dereflect.errors import InputError
from torch import nn

from . import DEFAULT_ENCODER
from .common import (
    ModelConfig,
    activation,
    check_choice,
    check_input,
    check_positive_ints,
    lite_decoder_widths,
    norm_layer,
)

_NORMS = ("batch", "none")
_ACTS = ("relu", "leaky_relu")


@dataclass
class UNetConfig(ModelConfig):
    """RM2S U-Net. Defaults are the "paper" preset.

    widths: output width of each stride-2 down block (len(widths) blocks, stride 2**len(widths)).
    kernel_size: the plain convs (and the output conv); down_kernel: the stride-2 conv (pad (k-1)//2);
    up_kernel: the stride-2 transposed conv (even, pad (k-2)/2, so sizes double exactly).
    stride_conv_keeps_width / transpose_keeps_width: the paper's layout (True) keeps the width in
    the stride-2 conv / transposed conv and lets the following convs change it.
    bottleneck_channels: width of the valid bottleneck conv (0: no bottleneck).
    residual: predict the reflection residual r and output I - r (the first three input
    channels minus r; clamped to [0, 1] in eval mode) instead of a sigmoid image. The paper's
    net is not residual; the lite one is, so that it starts as the identity and short
    trainings already improve on the input.
    """

    in_channels: int = 3
    out_channels: int = 3
    widths: Tuple[int, ...] = (64, 64, 128, 256, 512)
    kernel_size: int = 5
    down_kernel: int = 4
    up_kernel: int = 4
    convs_per_block: int = 2
    stride_conv_keeps_width: bool = True
    transpose_keeps_width: bool = True
    bottleneck_channels: int = 4000
    bottleneck_kernel: int = 4
    norm: str = "batch"
    encoder_activation: str = "relu"
    decoder_activation: str = "leaky_relu"
    negative_slope: float = 0.2
    residual: bool = False

    _PRESETS = {
        "paper": {},
        "lite": {
            "residual": True,
            "widths": (16, 32, 64, 128, 256),
            "kernel_size": 3,
            "down_kernel": 3,
            "up_kernel": 4,
            "stride_conv_keeps_width": False,
            "transpose_keeps_width": False,
            "bottleneck_channels": 0,
        },
    }

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_ints(name, "in_channels/out_channels", (self.in_channels, self.out_channels))
        check_positive_ints(name, "widths", tuple(self.widths))
        check_positive_ints(name, "kernel sizes", (self.kernel_size, self.down_kernel, self.up_kernel,
                                                    self.bottleneck_kernel))
        check_positive_ints(name, "convs_per_block", (self.convs_per_block,), allow_zero=True)
        check_positive_ints(name, "bottleneck_channels", (self.bottleneck_channels,), allow_zero=True)
        if self.kernel_size % 2 == 0:
            raise InputError(f"{name}: kernel_size must be odd (same-size convs), got {self.kernel_size}")
        if self.up_kernel % 2:
            raise InputError(f"{name}: up_kernel must be even so sizes double exactly, got {self.up_kernel}")
        check_choice(name, "norm", self.norm, _NORMS)
        check_choice(name, "encoder_activation", self.encoder_activation, _ACTS)
        check_choice(name, "decoder_activation", self.decoder_activation, _ACTS)


def _conv_unit(cin: int, cout: int, k: int, stride: int, pad: int, norm: str, act: str, slope: float,
               transposed: bool = False) -> nn.Sequential:
    conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = conv_cls(cin, cout, k, stride=stride, padding=pad, bias=norm != "batch")
    return nn.Sequential(conv, norm_layer(norm, cout), activation(act, slope))


class _Block(nn.Module):
    """A resolution step of the U-Net: a stride-2 conv (``down``) or transposed conv (up) that
    halves or doubles the size, then ``convs_per_block`` same-size convs."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, down: bool):
        super().__init__()
        act = cfg.encoder_activation if down else cfg.decoder_activation
        slope, norm = cfg.negative_slope, cfg.norm
        if down:
            mid = cin if cfg.stride_conv_keeps_width else cout
            layers = [_conv_unit(cin, mid, cfg.down_kernel, 2, (cfg.down_kernel - 1) // 2, norm, act, slope)]
        else:
            mid = cin if cfg.transpose_keeps_width else cout
            layers = [_conv_unit(cin, mid, cfg.up_kernel, 2, (cfg.up_kernel - 2) // 2, norm, act, slope,
                                 transposed=True)]
        for i in range(cfg.convs_per_block):
            layers.append(_conv_unit(mid if i == 0 else cout, cout, cfg.kernel_size, 1, cfg.kernel_size // 2,
                                     norm, act, slope))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class RM2SUNet(nn.Module):
    """U-Net generator of both RM2S stages: (N, in_channels, H, W) -> background (N, out_channels, H, W).

    H and W must be multiples of ``stride`` and at least ``min_size`` (wrap in ``PaddedModel``
    for any size).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = config
        self.config = cfg
        self.stride = 2 ** len(cfg.widths)
        self.min_size = self.stride * (cfg.bottleneck_kernel if cfg.bottleneck_channels else 1)

        widths = list(cfg.widths)
        ins = [cfg.in_channels] + widths[:-1]
        self.down = nn.ModuleList([_Block(cin, cout, cfg, down=True) for cin, cout in zip(ins, widths)])

        deepest = widths[-1]
        if cfg.bottleneck_channels:
            k, norm, act, slope = cfg.bottleneck_kernel, cfg.norm, cfg.encoder_activation, cfg.negative_slope
            self.bottleneck = nn.Sequential(
                _conv_unit(deepest, cfg.bottleneck_channels, k, 1, 0, norm, act, slope),
                _conv_unit(cfg.bottleneck_channels, deepest, k, 1, 0, norm, cfg.decoder_activation, slope,
                           transposed=True),
            )
        else:
            self.bottleneck = None

        # Up block j joins the level-j skip (deepest first) and outputs the width of the level above;
        # the last one outputs widths[0] at full resolution.
        outs = widths[-2::-1] + [widths[0]]
        skips = widths[::-1]
        ups: List[nn.Module] = []
        prev = deepest
        for j, (skip, cout) in enumerate(zip(skips, outs)):
            joins_skip = j > 0 or self.bottleneck is not None
            ups.append(_Block(prev + skip if joins_skip else prev, cout, cfg, down=False))
            prev = cout
        self.up = nn.ModuleList(ups)
        self.head = nn.Conv2d(widths[0], cfg.out_channels, cfg.kernel_size, padding=cfg.kernel_size // 2)
        if cfg.residual:
            if cfg.in_channels < cfg.out_channels:
                raise InputError("a residual U-Net needs at least as many input as output channels")
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def smallest_norm_map(self, height: int, width: int) -> Tuple[int, int]:
        """The smallest map a normalisation layer sees for an input of this size: the bottleneck's valid
        conv output (sides over the stride, less the kernel plus one), else the deepest down block's.
        Training's option checks refuse a batch whose BatchNorm would see one value per channel there."""
        height, width = height // self.stride, width // self.stride
        if self.bottleneck is not None:
            shrink = self.config.bottleneck_kernel - 1
            return height - shrink, width - shrink
        return height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "RM2SUNet", self.config.in_channels, self.stride, self.min_size)
        image = x[:, : self.config.out_channels]
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        if self.bottleneck is not None:
            x = torch.cat([self.bottleneck(x), x], dim=1)
        for j, block in enumerate(self.up):
            if j > 0:
                x = torch.cat([x, skips[-1 - j]], dim=1)
            x = block(x)
        if not self.config.residual:
            return torch.sigmoid(self.head(x))
        background = image - self.head(x)
        # Unclamped in training so that out-of-range pixels still get gradients.
        return background if self.training else background.clamp(0.0, 1.0)


@dataclass
class DiscriminatorConfig(ModelConfig):
    """RM2S stage-2 critic. Defaults are the "paper" preset.

    widths: the 4x4 stride-2 convs (each BatchNorm + LeakyReLU); then a ``final_kernel`` valid conv
    to one channel, averaged over space (one value for 256x256 inputs, a mean otherwise).
    """

    in_channels: int = 3
    widths: Tuple[int, ...] = (64, 128, 256, 512, 512, 512)
    kernel_size: int = 4
    final_kernel: int = 4
    norm: str = "batch"
    negative_slope: float = 0.2

    _PRESETS = {
        "paper": {},
        "lite": {"widths": (32, 64, 128, 256, 256)},
    }

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_ints(name, "in_channels", (self.in_channels,))
        check_positive_ints(name, "widths", tuple(self.widths))
        check_positive_ints(name, "kernel sizes", (self.kernel_size, self.final_kernel))
        if self.kernel_size < 2:
            raise InputError(f"{name}: kernel_size must be >= 2 for stride-2 convs, got {self.kernel_size}")
        check_choice(name, "norm", self.norm, _NORMS)


class Discriminator(nn.Module):
    """WGAN critic: (N, in_channels, H, W) -> (N,) raw scores (no sigmoid).

    Sides must be at least ``min_size`` (the final conv needs a ``final_kernel`` map); other
    sizes than 256 average the final score map.
    """

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        cfg = config
        self.config = cfg
        self.stride = 2 ** len(cfg.widths)
        self.min_size = self.stride * cfg.final_kernel
        layers: List[nn.Module] = []
        cin = cfg.in_channels
        pad = (cfg.kernel_size - 1) // 2
        for cout in cfg.widths:
            layers.append(_conv_unit(cin, cout, cfg.kernel_size, 2, pad, cfg.norm, "leaky_relu",
                                     cfg.negative_slope))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 1, cfg.final_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "Discriminator", self.config.in_channels, 1, self.min_size)
        return self.head(self.features(x)).mean(dim=(1, 2, 3))


@dataclass
class MobileUNetConfig(ModelConfig):
    """RM2S U-Net on an ImageNet mobile encoder (both stages of the shipped ``lite`` model).

    encoder: MobileNetV2 or EfficientNet-Lite0 (``models.ENCODERS``). decoder_widths: the decoder's
    five levels (strides 16, 8, 4, 2, 1; None: the encoder's, ``models.DECODER_WIDTHS``).
    max_log_gain: bound L of the per-image RGB gain (0: no gain head). fraction_bias: initial logit
    of the reflection fraction (sigmoid(-4) = 0.018: the untrained network is nearly the identity).
    """

    in_channels: int = 3
    decoder_widths: Optional[Tuple[int, ...]] = None
    max_log_gain: float = 1.0
    fraction_bias: float = -4.0
    encoder: str = DEFAULT_ENCODER

    _PRESETS = {"lite": {}}

    def __post_init__(self) -> None:
        name = type(self).__name__
        self.decoder_widths = lite_decoder_widths(name, self.encoder, self.decoder_widths)
        check_positive_ints(name, "in_channels", (self.in_channels,))
        check_positive_ints(name, "decoder_widths", tuple(self.decoder_widths))
        if self.in_channels % 3:
            raise InputError(f"{name}: in_channels must be 3 (stage 1) or 9 (stage 2), got {self.in_channels}")
        if len(tuple(self.decoder_widths)) != 5:
            raise InputError(f"{name}: decoder_widths needs 5 values, got {self.decoder_widths!r}")
        if not 0.0 <= float(self.max_log_gain) <= 3.0:
            raise InputError(f"{name}: max_log_gain must lie in [0, 3], got {self.max_log_gain}")


class RM2SMobileUNet(nn.Module):
    """(N, 3 or 9, H, W) -> background (N, 3, H, W): ImageNet encoder, U-Net decoder, bounded output.

    The first three input channels are the image I; the output is ``g * I * (1 - a)`` (see
    :class:`~dereflect.train.models.backbone.BoundedOutput`). H and W must be multiples of 32.
    """

    def __init__(self, config: MobileUNetConfig):
        super().__init__()
        from .backbone import BoundedOutput, UNetDecoder, make_encoder

        self.config = config
        self.stride = 32
        self.min_size = 32
        self.encoder = make_encoder(config.encoder, config.in_channels)
        self.decoder = UNetDecoder(self.encoder.widths, config.decoder_widths, config.in_channels)
        self.head = nn.Conv2d(self.decoder.out_channels, 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, config.fraction_bias)
        self.output = BoundedOutput(self.encoder.widths[-1], config.max_log_gain)

    def train(self, mode: bool = True) -> RM2SMobileUNet:
        from .backbone import freeze_batchnorm

        super().train(mode)
        freeze_batchnorm(self.encoder)  # ImageNet statistics: a few crops per batch cannot re-estimate them
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, "RM2SMobileUNet", self.config.in_channels, self.stride, self.min_size)
        taps = self.encoder(x)
        logits = self.head(self.decoder(x, taps))
        return self.output(x[:, :3], logits, taps[-1])

    def load_imagenet(self, state: Dict[str, torch.Tensor]) -> None:
        """ImageNet weights of the config's encoder (see ``MobileNetV2Encoder.load_imagenet``)."""
        self.encoder.load_imagenet(state)

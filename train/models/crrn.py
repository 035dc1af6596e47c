"""CRRN (Wan et al., CVPR 2018): gradient inference network (GiN) + image inference network (IiN).

Forward: image (N, 3, H, W) in [0, 1] -> tuple ``(background, reflection, gradient)``; a tuple, not
a dict, so ONNX export names three plain outputs. H and W must be multiples of 32 (wrap in
``PaddedModel`` for any size).

Choices where the paper is silent (it gives no widths or kernel sizes):

- GiN: input [I, gradient_magnitude(I)] (computed inside, see ``common.gradient_magnitude``).
  Five (3x3 stride-1 conv, 3x3 stride-2 conv) pairs, then five 4x4 stride-2 transposed convs; each
  transposed conv's output is concatenated with the stride-1 encoder feature at its resolution
  (mirror link) before the next one. Output: 3x3 conv + ReLU, the background gradient magnitude
  (non-negative; ReLU rather than softplus so flat regions can be exactly 0, as the target is).
- IiN: VGG-16 conv layers laid out exactly like torchvision's ``vgg16().features`` (``iin.vgg``,
  indices 0..30, stride 32; ImageNet mean/std input normalisation inside when
  ``imagenet_normalize``), the FC layers replaced by a 3x3 conv, feature extraction layers A/B
  after Inception-ResNet-v2 Reduction-A/B (parallel branches concatenated, the pooling branch
  replaced by a 1x1 then a 7x7 conv, all strides 1), then five transposed-conv layers. Each has
  three parallel sub-layers with their own weights and kernel sizes 2, 4 and 6 (all stride 2 with
  padding (k-2)/2, so sizes double exactly without output_padding), each followed by BatchNorm +
  ReLU, summed. After each, GiN's transposed-conv output at that resolution is concatenated.
  A 3x3 conv head predicts the residual r = I - B.
- B = I - r, clamped to [0, 1] in eval mode (and so in the export); training leaves it unclamped so
  out-of-range pixels still get gradients. R = I - B, as in the authors' follow-up code (CoRRN).

"lite" uses the same graph with VGG widths divided by 4 and narrow GiN/decoder widths (a few
million parameters); it cannot take the ImageNet VGG weights and is trained from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from dereflect.errors import InputError, ModelError
from torch import nn

from . import DEFAULT_ENCODER
from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GradientMagnitude,
    ModelConfig,
    check_choice,
    check_input,
    check_positive_ints,
    lite_decoder_widths,
    norm_layer,
)

#: Convs per VGG-16 block; with a max-pool after each block this gives torchvision's indices.
VGG16_LAYOUT = (2, 2, 3, 3, 3)


@dataclass
class CRRNConfig(ModelConfig):
    """CRRN widths. Defaults are the "paper" preset (full VGG-16 widths, so ImageNet weights load).

    gin_widths: GiN encoder widths per level (full resolution first); its transposed convs mirror them.
    vgg_widths: the five VGG-16 blocks. fc_channels: the 3x3 conv replacing the FC layers.
    feat_width: branch width c of feature layers A (out 3c) and B (out 4c).
    iin_widths: IiN's five transposed-conv layers, deepest first. up_kernels: their three sub-layers.
    """

    gin_widths: Tuple[int, ...] = (64, 128, 256, 256, 256)
    vgg_widths: Tuple[int, ...] = (64, 128, 256, 512, 512)
    fc_channels: int = 512
    feat_width: int = 128
    iin_widths: Tuple[int, ...] = (256, 128, 64, 32, 32)
    up_kernels: Tuple[int, ...] = (2, 4, 6)
    gin_up_kernel: int = 4
    norm: str = "batch"
    imagenet_normalize: bool = True

    _PRESETS = {
        "paper": {},
        "lite": {
            "gin_widths": (16, 32, 64, 64, 64),
            "vgg_widths": (16, 32, 64, 128, 128),
            "fc_channels": 128,
            "feat_width": 48,
            "iin_widths": (64, 32, 16, 16, 16),
            "imagenet_normalize": False,
        },
    }

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("gin_widths", "vgg_widths", "iin_widths"):
            values = tuple(getattr(self, key))
            check_positive_ints(name, key, values)
            if len(values) != 5:
                raise InputError(f"{name}: {key} needs 5 values (one per stride-2 level), got {values!r}")
        check_positive_ints(name, "fc_channels/feat_width", (self.fc_channels, self.feat_width))
        if self.feat_width < 2:
            raise InputError(f"{name}: feat_width must be >= 2 (branches use feat_width // 2), got "
                             f"{self.feat_width}")
        check_positive_ints(name, "up_kernels", tuple(self.up_kernels) + (self.gin_up_kernel,))
        if any(k % 2 for k in tuple(self.up_kernels) + (self.gin_up_kernel,)):
            raise InputError(f"{name}: transposed-conv kernels must be even so sizes double exactly, got "
                             f"{self.up_kernels!r} and gin_up_kernel={self.gin_up_kernel}")
        check_choice(name, "norm", self.norm, ("batch", "none"))


def _unit(cin: int, cout: int, k: int, norm: str, stride: int = 1) -> nn.Sequential:
    """Conv (same padding) + norm + ReLU."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=norm != "batch")
    return nn.Sequential(conv, norm_layer(norm, cout), nn.ReLU())


def _up_unit(cin: int, cout: int, k: int, norm: str) -> nn.Sequential:
    """Stride-2 transposed conv that exactly doubles H and W + norm + ReLU."""
    conv = nn.ConvTranspose2d(cin, cout, k, stride=2, padding=(k - 2) // 2, bias=norm != "batch")
    return nn.Sequential(conv, norm_layer(norm, cout), nn.ReLU())


class GiN(nn.Module):
    """Gradient inference network: image -> (background gradient (N, 1, H, W), decoder features).

    The decoder features are the five transposed-conv outputs, deepest (H/16) first, which IiN
    concatenates into its own decoder.
    """

    def __init__(self, config: CRRNConfig):
        super().__init__()
        w = list(config.gin_widths)
        norm = config.norm
        self.grad = GradientMagnitude(3)
        ins = [4] + w[:-1]
        self.enc_same = nn.ModuleList([_unit(cin, c, 3, norm) for cin, c in zip(ins, w)])
        self.enc_down = nn.ModuleList([_unit(c, c, 3, norm, stride=2) for c in w])
        ups = []
        prev = w[-1]
        for level in reversed(range(5)):
            ups.append(_up_unit(prev, w[level], config.gin_up_kernel, norm))
            prev = w[level] + w[level]
        self.dec = nn.ModuleList(ups)
        self.head = nn.Sequential(nn.Conv2d(prev, 1, 3, padding=1), nn.ReLU())
        #: Widths of the decoder features, deepest first.
        self.feature_widths = list(reversed(w))

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        x = torch.cat([image, self.grad(image)], dim=1)
        skips = []
        for same, down in zip(self.enc_same, self.enc_down):
            x = same(x)
            skips.append(x)
            x = down(x)
        features = []
        for i, up in enumerate(self.dec):
            u = up(x)
            features.append(u)
            x = torch.cat([u, skips[-1 - i]], dim=1)
        return self.head(x), features


def make_vgg16_features(widths: Tuple[int, ...] = (64, 128, 256, 512, 512)) -> nn.Sequential:
    """VGG-16 conv part with torchvision's indices (convs at 0, 2, 5, 7, 10, ..., pools at 4, 9, ...)."""
    layers: List[nn.Module] = []
    cin = 3
    for n_convs, width in zip(VGG16_LAYOUT, widths):
        for _ in range(n_convs):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
            cin = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class FeatureA(nn.Module):
    """Reduction-A with stride 1: [3x3] | [1x1, 3x3, 3x3] | [1x1, 7x7] (was max-pool), concatenated (3c)."""

    def __init__(self, cin: int, c: int, norm: str):
        super().__init__()
        h = c // 2
        self.b0 = _unit(cin, c, 3, norm)
        self.b1 = nn.Sequential(_unit(cin, h, 1, norm), _unit(h, h, 3, norm), _unit(h, c, 3, norm))
        self.b2 = nn.Sequential(_unit(cin, h, 1, norm), _unit(h, c, 7, norm))
        self.out_channels = 3 * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1(x), self.b2(x)], dim=1)


class FeatureB(nn.Module):
    """Reduction-B with stride 1: [1x1, 3x3] x2 | [1x1, 3x3, 3x3] | [1x1, 7x7] (was max-pool) (4c)."""

    def __init__(self, cin: int, c: int, norm: str):
        super().__init__()
        h = c // 2
        self.b0 = nn.Sequential(_unit(cin, h, 1, norm), _unit(h, c, 3, norm))
        self.b1 = nn.Sequential(_unit(cin, h, 1, norm), _unit(h, c, 3, norm))
        self.b2 = nn.Sequential(_unit(cin, h, 1, norm), _unit(h, h, 3, norm), _unit(h, c, 3, norm))
        self.b3 = nn.Sequential(_unit(cin, h, 1, norm), _unit(h, c, 7, norm))
        self.out_channels = 4 * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)


class TripleUp(nn.Module):
    """Transposed-conv layer of three parallel sub-layers (own weights, kernels ``kernels``), summed."""

    def __init__(self, cin: int, cout: int, kernels: Tuple[int, ...], norm: str):
        super().__init__()
        self.branches = nn.ModuleList([_up_unit(cin, cout, k, norm) for k in kernels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


@dataclass
class VGGLoadReport:
    """What :meth:`IiN.load_vgg16_features` did: keys as given in the state dict."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)


class IiN(nn.Module):
    """Image inference network: (image, GiN decoder features) -> residual r = I - B (N, 3, H, W)."""

    def __init__(self, config: CRRNConfig, gin_feature_widths: List[int]):
        super().__init__()
        norm = config.norm
        self.config = config
        self.imagenet_normalize = config.imagenet_normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.vgg = make_vgg16_features(tuple(config.vgg_widths))
        self.fc = _unit(config.vgg_widths[-1], config.fc_channels, 3, norm)
        self.feat_a = FeatureA(config.fc_channels, config.feat_width, norm)
        self.feat_b = FeatureB(self.feat_a.out_channels, config.feat_width, norm)
        ups = []
        prev = self.feat_b.out_channels
        for width, gin_width in zip(config.iin_widths, gin_feature_widths):
            ups.append(TripleUp(prev, width, tuple(config.up_kernels), norm))
            prev = width + gin_width
        self.dec = nn.ModuleList(ups)
        self.head = nn.Conv2d(prev, 3, 3, padding=1)

    def forward(self, image: torch.Tensor, gin_features: List[torch.Tensor]) -> torch.Tensor:
        x = (image - self.mean) / self.std if self.imagenet_normalize else image
        x = self.feat_b(self.feat_a(self.fc(self.vgg(x))))
        for up, g in zip(self.dec, gin_features):
            x = torch.cat([up(x), g], dim=1)
        return self.head(x)

    def load_vgg16_features(self, state_dict: Mapping[str, Any], strict: bool = True) -> VGGLoadReport:
        """Copy VGG-16 conv weights in torchvision layout into ``self.vgg``.

        Keys may be ``features.N.weight`` / ``features.N.bias`` (a full torchvision ``vgg16`` state
        dict; ``classifier.*`` and other non-feature keys are ignored), ``N.weight`` (a
        ``features`` state dict), optionally prefixed ``module.``. Shape mismatches always raise
        ModelError; with ``strict`` missing or unexpected feature keys do too. Nothing is copied
        unless every check passes. The weights must expect torchvision's input convention (RGB
        in [0, 1], ImageNet mean/std, as ``imagenet_normalize`` applies).
        """
        expected = {}
        for idx, module in enumerate(self.vgg):
            if isinstance(module, nn.Conv2d):
                expected[f"{idx}.weight"] = module.weight
                expected[f"{idx}.bias"] = module.bias
        report = VGGLoadReport()
        given = {}
        for key, value in state_dict.items():
            local = key[len("module."):] if key.startswith("module.") else key
            if local.startswith("features."):
                local = local[len("features."):]
            elif not local[:1].isdigit():
                report.ignored.append(key)
                continue
            if local in expected:
                given[local] = (key, value)
            else:
                report.unexpected.append(key)
        report.missing = [f"features.{k}" for k in expected if k not in given]

        mismatched = []
        for local, (key, value) in given.items():
            shape = tuple(getattr(value, "shape", ()))
            if shape != tuple(expected[local].shape):
                mismatched.append(f"{key}: expected {tuple(expected[local].shape)}, got {shape}")
        if mismatched:
            raise ModelError(
                f"VGG-16 weights do not fit this IiN (vgg_widths={tuple(self.config.vgg_widths)}); "
                f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:6])
                + ("; ..." if len(mismatched) > 6 else "")
                + ". Only the full-width ('paper') config takes pretrained VGG-16; train 'lite' from scratch"
            )
        if strict and (report.missing or report.unexpected):
            hint = ""
            if any(k.endswith("running_mean") for k in report.unexpected):
                hint = " (this looks like a vgg16_bn state dict; IiN uses plain VGG-16 indices)"
            raise ModelError(
                f"VGG-16 weights incomplete or of another layout{hint}: missing {report.missing[:6]}"
                f"{' ...' if len(report.missing) > 6 else ''}, unexpected {report.unexpected[:6]}"
                f"{' ...' if len(report.unexpected) > 6 else ''}. Pass strict=False to load what matches"
            )
        with torch.no_grad():
            for local, (key, value) in given.items():
                param = expected[local]
                param.copy_(torch.as_tensor(value).to(dtype=param.dtype, device=param.device))
                report.loaded.append(key)
        return report


class CRRN(nn.Module):
    """Concurrent reflection removal network: image -> (background, reflection, background gradient)."""

    def __init__(self, config: CRRNConfig):
        super().__init__()
        self.config = config
        self.stride = 32
        self.min_size = 32
        self.gin = GiN(config)
        self.iin = IiN(config, self.gin.feature_widths)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_input(image, "CRRN", 3, self.stride, self.min_size)
        gradient, features = self.gin(image)
        background = image - self.iin(image, features)
        if not self.training:
            background = torch.clamp(background, 0.0, 1.0)
        return background, image - background, gradient

    def load_vgg16_features(self, state_dict: Mapping[str, Any], strict: bool = True) -> VGGLoadReport:
        """See :meth:`IiN.load_vgg16_features`."""
        return self.iin.load_vgg16_features(state_dict, strict=strict)


@dataclass
class MobileCRRNConfig(ModelConfig):
    """CRRN with an ImageNet mobile encoder in IiN (the shipped ``lite`` model).

    The paper builds IiN on an ImageNet VGG-16; here the encoder is MobileNetV2 (``encoder``; or
    EfficientNet-Lite0, ``models.ENCODERS``) and IiN's decoder is a U-Net decoder
    (``decoder_widths``, strides 16 to 1; None: the encoder's, ``models.DECODER_WIDTHS``) that takes
    GiN's five decoder features at the matching resolutions, as the paper concatenates them. GiN is
    the paper's (``gin_widths``).
    The output is bounded as in RM2S's lite U-Net (``backbone.BoundedOutput``).
    """

    gin_widths: Tuple[int, ...] = (8, 8, 16, 16, 32)
    gin_up_kernel: int = 4
    decoder_widths: Optional[Tuple[int, ...]] = None
    max_log_gain: float = 1.0
    fraction_bias: float = -4.0
    encoder: str = DEFAULT_ENCODER
    norm: str = "batch"

    _PRESETS = {"lite": {}}

    def __post_init__(self) -> None:
        name = type(self).__name__
        self.decoder_widths = lite_decoder_widths(name, self.encoder, self.decoder_widths)
        for key in ("gin_widths", "decoder_widths"):
            values = tuple(getattr(self, key))
            check_positive_ints(name, key, values)
            if len(values) != 5:
                raise InputError(f"{name}: {key} needs 5 values (one per level), got {values!r}")
        if self.gin_up_kernel % 2:
            raise InputError(f"{name}: gin_up_kernel must be even, got {self.gin_up_kernel}")
        check_choice(name, "norm", self.norm, ("batch", "none"))
        if not 0.0 <= float(self.max_log_gain) <= 3.0:
            raise InputError(f"{name}: max_log_gain must lie in [0, 3], got {self.max_log_gain}")


class MobileCRRN(nn.Module):
    """image -> (background, reflection, background gradient), IiN on an ImageNet mobile encoder.

    Same contract as :class:`CRRN`: H and W multiples of 32, R = I - B, B clamped in eval mode.
    """

    def __init__(self, config: MobileCRRNConfig):
        super().__init__()
        from .backbone import BoundedOutput, UNetDecoder, make_encoder

        self.config = config
        self.stride = 32
        self.min_size = 32
        self.gin = GiN(config)
        self.encoder = make_encoder(config.encoder, 3)
        self.decoder = UNetDecoder(self.encoder.widths, config.decoder_widths, 3,
                                   extra_widths=self.gin.feature_widths)
        self.head = nn.Conv2d(self.decoder.out_channels, 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, config.fraction_bias)
        self.output = BoundedOutput(self.encoder.widths[-1], config.max_log_gain)

    def train(self, mode: bool = True) -> MobileCRRN:
        from .backbone import freeze_batchnorm

        super().train(mode)
        freeze_batchnorm(self.encoder)
        return self

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_input(image, "MobileCRRN", 3, self.stride, self.min_size)
        gradient, features = self.gin(image)
        taps = self.encoder(image)
        logits = self.head(self.decoder(image, taps, features))
        background = self.output(image, logits, taps[-1])
        return background, image - background, gradient

    def load_imagenet(self, state: Dict[str, torch.Tensor]) -> None:
        """ImageNet weights of the config's encoder into IiN's encoder."""
        self.encoder.load_imagenet(state)

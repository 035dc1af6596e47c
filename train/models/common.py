"""Pieces shared by the model families: config base class, size padding, fixed-weight gradients.

Everything here traces into ONNX opset 17 with dynamic height and width
(``torch.onnx.export(..., dynamo=False)``) and uses only ops TensorRT's ONNX parser takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

import torch
import torch.nn.functional as F
from dereflect.errors import InputError
from dereflect.middle_step.reference import LUMA
from torch import nn

from . import DECODER_WIDTHS, ENCODERS

#: ImageNet's per-channel mean and standard deviation of RGB in [0, 1] (torchvision's encoders' input).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



ConfigT = TypeVar("ConfigT", bound="ModelConfig")


class ModelConfig:
    """Mixin for the model config dataclasses: dict round trip and named presets.

    Subclasses are dataclasses whose defaults are the "paper" preset and which define
    ``_PRESETS`` (name -> overrides of the defaults) as a plain class attribute.
    """

    _PRESETS: Dict[str, Dict[str, Any]] = {}

    def to_dict(self) -> Dict[str, Any]:
        """All fields as JSON-friendly values (tuples become lists)."""
        out: Dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls: Type[ConfigT], d: Mapping[str, Any]) -> ConfigT:
        """Build from a dict such as :meth:`to_dict` wrote; missing keys take the defaults."""
        if not isinstance(d, Mapping):
            raise InputError(f"{cls.__name__}.from_dict needs a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise InputError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {names}. "
                "Remove or rename them (was the config written for another architecture?)"
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)

    @classmethod
    def preset(cls: Type[ConfigT], name: str, **overrides: Any) -> ConfigT:
        """A named preset ("paper" or "lite"), optionally with some fields overridden."""
        if name not in cls._PRESETS:
            raise InputError(f"{cls.__name__}: unknown preset {name!r}; choose one of {sorted(cls._PRESETS)}")
        values = dict(cls._PRESETS[name])
        values.update(overrides)
        return cls.from_dict(values)


def tapped_outputs(blocks: nn.Sequential, x: torch.Tensor, taps: Tuple[int, ...]) -> List[torch.Tensor]:
    """``x`` through ``blocks`` in turn; the outputs of the blocks at the indices ``taps`` (an encoder's features)."""
    outputs = []
    for index, block in enumerate(blocks):
        x = block(x)
        if index in taps:
            outputs.append(x)
    return outputs


def check_choice(owner: str, name: str, value: Any, choices: Tuple[Any, ...]) -> None:
    """Raise InputError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InputError(f"{owner}: {name}={value!r} is not one of {list(choices)}")


def lite_decoder_widths(owner: str, encoder: str, decoder_widths: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    """A lite config's decoder widths: ``decoder_widths`` as given, or ``encoder``'s own (checked) when None."""
    check_choice(owner, "encoder", encoder, ENCODERS)
    return DECODER_WIDTHS[encoder] if decoder_widths is None else decoder_widths


def check_positive_ints(owner: str, name: str, values: Tuple[Any, ...], allow_zero: bool = False) -> None:
    """Raise InputError unless every value is an int > 0 (or >= 0)."""
    low = 0 if allow_zero else 1
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < low for v in values):
        raise InputError(f"{owner}: {name} must be {'non-negative' if allow_zero else 'positive'} integers, "
                         f"got {values!r}")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm (folds into the conv at export) or nothing."""
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.Identity()


def activation(name: str, negative_slope: float = 0.2) -> nn.Module:
    """ReLU or LeakyReLU: both map to single ONNX/TensorRT activation layers."""
    if name == "relu":
        return nn.ReLU()
    return nn.LeakyReLU(negative_slope)


def check_input(x: torch.Tensor, owner: str, channels: int, stride: int, min_size: int) -> None:
    """Raise InputError for a tensor the bare network cannot take.

    Skipped while tracing for export: there the sizes are symbolic and PaddedModel guarantees them.
    """
    if torch.jit.is_tracing():
        return
    if x.dim() != 4 or x.shape[1] != channels:
        raise InputError(f"{owner} expects an (N, {channels}, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % stride or w % stride or h < min_size or w < min_size:
        raise InputError(
            f"{owner} needs H and W that are multiples of {stride} and at least {min_size}, got {h}x{w}. "
            "Wrap the network in dereflect.train.models.common.PaddedModel to take any size"
        )


def _round_up(size: Any, multiple: int, min_size: int) -> Any:
    """ceil(size / multiple) * multiple, at least ``min_size``; ints eagerly, traced tensors when exporting.

    Written with floor division only (no Mod, which TensorRT 8.4's parser lacks) and Max, not Clip
    (TensorRT's Clip does not take integer shape tensors).
    """
    target = (size + multiple - 1) // multiple * multiple
    if isinstance(target, torch.Tensor):
        return torch.maximum(target, torch.tensor(min_size, dtype=target.dtype))
    return max(target, min_size)


def pad_to_multiple(
    x: torch.Tensor, multiple: int, min_size: int = 0
) -> Tuple[torch.Tensor, Tuple[Any, Any]]:
    """Edge-pad ``x`` (N, C, H, W) at the bottom/right to multiples of ``multiple``, at least ``min_size``.

    Returns the padded tensor and the original (h, w), to hand to :func:`crop_to`. While tracing for
    ONNX export the pad amounts are computed from the input's shape in the graph (Shape, Div, Mul,
    Max, Pad mode=edge), so the exported model accepts any H and W.
    """
    if multiple < 1:
        raise InputError(f"pad_to_multiple: multiple must be >= 1, got {multiple}")
    h, w = x.shape[-2], x.shape[-1]
    target_h = _round_up(h, multiple, min_size)
    target_w = _round_up(w, multiple, min_size)
    padded = F.pad(x, (0, target_w - w, 0, target_h - h), mode="replicate")
    return padded, (h, w)


def crop_to(x: torch.Tensor, h: Any, w: Any) -> torch.Tensor:
    """The top-left ``h`` x ``w`` of ``x`` (a Slice with dynamic ends when traced)."""
    return x[..., :h, :w]


def _crop_outputs(out: Any, h: Any, w: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return crop_to(out, h, w) if out.dim() == 4 else out
    if isinstance(out, tuple):
        return tuple(_crop_outputs(o, h, w) for o in out)
    if isinstance(out, list):
        return [_crop_outputs(o, h, w) for o in out]
    if isinstance(out, dict):
        return {k: _crop_outputs(v, h, w) for k, v in out.items()}
    return out


class PaddedModel(nn.Module):
    """Runs ``net`` on any H x W: edge-pads to the net's ``stride`` / ``min_size``, crops outputs back.

    Every 4-D tensor in the output (a tensor, or tuple/list/dict of them) is cropped to the input's
    size; other outputs pass through. ``multiple`` and ``min_size`` default to ``net.stride`` and
    ``net.min_size``. The wrapper itself takes any size: its ``stride`` and ``min_size`` are 1.
    """

    def __init__(self, net: nn.Module, multiple: Optional[int] = None, min_size: Optional[int] = None):
        super().__init__()
        self.net = net
        self.multiple = int(multiple if multiple is not None else getattr(net, "stride", 1))
        self.pad_min_size = int(min_size if min_size is not None else getattr(net, "min_size", 0))
        self.stride = 1
        self.min_size = 1

    def forward(self, x: torch.Tensor) -> Any:
        padded, (h, w) = pad_to_multiple(x, self.multiple, self.pad_min_size)
        return _crop_outputs(self.net(padded), h, w)


def _sobel_weight(channels: int) -> torch.Tensor:
    """(2, channels, 3, 3) weights: grey conversion and Sobel x/y folded into one conv.

    Grey is luma for 3 channels and the channel itself for 1. The Sobel kernels are divided by 8
    so that each response is the derivative per pixel (a unit ramp gives 1).
    """
    # Made on the CPU even under a meta-device context (checkpoint validation builds networks there):
    # arithmetic on meta tensors imports torch._dynamo, over a second on the first load.
    cpu = torch.device("cpu")
    if channels == 3:
        grey = torch.tensor(LUMA, dtype=torch.float32, device=cpu)
    elif channels == 1:
        grey = torch.ones(1, device=cpu)
    else:
        raise InputError(f"gradient_magnitude takes 1 (grey) or 3 (RGB) channels, got {channels}")
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=cpu) / 8.0
    kernels = torch.stack([sobel_x, sobel_x.t()])
    return kernels[:, None, :, :] * grey[None, :, None, None]


def _gradient_magnitude(img: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Edge padding, not zeros: a flat image must have zero gradient at its border too.
    g = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), weight)
    gx, gy = g[:, 0:1], g[:, 1:2]
    # eps keeps the backward pass finite where the gradient is exactly zero.
    return torch.sqrt(gx * gx + gy * gy + eps)


def gradient_magnitude(img: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Gradient magnitude (N, 1, H, W) of the grey version of ``img`` (N, 3 or 1, H, W).

    Grey = luma (0.2125, 0.7154, 0.0721); derivatives = 3x3 Sobel / 8 with edge padding;
    magnitude = sqrt(gx^2 + gy^2 + eps). For images in [0, 1] values lie in [0, sqrt(2)].
    One conv with fixed weights (grey and Sobel folded together), so it exports as Pad + Conv.
    """
    weight = _sobel_weight(int(img.shape[1])).to(device=img.device, dtype=img.dtype)
    return _gradient_magnitude(img, weight, eps)


class GradientMagnitude(nn.Module):
    """:func:`gradient_magnitude` as a module with its weights in a (non-persistent) buffer."""

    def __init__(self, channels: int = 3, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", _sobel_weight(channels), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return _gradient_magnitude(img, self.weight, self.eps)

"""Network architectures, one module per family (``rm2s``, ``crrn``), built from config dataclasses.

Importing this package does not import torch: ``build_model`` and ``config_class`` load the
family modules on first use. Weights are handled elsewhere (checkpoints, export).

    net = build_model("rm2s_unet", UNetConfig.preset("lite", in_channels=9).to_dict())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from dereflect.errors import InputError

if TYPE_CHECKING:
    from torch import nn

#: arch name -> (module, config class, model class)
_ARCHS: Dict[str, Tuple[str, str, str]] = {
    "rm2s_unet": ("rm2s", "UNetConfig", "RM2SUNet"),
    "rm2s_mobile_unet": ("rm2s", "MobileUNetConfig", "RM2SMobileUNet"),
    "rm2s_discriminator": ("rm2s", "DiscriminatorConfig", "Discriminator"),
    "crrn": ("crrn", "CRRNConfig", "CRRN"),
    "crrn_mobile": ("crrn", "MobileCRRNConfig", "MobileCRRN"),
}
ARCHS = tuple(_ARCHS)

#: The ImageNet encoders a lite network can be built on (its config's ``encoder``; ``backbone.make_encoder``).
ENCODERS = ("mobilenetv2", "efficientnet-lite0")
#: The encoder of a lite network unless told otherwise (the shipped models').
DEFAULT_ENCODER = ENCODERS[0]
#: The lite networks' decoder widths (strides 16 to 1) with each encoder, the default of their
#: configs' ``decoder_widths``: EfficientNet-Lite0 costs more than MobileNetV2, so its two
#: full-resolution levels are narrower, keeping the lite CRRN at 44.1 GFLOP per megapixel against
#: 43.9 with MobileNetV2 (``dereflect.tools.flops``).
DECODER_WIDTHS = {"mobilenetv2": (96, 64, 32, 24, 16), "efficientnet-lite0": (96, 64, 32, 20, 14)}

__all__ = ["ARCHS", "DECODER_WIDTHS", "DEFAULT_ENCODER", "ENCODERS", "build_model", "config_class",
           "encoder_of"]


def _lookup(arch: str) -> Tuple[Any, Any]:
    if arch not in _ARCHS:
        raise InputError(f"unknown architecture {arch!r}; choose one of {list(ARCHS)}")
    module_name, config_name, model_name = _ARCHS[arch]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, config_name), getattr(module, model_name)


def config_class(arch: str) -> Any:
    """The config dataclass of ``arch``."""
    return _lookup(arch)[0]


def encoder_of(spec: Mapping[str, Any]) -> Optional[str]:
    """The ImageNet encoder of a recorded network (``{"arch", "config"}``); None for a network without one."""
    return getattr(config_class(spec["arch"]).from_dict(spec["config"]), "encoder", None)


def build_model(arch: str, config: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Build ``arch`` from a config dict (``to_dict()`` output; missing keys take the paper defaults).

    A config instance of the right class is accepted as well; None means the paper preset.
    """
    config_cls, model_cls = _lookup(arch)
    if config is None:
        cfg = config_cls()
    elif isinstance(config, config_cls):
        cfg = config
    else:
        cfg = config_cls.from_dict(config)
    return model_cls(cfg)


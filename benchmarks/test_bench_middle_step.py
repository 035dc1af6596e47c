"""The middle step on the CPU by size: the runtime's OpenCV path (exact and histogram 2-means)
and the NumPy reference it is tested against."""

from __future__ import annotations

import cv2
import pytest
from dereflect.middle_step.cpu import middle_step_cpu
from dereflect.middle_step.reference import middle_step_reference
from dereflect.tools.bench import synthetic_frame


@pytest.fixture
def pair(size):
    image = synthetic_frame(*size)
    # A plausible stage-1 output: smoother than the input, as a background estimate is.
    return image, cv2.GaussianBlur(image, (0, 0), 2.0)


@pytest.mark.parametrize("threshold", ["exact", "histogram"])
def test_middle_step_cpu(benchmark, pair, threshold):
    image, stage1 = pair
    result = benchmark(middle_step_cpu, image, stage1, 0.5, 0.5, threshold)
    assert result.stage2_input.shape == image.shape[:2] + (9,)
    assert result.mask_reflection.any() and result.mask_background.any()


def test_middle_step_reference(benchmark, pair):
    image, stage1 = pair
    result = benchmark.pedantic(middle_step_reference, (image, stage1), rounds=2, iterations=1)
    assert result.stage2_input.shape == image.shape[:2] + (9,)

"""ONNX Runtime (CPU) latency by size: each lite U-Net alone and the whole staged RM2S frame.

The model is a lite U-Net pair with random weights exported on the fly (random_export.py);
latency does not depend on the weights. Skipped without torch (the ``train`` extra).
"""

from __future__ import annotations

import numpy as np
import pytest
from dereflect.tools.bench import BenchPipeline, synthetic_frame

pytest.importorskip("torch", reason="exporting the lite U-Net needs torch (pip install 'dereflect[train]')")
from random_export import make_random_export  # noqa: E402


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    pipeline = BenchPipeline(make_random_export(tmp_path_factory.mktemp("lite"), "lite"), device="cpu")
    yield pipeline
    pipeline.close()


@pytest.mark.parametrize("network,channels", [("stage1", 3), ("stage2", 9)])
def test_network(benchmark, lite, size, network, channels):
    runner = lite.remover._backend.runners[network]
    feed = {lite.manifest.networks[network].inputs[0].name:
            np.random.default_rng(0).random((1, channels) + size, dtype=np.float32)}
    out = benchmark(runner.infer, feed)
    assert out["background"].shape == (1, 3) + size


def test_rm2s_frame(benchmark, lite, size):
    image = synthetic_frame(*size)
    layers = benchmark(lambda: lite.run(image, lite.timer()))
    assert layers.background.shape == image.shape and np.isfinite(layers.background).all()

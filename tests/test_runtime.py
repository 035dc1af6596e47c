"""The runtime pipeline on tiny hand-made ONNX models (no torch needed): Remover, backends, CLI.

Toy networks: stage 1 squares its input (so the middle step sees varied edges), stage 2 is a
1x1 convolution 0.5 I + 0.25 I*mask_B + 0.25 I*mask_R (so the output checks the middle step),
and "CRRN" outputs 0.7 I, 0.3 I and the channel mean (pixelwise, so large-image strategies
have an exact answer).
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import cv2
import dereflect.cli
import dereflect.manifest
import numpy as np
import pytest
from conftest import SHARED_DATA, Terminal, tiny_rm2s_networks
from dereflect import Remover
from dereflect.backends.base import Runner, backend_name
from dereflect.backends.onnxruntime import OnnxRuntimeRunner
from dereflect.errors import InputError, MissingDependencyError, ModelError
from dereflect.middle_step.reference import middle_step_reference
from dereflect.remover import _ramp, fit_size, guided_coefficients, guided_upsample_rows, tile_starts
from onnx_fixtures import make_crrn_export, make_rm2s_export

REAL_PHOTOS = SHARED_DATA / "natural" / "bsds500"


@pytest.fixture(scope="module")
def rm2s_dir(tmp_path_factory):
    return make_rm2s_export(tmp_path_factory.mktemp("rm2s"))


@pytest.fixture(scope="module")
def crrn_dir(tmp_path_factory):
    return make_crrn_export(tmp_path_factory.mktemp("crrn"))


@pytest.fixture(scope="module")
def remover(rm2s_dir):
    return Remover.load(rm2s_dir)


def _photo(h=40, w=56, seed=0):
    """Smooth shapes plus noise: real edges for the middle step, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(xx / 5.0 + seed)[:, :, None] * np.cos(yy / 7.0)[:, :, None]
    base = base + 0.25 * (((xx // 9 + yy // 11) % 2)[:, :, None] - 0.5)
    return np.clip(base + 0.05 * rng.random((h, w, 3)), 0, 1).astype(np.float32)


def _expected(image):
    ref = middle_step_reference(image, image * image)
    return 0.5 * image + 0.25 * ref.stage2_input[..., 3:6] + 0.25 * ref.stage2_input[..., 6:9], ref


# -- Remover on RM2S ----------------------------------------------------------------------

def test_remove_float_matches_reference(remover):
    image = _photo()
    expected, ref = _expected(image)
    assert ref.mask_background.any() and ref.mask_reflection.any()
    out = remover.remove(image, colour_order="RGB")
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_remove_uint8_and_bgr(remover):
    image8 = (_photo(seed=1) * 255).round().astype(np.uint8)
    out = remover.remove(image8, colour_order="RGB")
    assert out.dtype == np.uint8 and out.shape == image8.shape
    expected, _ = _expected(image8.astype(np.float32) / 255)
    assert np.abs(out.astype(np.float32) - expected * 255).max() <= 1.0
    out_bgr = remover.remove(image8[:, :, ::-1].copy(), colour_order="BGR")
    np.testing.assert_array_equal(out_bgr, out[:, :, ::-1])


def test_default_colour_order_is_opencvs_bgr(remover, tmp_path):
    # The common call: a frame as OpenCV reads it, no colour_order. The toy middle step is not
    # symmetric in the channels, so reading it as RGB would give a different result.
    path = tmp_path / "frame.png"
    assert cv2.imwrite(str(path), (_photo(seed=1)[:, :, ::-1] * 255).round().astype(np.uint8))
    frame = cv2.imread(str(path))
    rgb = frame[:, :, ::-1].copy()
    want_bgr = remover.remove(rgb, colour_order="RGB")[:, :, ::-1]
    np.testing.assert_array_equal(remover.remove(frame), want_bgr)
    assert not np.array_equal(remover.remove(frame, colour_order="RGB"), want_bgr)
    result = remover.remove_with_intermediates(frame)
    np.testing.assert_array_equal(result.background, want_bgr)
    np.testing.assert_allclose(result.stage1, ((rgb.astype(np.float32) / 255) ** 2)[:, :, ::-1], atol=1e-6)
    np.testing.assert_array_equal(remover.remove_batch([frame, frame])[1], want_bgr)
    import dereflect

    assert "Remover" in dir(dereflect)


def test_remove_keeps_grey_rgba_and_16_bit(remover):
    image = _photo(seed=2)
    grey = (image[:, :, 1] * 255).astype(np.uint8)
    assert remover.remove(grey).shape == grey.shape
    rgba = np.dstack([(image * 255).astype(np.uint8), np.full(image.shape[:2], 77, np.uint8)])
    out = remover.remove(rgba)
    assert out.shape == rgba.shape and (out[:, :, 3] == 77).all()
    deep = (image * 65535).astype(np.uint16)
    assert remover.remove(deep).dtype == np.uint16


def test_intermediates_match_reference(remover):
    image = _photo(seed=3)
    expected, ref = _expected(image)
    result = remover.remove_with_intermediates(image, colour_order="RGB")
    np.testing.assert_allclose(result.stage1, image * image, atol=1e-6)
    np.testing.assert_allclose(result.confidence, ref.confidence, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(result.mask_background, ref.mask_background)
    np.testing.assert_array_equal(result.mask_reflection, ref.mask_reflection)
    np.testing.assert_allclose(result.thresholds, (ref.low, ref.high), rtol=1e-5)
    np.testing.assert_allclose(result.background, expected, atol=1e-5)
    np.testing.assert_allclose(result.reflection, image - result.background, atol=1e-6)
    assert result.scale == 1.0 and result.tiles == 1


def test_batch_list_and_array(remover):
    images = [_photo(seed=s) for s in range(3)] + [_photo(24, 30, seed=9)]
    outs = remover.remove_batch(images)
    assert [o.shape for o in outs] == [i.shape for i in images]
    np.testing.assert_allclose(outs[1], remover.remove(images[1]))
    stacked = remover.remove_batch(np.stack(images[:3]))
    assert isinstance(stacked, np.ndarray) and stacked.shape == (3, 40, 56, 3)
    with pytest.raises(InputError, match="NxHxWxC"):
        remover.remove_batch(np.zeros((4, 4, 3), np.float32))
    assert remover.remove_batch([]) == []


def _count_network_calls(remover, monkeypatch):
    calls = []
    for name, runner in remover._host.runners.items():
        def infer(feeds, _name=name, _infer=runner.infer):
            calls.append((_name, next(iter(feeds.values())).shape[0]))
            return _infer(feeds)
        monkeypatch.setattr(runner, "infer", infer)
    return calls


def test_batch_runs_each_network_once(rm2s_dir, monkeypatch):
    remover = Remover.load(rm2s_dir)
    frames = [(_photo(seed=s) * 255).astype(np.uint8) for s in range(4)]
    want = [remover.remove(frame) for frame in frames]
    calls = _count_network_calls(remover, monkeypatch)
    outs = remover.remove_batch(frames)
    assert calls == [("stage1", 4), ("stage2", 4)]
    for got, expected in zip(outs, want):
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    calls.clear()
    remover.remove_batch([frames[0], frames[1][:30]])  # two sizes: one frame at a time
    assert calls == [("stage1", 1), ("stage2", 1)] * 2


def test_batch_falls_back_for_a_fixed_batch_graph(tmp_path, monkeypatch):
    import onnx
    from dereflect.manifest import load_manifest, sha256_file

    directory = make_crrn_export(tmp_path / "fixed")
    model = onnx.load(str(directory / "crrn.onnx"))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(directory / "crrn.onnx"))
    manifest = load_manifest(directory, check_hashes=False)
    manifest.networks["crrn"].sha256 = sha256_file(directory / "crrn.onnx")
    manifest.save()
    remover = Remover.load(directory)
    frames = [(_photo(seed=s) * 255).astype(np.uint8) for s in range(3)]
    calls = _count_network_calls(remover, monkeypatch)
    outs = remover.remove_batch(frames)
    assert calls == [("crrn", 3)] + [("crrn", 1)] * 3 and remover._batches is False
    for got, frame in zip(outs, frames):
        np.testing.assert_array_equal(got, remover.remove(frame))


@pytest.mark.parametrize("bad, match", [
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8, 3), np.inf, np.float64), "NaN or infinite"),
    (np.zeros((8, 8, 5), np.uint8), "shape"),
])
def test_remove_bad_arrays(remover, bad, match):
    with pytest.raises(InputError, match=match):
        remover.remove(bad)


# -- any size ---------------------------------------------------------------------------

def test_helpers_fit_and_tiles():
    assert fit_size(300, 500, (100, 100)) == (60, 100, 0.2)
    assert fit_size(50, 60, (100, 100))[2] == 1.0
    starts = tile_starts(300, 128, 32)
    assert starts[0] == 0 and starts[-1] == 300 - 128
    assert all(b - a <= 128 - 32 for a, b in zip(starts, starts[1:]))
    assert tile_starts(100, 128, 32) == [0]


def test_guided_upsample_recovers_linear_layer():
    big = _photo(120, 160, seed=4)
    small = cv2.resize(big, (40, 30), interpolation=cv2.INTER_AREA)
    coefficients = guided_coefficients(0.3 * small, small)
    up = guided_upsample_rows(coefficients, big, 120)
    assert np.abs(up - 0.3 * big).max() < 0.01
    # Strip by strip (as the Remover runs it), the same rows: bit for bit where OpenCV runs its own code.
    strips = [guided_upsample_rows(coefficients, big[top:top + 37], 120, top) for top in range(0, 120, 37)]
    with _opencv_own_code():
        np.testing.assert_array_equal(np.concatenate(strips), guided_upsample_rows(coefficients, big, 120))


def test_the_guided_strategy_runs_guided_upsample_rows(crrn_dir, monkeypatch):
    """The large-image path applies the filter through guided_upsample_rows, the function tested above."""
    import dereflect.remover as remover_module

    calls = []

    def recorded(coefficients, guide, height, top=0):
        calls.append((guide.shape[0], height, top))
        return guided_upsample_rows(coefficients, guide, height, top)

    monkeypatch.setattr(remover_module, "STRIP_PIXELS", 150 * 50)
    monkeypatch.setattr(remover_module, "guided_upsample_rows", recorded)
    image = _photo(150, 210, seed=5)
    background = Remover.load(crrn_dir, max_side=64).remove(image, colour_order="RGB")
    assert len(calls) > 1 and sum(rows for rows, _, _ in calls) == 150 and calls[0][1:] == (150, 0)
    assert np.abs(background - 0.7 * image).max() < 0.02


def test_large_image_guided_default(crrn_dir):
    image = _photo(150, 210, seed=5)
    remover = Remover.load(crrn_dir, max_side=64)
    result = remover.remove_with_intermediates(image)
    assert result.background.shape == image.shape and result.scale < 0.35
    guided_error = np.abs(result.background - 0.7 * image).max()
    small = cv2.resize(image, (64, 46), interpolation=cv2.INTER_AREA)
    naive = cv2.resize(0.7 * small, (210, 150), interpolation=cv2.INTER_LINEAR)
    assert guided_error < 0.02 < np.abs(naive - 0.7 * image).max()
    # Intermediates stay at the resolution the networks ran at.
    assert result.gradient.shape == (46, 64) and result.reflection.shape == (46, 64, 3)


def test_large_image_tiles_are_seamless(crrn_dir):
    image = _photo(150, 210, seed=6)
    remover = Remover.load(crrn_dir, max_side=64, large_image="tile")
    result = remover.remove_with_intermediates(image)
    assert result.tiles > 4 and result.thresholds is None
    np.testing.assert_allclose(result.background, 0.7 * image, atol=1e-5)


def test_large_image_rm2s_both_strategies(rm2s_dir):
    image = (_photo(130, 170, seed=7) * 255).astype(np.uint8)
    for strategy, size in (("guided", (49, 64)), ("tile", (130, 170))):
        remover = Remover.load(rm2s_dir, max_side=64, large_image=strategy)
        result = remover.remove_with_intermediates(image)
        assert result.background.shape == image.shape and result.background.dtype == np.uint8
        assert result.confidence.shape == size and result.mask_reflection.dtype == bool
        assert result.stage1.shape == size + (3,)


@contextlib.contextmanager
def _opencv_own_code():
    """cv2.resize without Intel IPP (which x86 wheels use): the arithmetic the strips reproduce."""
    used = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        yield
    finally:
        cv2.ipp.setUseIPP(used)


def _whole_image_guided(remover, rgb):
    """The large-image path as it was before it worked in strips: full-size float arrays throughout."""
    height, width = rgb.shape[:2]
    small_h, small_w, _ = fit_size(height, width, remover.max_hw)
    small = cv2.resize(rgb, (small_w, small_h), interpolation=cv2.INTER_AREA)
    low = remover.run_once(small)
    a, b = guided_coefficients(small - low.background, small)
    a_high = cv2.resize(a, (width, height), interpolation=cv2.INTER_LINEAR)
    b_high = cv2.resize(b, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(rgb - (a_high * rgb + b_high), 0.0, 1.0)


def _whole_image_tiles(remover, rgb, key="background"):
    height, width = rgb.shape[:2]
    tile_h, tile_w = min(remover.max_hw[0], height), min(remover.max_hw[1], width)
    overlap = min(64, tile_h // 4, tile_w // 4)
    sums, weights = None, np.zeros((height, width, 1), np.float32)
    for top in tile_starts(height, tile_h, overlap):
        for left in tile_starts(width, tile_w, overlap):
            window = (slice(top, top + tile_h), slice(left, left + tile_w))
            value = getattr(remover.run_once(np.ascontiguousarray(rgb[window]), intermediates=True), key)
            value = value.astype(np.float32).reshape(value.shape[:2] + (-1,))
            weight = (_ramp(tile_h, overlap)[:, None] * _ramp(tile_w, overlap)[None, :])[:, :, None]
            weights[window] += weight
            sums = np.zeros((height, width, value.shape[2]), np.float32) if sums is None else sums
            sums[window] += value * weight
    return sums / weights


@pytest.mark.parametrize("shape", [(130, 170), (256, 128), (97, 301)])
def test_large_images_in_strips_match_the_whole_image_computation(rm2s_dir, monkeypatch, shape):
    import dereflect.remover as remover_module

    monkeypatch.setattr(remover_module, "STRIP_PIXELS", 900)  # many strips even on a small image
    rgb = _photo(*shape, seed=8)
    guided = Remover.load(rm2s_dir, max_side=64)
    got = guided.remove(rgb, colour_order="RGB")
    with _opencv_own_code():
        np.testing.assert_array_equal(got, _whole_image_guided(guided, rgb))
    # With IPP (the x86 wheel's default) the old whole-image resize differs in the last digits only.
    assert np.abs(got - _whole_image_guided(guided, rgb)).max() < 1e-4
    tiled = Remover.load(rm2s_dir, max_side=64, large_image="tile")
    np.testing.assert_array_equal(tiled.remove(rgb, colour_order="RGB"), _whole_image_tiles(tiled, rgb))
    result = tiled.remove_with_intermediates(rgb, colour_order="RGB")
    # (The CPU middle step's confidence varies in its last bit with the memory alignment of its input.)
    np.testing.assert_allclose(result.confidence, _whole_image_tiles(tiled, rgb, "confidence")[:, :, 0], rtol=1e-6)
    np.testing.assert_array_equal(result.mask_reflection,
                                  _whole_image_tiles(tiled, rgb, "mask_reflection")[:, :, 0] > 0.5)
    # uint8 BGR in, uint8 BGR out: the same values, converted a strip at a time.
    frame = (rgb[:, :, ::-1] * 255).round().astype(np.uint8)
    want = guided.remove(frame.astype(np.float32) * np.float32(1 / 255))  # how uint8 is read
    np.testing.assert_array_equal(guided.remove(frame), (np.clip(want, 0, 1) * 255 + 0.5).astype(np.uint8))


def test_strips_keep_grey_alpha_and_16_bit(crrn_dir, monkeypatch):
    import dereflect.remover as remover_module

    monkeypatch.setattr(remover_module, "STRIP_PIXELS", 700)
    remover = Remover.load(crrn_dir, max_side=48)
    rgb = _photo(120, 90, seed=4)
    rgba = np.dstack([(rgb * 65535).astype(np.uint16), np.arange(120 * 90, dtype=np.uint16).reshape(120, 90)])
    out = remover.remove(rgba)
    assert out.dtype == np.uint16 and out.shape == rgba.shape
    np.testing.assert_array_equal(out[:, :, 3], rgba[:, :, 3])
    grey = (rgb[:, :, 0] * 255).astype(np.uint8)
    assert remover.remove(grey).shape == grey.shape
    assert np.abs(remover.remove(grey).astype(int) - (grey * 0.7).astype(int)).max() <= 2


@pytest.mark.parametrize("src, dst", [((300, 400), (100, 133)), ((800, 1200), (100, 150)), ((150, 210), (46, 64)),
                                      ((1313, 1001), (100, 77)), ((64, 64), (64, 32))])
def test_shrink_area_is_opencvs_inter_area(monkeypatch, src, dst):
    import dereflect.remover as remover_module

    monkeypatch.setattr(remover_module, "STRIP_PIXELS", 5000)
    image = np.random.default_rng(0).random(src + (3,), dtype=np.float32)
    got = remover_module.shrink_area(remover_module._Frame(image, converted=True), *dst)
    np.testing.assert_array_equal(got, cv2.resize(image, dst[::-1], interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("src, dst", [((46, 64), (150, 210)), ((68, 102), (800, 1200)), ((100, 77), (1313, 1001)),
                                      ((1, 5), (7, 9))])
def test_resize_linear_rows_is_opencvs_inter_linear(src, dst):
    from dereflect.remover import resize_linear_rows

    image = np.random.default_rng(1).random(src + (3,), dtype=np.float32) * 2 - 0.5
    with _opencv_own_code():
        want = cv2.resize(image, dst[::-1], interpolation=cv2.INTER_LINEAR).reshape(dst + (3,))
    got = np.concatenate([resize_linear_rows(image, *dst, top, min(top + 37, dst[0]))
                          for top in range(0, dst[0], 37)])
    np.testing.assert_array_equal(got, want)


def test_bad_options(rm2s_dir):
    with pytest.raises(InputError, match="large_image"):
        Remover.load(rm2s_dir, large_image="magic")
    with pytest.raises(InputError, match="backend"):
        Remover.load(rm2s_dir, backend="openvino")
    with pytest.raises(InputError, match="threshold"):
        Remover.load(rm2s_dir, threshold="kmeans")


# -- strength -------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0, 0.5, 1, 1.5, 2])
def test_strength_scales_the_models_change(crrn_dir, strength):
    image = _photo(seed=8)
    remover = Remover.load(crrn_dir, strength=strength)
    want = np.clip(image + strength * (0.7 * image - image), 0, 1)  # the toy CRRN's background is 0.7 I
    np.testing.assert_allclose(remover.remove(image, colour_order="RGB"), want, atol=1e-6)
    np.testing.assert_allclose(remover.process(image).background, want, atol=1e-6)  # the video route
    assert (f"strength {strength:g}" in repr(remover)) == (strength != 1)


def test_strength_zero_gives_the_input_back_in_its_own_type(crrn_dir):
    rgb = _photo(seed=9)
    grey = (rgb[:, :, 0] * 255).astype(np.uint8)
    rgba = np.dstack([(rgb * 255).astype(np.uint8), np.full(rgb.shape[:2], 77, np.uint8)])
    remover = Remover.load(crrn_dir, strength=0)
    for image in ((rgb * 65535).astype(np.uint16), grey, rgba):
        np.testing.assert_array_equal(remover.remove(image), image)


@pytest.mark.parametrize("strategy", ["guided", "tile"])
def test_strength_applies_at_full_resolution_and_leaves_the_intermediates_alone(crrn_dir, strategy):
    image = _photo(150, 210, seed=10)
    plain = Remover.load(crrn_dir, max_side=64, large_image=strategy).remove_with_intermediates(image)
    half = Remover.load(crrn_dir, max_side=64, large_image=strategy,
                        strength=0.5).remove_with_intermediates(image)
    np.testing.assert_allclose(half.background, image + 0.5 * (plain.background - image), atol=1e-6)
    np.testing.assert_array_equal(half.reflection, plain.reflection)  # the networks' own
    if strategy == "tile":
        np.testing.assert_allclose(half.background, 0.85 * image, atol=1e-5)


def test_strength_in_a_batch_is_that_of_one_image_at_a_time(rm2s_dir):
    images = np.stack([(_photo(seed=s) * 255).astype(np.uint8) for s in (11, 12, 13)])
    remover = Remover.load(rm2s_dir, strength=1.5)
    batch = remover.remove_batch(images)
    assert remover._batches  # the batch ran through the networks as one
    one_by_one = np.stack([remover.remove(image) for image in images])
    assert np.abs(batch.astype(int) - one_by_one).max() <= 1  # float rounding
    assert np.abs(batch.astype(int) - Remover.load(rm2s_dir).remove_batch(images)).max() > 5


@pytest.mark.parametrize("bad", [-0.1, 2.5, float("nan"), float("inf"), "1", True, None])
def test_bad_strength_is_refused_by_name(crrn_dir, bad):
    with pytest.raises(InputError, match="strength must be a number from 0 to 2"):
        Remover.load(crrn_dir, strength=bad)
    remover = Remover.load(crrn_dir, strength=0.5)
    with pytest.raises(InputError, match="strength must be a number from 0 to 2"):
        remover.strength = bad
    assert remover.strength == 0.5


def test_strength_can_change_between_frames(crrn_dir):
    image = _photo(seed=14)
    remover = Remover.load(crrn_dir)
    np.testing.assert_allclose(remover.remove(image, colour_order="RGB"), 0.7 * image, atol=1e-6)
    remover.strength = 0
    np.testing.assert_array_equal(remover.remove(image, colour_order="RGB"), image)
    remover.strength = 2
    np.testing.assert_allclose(remover.remove(image, colour_order="RGB"), 0.4 * image, atol=1e-6)


# -- model directories ------------------------------------------------------------------

def test_one_max_side_rule_for_manifests_checkpoints_exports_and_removers(tmp_path):
    from dereflect.manifest import check_max_side, load_manifest

    side = check_max_side(np.int64(300))
    assert side == 300 and type(side) is int  # a plain int: it goes into JSON
    assert check_max_side(0, no_limit=True) is None and check_max_side(None, no_limit=True) is None
    for bad in (300.5, 31, 0, -4, "big", True, False, None):
        with pytest.raises(InputError, match=r"^max_side must be a whole number of pixels, at least 32, got"):
            check_max_side(bad)
    with pytest.raises(ModelError, match="or 0 / None for no limit"):
        check_max_side(16, "the side", ModelError, no_limit=True)
    directory = make_crrn_export(tmp_path / "model")
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "max_side": 300.5}))
    with pytest.raises(ModelError, match="manifest.json: max_side must be a whole number of pixels"):
        load_manifest(directory)


def test_wrong_export_directories(tmp_path, rm2s_dir):
    with pytest.raises(ModelError, match="not found"):
        Remover.load(tmp_path / "nope")
    with pytest.raises(ModelError, match="not a dereflect export"):
        Remover.load(tmp_path)
    broken = make_rm2s_export(tmp_path / "broken")
    (broken / "stage2.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="SHA-256"):
        Remover.load(broken)
    missing = make_rm2s_export(tmp_path / "missing")
    (missing / "stage1.onnx").unlink()
    with pytest.raises(ModelError, match="missing"):
        Remover.load(missing)
    with pytest.raises(ModelError, match="FP16"):
        Remover.load(rm2s_dir, precision="fp16")


def test_manifest_names_not_in_graph(tmp_path):
    directory = make_crrn_export(tmp_path / "renamed")
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"gradient"', '"edges"'))
    with pytest.raises(ModelError, match="must give"):
        Remover.load(directory)


def test_bundled_name_is_not_hidden_by_a_folder_that_is_not_an_export(monkeypatch, tmp_path):
    import dereflect.models as pipeline

    monkeypatch.setattr(pipeline, "BUNDLED_MODELS_DIR", tmp_path / "models")
    make_crrn_export(tmp_path / "models" / "crrn-lite")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "crrn-lite").mkdir()  # e.g. a training run's folder
    assert pipeline.resolve_model("crrn-lite") == tmp_path / "models" / "crrn-lite"
    make_crrn_export(tmp_path / "crrn-lite")  # a real export of that name is the user's choice
    assert pipeline.resolve_model("crrn-lite") == Path("crrn-lite")


def test_default_model_missing_explains(monkeypatch, tmp_path):
    import dereflect.models as pipeline

    monkeypatch.setattr(pipeline, "BUNDLED_MODELS_DIR", tmp_path / "models")
    with pytest.raises(ModelError, match="pass an export directory"):
        Remover.load()
    with pytest.raises(ModelError, match="pass an export directory"):
        Remover.load("crrn-lite")
    with pytest.raises(ModelError, match="no bundled model 'nope'"):
        pipeline.bundled_model_dir("nope")


def test_load_takes_a_bundled_name_or_a_directory(monkeypatch, tmp_path):
    import dereflect.models as pipeline

    make_crrn_export(tmp_path / "models" / "crrn-lite")
    monkeypatch.setattr(pipeline, "BUNDLED_MODELS_DIR", tmp_path / "models")
    assert Remover.load("crrn-lite").manifest.directory == tmp_path / "models" / "crrn-lite"
    assert Remover.load(tmp_path / "models" / "crrn-lite").method.name == "crrn"
    with pytest.raises(ModelError, match="lacks the bundled model 'rm2s-lite'"):
        Remover.load("rm2s-lite")
    assert Remover.load().manifest.directory == tmp_path / "models" / "crrn-lite"  # the default bundled model


# -- threads ------------------------------------------------------------------------------

def test_shared_remover_across_threads(remover):
    images = [_photo(seed=s) for s in range(8)]
    expected = [remover.remove(image) for image in images]
    results = [None] * len(images)

    def work(i):
        for _ in range(3):
            results[i] = remover.remove(images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_one_remover_per_thread(rm2s_dir):
    image = _photo(seed=11)
    want = Remover.load(rm2s_dir).remove(image)
    results = []

    def work():
        with Remover.load(rm2s_dir) as own:
            results.append(own.remove(image))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for got in results:
        np.testing.assert_array_equal(got, want)


# -- backends -----------------------------------------------------------------------------

def test_runner_interface(rm2s_dir):
    runner = OnnxRuntimeRunner(rm2s_dir / "stage1.onnx", device="cpu")
    assert isinstance(runner, Runner) and not runner.is_active
    x = np.random.default_rng(0).random((1, 3, 7, 9)).astype(np.float32)
    with runner:
        assert runner.input_names == ["image"] and runner.output_names == ["background"]
        np.testing.assert_allclose(runner.infer({"image": x})["background"], x * x, rtol=1e-6)
        with pytest.raises(InputError, match="do not match"):
            runner.infer({"input": x})
    assert not runner.is_active


def test_backend_names_and_missing_backends(rm2s_dir):
    assert backend_name("TRT") == "tensorrt" and backend_name("pytorch") == "torch"
    with pytest.raises(InputError, match="unknown backend"):
        backend_name("tflite")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="tensorrt"):
            Remover.load(rm2s_dir, backend="tensorrt")


def test_onnxruntime_cuda_without_provider(rm2s_dir):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
        Remover.load(rm2s_dir, device="cuda")


def test_onnx_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        OnnxRuntimeRunner(bad).activate()


# -- command line -------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch):
    # Only this area's commands: the others may pull in extras that a runtime install lacks.
    monkeypatch.setattr(dereflect.cli, "COMMAND_MODULES", ("dereflect.cli_runtime",))
    return dereflect.cli.main


def _write_png(path, seed=0, size=(40, 56)):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (_photo(*size, seed=seed) * 255).astype(np.uint8))
    return path


def test_cli_remove_file_and_intermediates(cli, rm2s_dir, tmp_path):
    source = _write_png(tmp_path / "in" / "a.png")
    target = tmp_path / "out" / "a_clean.png"
    model = ["--model", str(rm2s_dir)]
    assert cli(["remove", str(source), "-o", str(target), *model, "--save-intermediates"]) == 0
    out = cv2.imread(str(target))
    assert out.shape == (40, 56, 3)
    for key in ("stage1", "confidence", "mask_background", "mask_reflection", "reflection"):
        assert cv2.imread(str(target.with_name(f"a_clean.{key}.png"))) is not None, key
    # Exit 2: nothing written (the one output exists); exit 0: the rest written, existing outputs kept.
    assert cli(["remove", str(source), "-o", str(target), "--model", str(rm2s_dir)]) == 2
    assert cli(["remove", str(source), "-o", str(target), "--model", str(rm2s_dir), "--overwrite"]) == 0
    other = _write_png(tmp_path / "in" / "b.png", seed=1)
    out_dir = tmp_path / "out2"
    assert cli(["remove", str(source), "-o", f"{out_dir}/", "--model", str(rm2s_dir)]) == 0
    kept = (out_dir / "a.png").read_bytes()
    assert cli(["remove", str(source), str(other), "-o", str(out_dir), "--model", str(rm2s_dir)]) == 0
    assert (out_dir / "b.png").is_file() and (out_dir / "a.png").read_bytes() == kept


def test_cli_remove_folder_with_a_bad_file(cli, rm2s_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    for i in range(3):
        _write_png(folder / f"img{i}.png", seed=i)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out_dir = tmp_path / "out"
    assert cli(["remove", str(folder), "-o", str(out_dir), "--model", str(rm2s_dir)]) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert "broken.jpg" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_input(cli, rm2s_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    source = _write_png(folder / "a.png")
    before = source.read_bytes()
    assert cli(["remove", str(source), "-o", str(source), "--model", str(rm2s_dir), "--overwrite"]) == 2
    assert cli(["remove", str(folder), "-o", str(folder), "--model", str(rm2s_dir), "--overwrite"]) == 2
    assert source.read_bytes() == before
    assert "input image" in capsys.readouterr().err


def test_cli_without_model_explains(cli, monkeypatch, tmp_path, capsys):
    import dereflect.models as pipeline

    monkeypatch.setattr(pipeline, "BUNDLED_MODELS_DIR", tmp_path / "none")
    source = _write_png(tmp_path / "a.png")
    assert cli(["remove", str(source), "-o", str(tmp_path / "b.png")]) == 2
    assert "lacks the bundled model 'crrn-lite'" in capsys.readouterr().err


def test_cli_remove_strength(cli, crrn_dir, tmp_path, capsys):
    source = _write_png(tmp_path / "a.png")
    model = ["--model", str(crrn_dir)]
    assert cli(["remove", str(source), "-o", str(tmp_path / "same.png"), *model, "--strength", "0"]) == 0
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "same.png")), cv2.imread(str(source)))
    assert cli(["remove", str(source), "-o", str(tmp_path / "half.png"), *model, "--strength", "0.5"]) == 0
    want = np.clip(cv2.imread(str(source)) * 0.85 + 0.5, 0, 255).astype(np.uint8)  # I + 0.5 (0.7 I - I)
    assert np.abs(cv2.imread(str(tmp_path / "half.png")).astype(int) - want).max() <= 1
    capsys.readouterr()
    assert cli(["remove", str(source), "-o", str(tmp_path / "no.png"), *model, "--strength", "3"]) == 2
    err = capsys.readouterr().err
    assert "strength must be a number from 0 to 2" in err and "Traceback" not in err
    assert not (tmp_path / "no.png").exists()


@pytest.mark.skipif(not REAL_PHOTOS.is_dir(), reason="shared real photos not present")
def test_cli_remove_real_photo(cli, rm2s_dir, tmp_path):
    photo = sorted(REAL_PHOTOS.glob("*.jpg"))[0]
    target = tmp_path / "clean.jpg"
    assert cli(["remove", str(photo), "-o", str(target), "--model", str(rm2s_dir), "--max-side", "256"]) == 0
    assert cv2.imread(str(target)).shape == cv2.imread(str(photo)).shape


# -- TensorRT backend with fake tensorrt / pycuda modules -----------------------------------
#
# The fakes keep "device memory" in NumPy byte arrays addressed by integers, so the backend's
# buffer handling, name-based I/O, kernel argument lists (checked against the .cu signatures)
# and CUDA-graph capture/replay all run for real; only TensorRT and the GPU are emulated.

KERNEL_SOURCE = Path(dereflect.cli.__file__).resolve().parent / "middle_step" / "confidence.cu"


def _kernel_signatures():
    import re

    text = KERNEL_SOURCE.read_text()
    found = {}
    pattern = r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)'
    for name, params in re.findall(pattern, text):
        found[name] = ["pointer" if "*" in p else p.split()[-2] for p in params.split(",")]
    return found


class FakeAlloc:
    def __init__(self, cuda, nbytes):
        self.address = cuda.next_address
        cuda.next_address += 1 << 32
        cuda.memory[self.address] = np.zeros(nbytes, np.uint8)

    def __int__(self):
        return self.address


class FakeStream:
    current = {}  # handle -> stream, for execute_async_v3(stream_handle)

    def __init__(self):
        self.handle = id(self)
        self.recording = None
        FakeStream.current[self.handle] = self

    def run(self, operation):
        if self.recording is not None:
            self.recording.append(operation)
        else:
            operation()

    def synchronize(self):
        assert self.recording is None

    def begin_capture(self):
        self.recording = []

    def end_capture(self):
        recorded, self.recording = self.recording, None
        return FakeGraph(recorded)


class FakeGraph:
    launches = 0

    def __init__(self, operations):
        self.operations = operations

    def instantiate(self):
        return self

    def launch(self, stream=None):
        FakeGraph.launches += 1
        for operation in self.operations:
            operation()


class FakeCuda:
    """pycuda.driver: memory, copies, streams and contexts on the host."""

    def __init__(self):
        self.memory = {}
        self.next_address = 1 << 32
        cuda = self

        class Device:
            def __init__(self, index):
                self.index = index

            def retain_primary_context(self):
                return type("Ctx", (), {"push": lambda self: None})()

            def name(self):
                return "FakeGPU"

            def compute_capability(self):
                return (8, 7)

        class Context:
            @staticmethod
            def pop():
                return None

        self.Device, self.Context, self.Stream = Device, Context, FakeStream
        self.mem_alloc = lambda n: FakeAlloc(cuda, n)

    def init(self):
        return None

    def view(self, pointer, dtype, shape):
        """The device bytes at ``pointer`` as an array (-1 in ``shape``: as many as the allocation holds)."""
        raw = self.memory[int(pointer)]
        if -1 not in shape:
            raw = raw[: int(np.prod(shape)) * np.dtype(dtype).itemsize]
        return raw.view(dtype).reshape(shape)

    def pagelocked_empty(self, n, dtype):
        return np.zeros(n, dtype)

    def memset_d8(self, dest, value, n):
        self.memory[int(dest)][:n] = value

    def memcpy_htod_async(self, dest, src, stream):
        def copy():
            raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
            self.memory[int(dest)][: raw.size] = raw

        stream.run(copy)

    def memcpy_dtoh_async(self, dest, src, stream):
        def copy():
            flat = dest.view(np.uint8).reshape(-1)
            flat[:] = self.memory[int(src)][: flat.size]

        stream.run(copy)


def _fake_networks(stage1_out=np.float32):
    weight = np.zeros((3, 9), np.float32)
    for c in range(3):
        weight[c, c], weight[c, 3 + c], weight[c, 6 + c] = 0.5, 0.25, 0.25
    return {
        "stage1": {"inputs": {"image": (3, np.float32)}, "outputs": {"background": (3, stage1_out)},
                   "fn": lambda x: {"background": x["image"] ** 2}},
        "stage2": {"inputs": {"stage2_input": (9, np.float32)}, "outputs": {"background": (3, np.float32)},
                   "fn": lambda x: {"background": np.einsum("oc,nchw->nohw", weight, x["stage2_input"])}},
    }


class FakeTrt:
    """tensorrt: engines that compute the toy networks on the fake device memory."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class TensorIOMode:
        INPUT = "input"
        OUTPUT = "output"

    def __init__(self, cuda, networks, version="10.3.0", max_hw=(512, 512)):
        self.__version__ = version
        trt = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                name = data.decode(errors="replace").partition(":")[2]
                return FakeEngine(trt, cuda, name, networks[name], max_hw) if name in networks else None

        self.Runtime = Runtime

    @staticmethod
    def nptype(dtype):
        return dtype


class FakeEngine:
    def __init__(self, trt, cuda, name, network, max_hw):
        self.trt, self.cuda, self.network, self.max_hw = trt, cuda, network, max_hw
        self.names = list(network["inputs"]) + list(network["outputs"])
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.network["inputs"] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return {**self.network["inputs"], **self.network["outputs"]}[name][1]

    def get_tensor_profile_shape(self, name, profile):
        channels = self.network["inputs"][name][0]
        return (1, channels, 8, 8), (1, channels, 64, 64), (1, channels, *self.max_hw)

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine = engine
        self.shapes = {}
        self.addresses = {}

    def set_input_shape(self, name, shape):
        _, _, largest = self.engine.get_tensor_profile_shape(name, 0)
        if any(s > m for s, m in zip(shape, largest)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        n, _, h, w = next(iter(self.shapes.values()))
        return (n, self.engine.network["outputs"][name][0], h, w)

    def set_tensor_address(self, name, address):
        self.addresses[name] = int(address)

    def execute_async_v3(self, stream_handle):
        stream = FakeStream.current[stream_handle]
        network, cuda = self.engine.network, self.engine.cuda
        shapes = {name: self.shapes[name] for name in network["inputs"]}
        addresses = dict(self.addresses)

        def compute():
            feeds = {name: cuda.view(addresses[name], dtype, shapes[name]).astype(np.float32)
                     for name, (_, dtype) in network["inputs"].items()}
            for name, value in network["fn"](feeds).items():
                dtype = network["outputs"][name][1]
                cuda.view(addresses[name], dtype, value.shape)[...] = value.astype(dtype)

        stream.run(compute)
        return True


class FakeKernels:
    """pycuda.compiler.SourceModule for confidence.cu: NumPy passes with the kernel's signatures."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.signatures = _kernel_signatures()

    def SourceModule(self, source, no_extern_c=False, options=(), nvcc="nvcc"):
        assert no_extern_c and any(o.startswith("-DRM2S_BINS=") for o in options)
        return self

    def get_function(self, name):
        signature = self.signatures[name]

        def launch(*args, block, grid, stream):
            assert len(args) == len(signature), name
            for arg, kind in zip(args, signature):
                expected = {"pointer": (FakeAlloc, np.intp), "int": np.int32, "float": np.float32}[kind]
                assert isinstance(arg, expected), (name, kind, type(arg))
            stream.run(lambda: getattr(self, name.replace("rm2s_", "_"))(*args))

        return launch

    def _confidence(self, image, stage1, h, w, gt, eps, conf, mask, max_bits, b1_dtype=np.float32):
        from dereflect.middle_step.reference import confidence_map

        h, w = int(h), int(w)
        images = self.cuda.view(image, np.float32, (-1, 3, h, w))
        n = images.shape[0]
        b1 = self.cuda.view(stage1, b1_dtype, (n, 3, h, w)).astype(np.float32)
        out = self.cuda.view(conf, np.float32, (n, h, w))
        bits = self.cuda.view(max_bits, np.int32, (n,))
        for i in range(n):
            out[i] = confidence_map(images[i].transpose(1, 2, 0), b1[i].transpose(1, 2, 0))[0]
            bits[i] = max(bits[i], out[i].max().astype(np.float32).view(np.int32))

    def _confidence_f32(self, *args):
        self._confidence(*args)

    def _confidence_b1f16(self, *args):
        self._confidence(*args, b1_dtype=np.float16)

    def _histogram(self, conf, h, w, max_bits, hist_count, hist_sum):
        from dereflect.middle_step.reference import HISTOGRAM_BINS, histogram_bin_index

        bits = self.cuda.view(max_bits, np.int32, (-1,))
        n = bits.shape[0]
        values = self.cuda.view(conf, np.float32, (n, int(h) * int(w)))
        counts = self.cuda.view(hist_count, np.uint32, (n, HISTOGRAM_BINS))
        sums = self.cuda.view(hist_sum, np.float64, (n, HISTOGRAM_BINS))
        for i in range(n):
            top = bits[i:i + 1].view(np.float32)[0]
            v = values[i][values[i] > 0]
            if top > 0 and v.size:
                idx = histogram_bin_index(v, top)
                counts[i] += np.bincount(idx, minlength=HISTOGRAM_BINS).astype(np.uint32)
                sums[i] += np.bincount(idx, weights=v.astype(np.float64), minlength=HISTOGRAM_BINS)

    def _two_means(self, hist_count, hist_sum, max_bits, c1, c2, result):
        from dereflect.middle_step.reference import HISTOGRAM_BINS, _best_split

        bits = self.cuda.view(max_bits, np.int32, (-1,))
        n = bits.shape[0]
        counts = self.cuda.view(hist_count, np.uint32, (n, HISTOGRAM_BINS))
        sums = self.cuda.view(hist_sum, np.float64, (n, HISTOGRAM_BINS))
        res = self.cuda.view(result, np.float32, (n, 8))
        for i in range(n):
            count, total = float(counts[i].sum()), float(sums[i].sum())
            left_counts = np.cumsum(counts[i].astype(np.float64))[:-1]
            k = _best_split(left_counts, np.cumsum(sums[i])[:-1], count, total)
            if k >= 0:
                left_n, left_s = float(counts[i][:k + 1].sum()), float(sums[i][:k + 1].sum())
                low, high = left_s / left_n, (total - left_s) / (count - left_n)
            else:
                low = high = total / count if count else 0.0
            top = bits[i:i + 1].view(np.float32)[0]
            res[i] = [low, high, low + c2 * (high - low), high - c1 * (high - low), top, count, k, top / 4096]
            counts[i], sums[i], bits[i] = 0, 0, 0

    def _stage2(self, image, conf, result, h, w, out, mb, mr, out_dtype=np.float32):
        h, w = int(h), int(w)
        res = self.cuda.view(result, np.float32, (-1, 8))
        n = res.shape[0]
        images = self.cuda.view(image, np.float32, (n, 3, h, w))
        c = self.cuda.view(conf, np.float32, (n, 1, h, w))
        background = (c > 0) & (c < res[:, 2, None, None, None])
        reflection = c > res[:, 3, None, None, None]
        value = np.concatenate([images, images * background, images * reflection], axis=1)
        self.cuda.view(out, out_dtype, (n, 9, h, w))[...] = value.astype(out_dtype)

    def _stage2_input_f32(self, *args):
        self._stage2(*args)

    def _stage2_input_f16(self, *args):
        self._stage2(*args, out_dtype=np.float16)


@pytest.fixture
def fake_trt(monkeypatch):
    """Install fake tensorrt / pycuda modules; returns a function making an engine export dir."""
    import sys
    import types

    from dereflect.manifest import sha256_file
    from dereflect.trt_api import EngineInfo, engine_paths, write_engine_info

    cuda = FakeCuda()
    trt = FakeTrt(cuda, _fake_networks())
    kernels = FakeKernels(cuda)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver, pycuda.compiler = cuda, kernels
    for name, module in (("tensorrt", trt), ("pycuda", pycuda), ("pycuda.driver", cuda),
                         ("pycuda.compiler", kernels)):
        monkeypatch.setitem(sys.modules, name, module)
    # A real cuda-python, if installed, must not answer for the fake GPU.
    monkeypatch.setattr("dereflect.trt_api._gpu_from_cuda_python", lambda: None)

    def make(directory, built_with="10.3.0", content=None):
        export = make_rm2s_export(directory)
        manifest = dereflect.manifest.load_manifest(export)
        for name, spec in manifest.networks.items():
            engine, sidecar = engine_paths(export, name)
            engine.write_bytes(content or f"fake-engine:{name}".encode())
            write_engine_info(EngineInfo(
                network=name, engine=engine.name, onnx=spec.onnx, onnx_sha256=spec.sha256,
                tensorrt_version=built_with, gpu_name="FakeGPU", compute_capability="8.7", precision="fp32",
                profiles={}, engine_sha256=sha256_file(engine)), sidecar)
        return export

    make.trt, make.cuda = trt, cuda
    return make


def test_tensorrt_runner_matches_onnxruntime(fake_trt, tmp_path):
    export = fake_trt(tmp_path / "trt")
    image = _photo(seed=21)
    with Remover.load(export, backend="tensorrt", device_middle_step=False) as remover:
        assert remover.max_hw == (512, 512)
        np.testing.assert_allclose(remover.remove(image), Remover.load(export).remove(image), atol=1e-6)
        runner = remover._backend.runners["stage1"]
        assert runner.input_names == ["image"] and runner.output_names == ["background"]


def test_tensorrt_device_rm2s_and_graph_replay(fake_trt, tmp_path):
    export = fake_trt(tmp_path / "trt")
    reference = Remover.load(export, threshold="histogram")
    with Remover.load(export, backend="tensorrt") as remover:
        assert remover._device is not None
        before = FakeGraph.launches
        for seed in (22, 23, 24):
            image = _photo(seed=seed)
            np.testing.assert_allclose(remover.remove(image), reference.remove(image), atol=1e-5)
        # First frame runs plainly and is captured; the next two replay the graph with new data.
        assert FakeGraph.launches - before == 2
        other = _photo(24, 40, seed=25)
        np.testing.assert_allclose(remover.remove(other), reference.remove(other), atol=1e-5)


def test_tensorrt_device_rm2s_fp16_stage1_output(fake_trt, tmp_path, monkeypatch):
    import sys

    from dereflect.middle_step.cuda import kernel_names

    export = fake_trt(tmp_path / "trt")
    half_stage1 = FakeTrt(fake_trt.cuda, _fake_networks(stage1_out=np.float16))
    monkeypatch.setitem(sys.modules, "tensorrt", half_stage1)
    with Remover.load(export, backend="tensorrt") as remover:
        assert remover._device.kernels == ("rm2s_confidence_b1f16", "rm2s_stage2_input_f32")
        image = _photo(seed=26)
        assert np.abs(remover.remove(image) - Remover.load(export).remove(image)).mean() < 0.01
    assert kernel_names(np.float32, np.float16) == ("rm2s_confidence_f32", "rm2s_stage2_input_f16")
    with pytest.raises(ModelError, match="float32 or float16"):
        kernel_names(np.int8, np.float32)


def test_tensorrt_bad_engines(fake_trt, tmp_path):
    import sys

    export = fake_trt(tmp_path / "corrupt", content=b"garbage")
    with pytest.raises(ModelError, match="could not deserialize"):
        Remover.load(export, backend="tensorrt")
    export = fake_trt(tmp_path / "old", built_with="8.6.1")
    with pytest.raises(ModelError, match="built with TensorRT 8.6.1"):
        Remover.load(export, backend="tensorrt")
    export = fake_trt(tmp_path / "missing")
    (export / "stage2.engine").unlink()
    with pytest.raises(ModelError, match="dereflect export engine"):
        Remover.load(export, backend="tensorrt")
    sys.modules["tensorrt"].__version__ = "8.4.3"
    with pytest.raises(ModelError, match="too old"):
        Remover.load(fake_trt(tmp_path / "v84"), backend="tensorrt")


def test_tensorrt_shape_outside_profile(fake_trt, tmp_path):
    from dereflect.backends.tensorrt import TensorRTRunner

    export = fake_trt(tmp_path / "trt")
    runner = TensorRTRunner(export / "stage1.engine").activate()
    with pytest.raises(InputError, match="outside the engine's profile"):
        runner.infer({"image": np.zeros((1, 3, 600, 600), np.float32)})
    # The pipeline never asks for more (it scales to the profile's maximum) nor for less (it pads).
    with Remover.load(export, backend="tensorrt", max_side=None) as remover:
        assert remover.min_hw == (8, 8) and remover.max_hw == (512, 512)
        assert remover.remove(_photo(600, 700, seed=3)).shape == (600, 700, 3)
        tiny = _photo(5, 30, seed=4)
        result = remover.remove_with_intermediates(tiny)
        assert result.background.shape == tiny.shape and result.confidence.shape == (5, 30)


def _real_tensorrt():
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _real_tensorrt(), reason="TensorRT/pycuda not installed")
def test_tensorrt_real_engine_missing_is_explained(tmp_path):
    export = make_rm2s_export(tmp_path / "real")
    with pytest.raises(ModelError, match="dereflect export engine"):
        Remover.load(export, backend="tensorrt")


# -- PyTorch backend ----------------------------------------------------------------------

def test_torch_backend_on_cpu(rm2s_dir):
    torch = pytest.importorskip("torch")

    class Square(torch.nn.Module):
        def forward(self, x):
            return x * x

    conv = torch.nn.Conv2d(9, 3, 1, bias=False)
    weight = np.zeros((3, 9, 1, 1), np.float32)
    for c in range(3):
        weight[c, c], weight[c, 3 + c], weight[c, 6 + c] = 0.5, 0.25, 0.25
    conv.weight.data = torch.from_numpy(weight)
    remover = Remover.load(rm2s_dir, backend="torch", device="cpu",
                           modules={"stage1": Square(), "stage2": conv})
    assert remover._device is None
    image = _photo(seed=30)
    np.testing.assert_allclose(remover.remove(image), Remover.load(rm2s_dir).remove(image), atol=1e-5)
    with pytest.raises(ModelError, match="checkpoint=PATH"):
        Remover.load(rm2s_dir, backend="torch", device="cpu")
    with pytest.raises(InputError, match="fp16"):
        Remover.load(rm2s_dir, backend="torch", device="cpu", precision="fp16",
                     modules={"stage1": Square(), "stage2": conv})


def test_torch_device_rm2s_path_on_cpu(rm2s_dir):
    """The single-device RM2S sequence (used on CUDA), run on the CPU with the torch middle step."""
    torch = pytest.importorskip("torch")
    from dereflect.backends.torch_backend import TorchDeviceExecutor, TorchRunner
    from dereflect.manifest import load_manifest
    from dereflect.methods.base import get_method

    class Square(torch.nn.Module):
        def forward(self, x):
            return x * x

    conv = torch.nn.Conv2d(9, 3, 1, bias=False)
    weight = torch.zeros(3, 9, 1, 1)
    for c in range(3):
        weight[c, c], weight[c, 3 + c], weight[c, 6 + c] = 0.5, 0.25, 0.25
    conv.weight.data = weight
    stage1 = TorchRunner(Square(), ["image"], ["background"], device="cpu").activate()
    stage2 = TorchRunner(conv, ["stage2_input"], ["background"], device="cpu").activate()
    manifest = load_manifest(rm2s_dir)
    executor = TorchDeviceExecutor(manifest, {"stage1": stage1, "stage2": stage2}, use_cupy=False)
    assert executor.middle_step_kind == "torch"
    image = _photo(seed=32)
    method = get_method("rm2s")
    out = executor.run(method, image, method.settings(manifest.settings)).background
    np.testing.assert_allclose(out, Remover.load(rm2s_dir).remove(image, colour_order="RGB"), atol=1e-5)


def test_torch_backend_from_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from dereflect.manifest import sha256_file
    from dereflect.train.checkpoint import save_checkpoint

    networks = tiny_rm2s_networks()
    path = save_checkpoint(tmp_path / "rm2s.safetensors", method="rm2s", kind="stage2", networks=networks)
    export = make_rm2s_export(tmp_path / "export")
    manifest = dereflect.manifest.load_manifest(export)
    manifest.checkpoint = {"sha256": sha256_file(path)}
    manifest.save()

    image = _photo(30, 44, seed=31)
    remover = Remover.load(export, backend="torch", device="cpu", checkpoint=path)
    result = remover.remove_with_intermediates(image, colour_order="RGB")
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
        # The tiny U-Net has stride 4: 30 x 44 is edge-padded to 32 x 44, as the ONNX graphs do.
        assert networks["stage1"][2].stride == 4
        padded = torch.nn.functional.pad(x, (0, 0, 0, 32 - 30), mode="replicate")
        stage1 = networks["stage1"][2](padded)[..., :30, :44]
    np.testing.assert_allclose(result.stage1, stage1[0].numpy().transpose(1, 2, 0), atol=1e-5)
    assert result.background.shape == image.shape and np.isfinite(result.background).all()

    other = tmp_path / "other.safetensors"
    other.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(ModelError, match="not the checkpoint this export was made from"):
        Remover.load(export, backend="torch", device="cpu", checkpoint=other)
    # A checkpoint opened as the model is its own checkpoint: a second one (or the same again) is refused.
    for options in ({"checkpoint": path}, {"checkpoint": other}, {"verify_checkpoint": True}):
        with pytest.raises(InputError, match="training checkpoint, opened as the model itself"):
            Remover.load(path, device="cpu", **options)


def test_cli_refuses_checkpoint_beside_a_checkpoint_model(cli, tmp_path, capsys):
    pytest.importorskip("torch")
    from dereflect.train.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "rm2s.safetensors", method="rm2s", kind="stage2", networks=tiny_rm2s_networks())
    source = _write_png(tmp_path / "in" / "a.png")
    assert cli(["remove", str(source), "-o", str(tmp_path / "out.png"), "--model", str(path),
                "--checkpoint", str(path), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "leave out checkpoint" in err
    assert not (tmp_path / "out.png").exists()


def test_the_runtime_refuses_an_engine_changed_after_it_was_built(fake_trt, tmp_path):
    """The runtime applies the same engine check as export verify: sidecar, versions and the engine's hash."""
    from dereflect.trt_api import engine_paths

    export = fake_trt(tmp_path / "trt")
    engine, _ = engine_paths(export, "stage2")
    with Remover.load(export, backend="tensorrt") as remover:
        assert remover.remove(_photo(seed=5)).shape == (40, 56, 3)
    engine.write_bytes(engine.read_bytes() + b"tampered")
    with pytest.raises(ModelError, match="does not match the SHA-256 in its sidecar"):
        Remover.load(export, backend="tensorrt")


def test_unknown_backend_options_are_refused_with_the_ones_it_takes(rm2s_dir):
    with pytest.raises(InputError, match=r"no option\(s\) threadz \(did you mean threads\?\): the Remover takes "
                                         r"backend, max_side, .*strength, and the onnxruntime backend device, "
                                         r"precision, threads"):
        Remover.load(rm2s_dir, threadz=2)
    # A misspelt option of the Remover's own is named as such, not as a backend's.
    with pytest.raises(InputError, match=r"strenght \(did you mean strength\?\)"):
        Remover.load(rm2s_dir, strenght=1.5)
    with pytest.raises(InputError, match="no option"):
        Remover.load(rm2s_dir, backend="onnxruntime", checkpoint="x.safetensors")
    with pytest.raises(InputError, match="threads must be a positive integer"):
        Remover.load(rm2s_dir, threads=0)


def test_a_remover_is_not_pickled_or_copied_but_says_how_to_share_it(rm2s_dir):
    import copy
    import pickle

    with Remover.load(rm2s_dir) as remover:
        for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="cannot be pickled or copied: load a Remover in each process"):
                attempt(remover)


def test_process_refuses_what_is_not_a_float_rgb_frame(rm2s_dir):
    """process() is the fast path without conversions: a uint8 or grey frame is refused, not misread."""
    with Remover.load(rm2s_dir) as remover:
        for bad, shown in ((np.full((40, 56, 3), 200, np.uint8), "uint8 40x56x3"),
                           (np.zeros((40, 56), np.float32), "float32 40x56"), ([[0.5]], "list")):
            with pytest.raises(InputError, match=rf"HxWx3 float32 RGB frame in \[0, 1\], not {shown} "):
                remover.process(bad)
        assert remover.process(np.full((40, 56, 3), 0.5, np.float32)).background.shape == (40, 56, 3)


def test_bench_times_the_calls_remove_makes(rm2s_dir, crrn_dir, monkeypatch):
    """bench and Remover.remove run the same method sequence on the same executor: the same calls."""
    from dereflect.backends.base import HostExecutor
    from dereflect.tools.bench import BenchPipeline

    calls = []
    for name in ("upload", "network", "clip", "middle_step", "download"):
        original = getattr(HostExecutor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, args[0] if _name == "network" else None))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(HostExecutor, name, spy)
    for directory in (rm2s_dir, crrn_dir):
        image = _photo(seed=9)
        remover = Remover.load(directory)
        calls.clear()
        expected = remover.remove(image, colour_order="RGB")
        through_remove = list(calls)
        pipeline = BenchPipeline(directory)
        calls.clear()
        layers = pipeline.run(image, pipeline.timer())
        assert calls == through_remove and len(calls) >= 3
        np.testing.assert_allclose(layers.background, expected, atol=1e-6)
    assert ("middle_step", None) in through_remove or ("network", "crrn") in through_remove


def test_an_export_made_before_the_restructure_still_loads_and_runs(tmp_path):
    """tests/old_manifest_rm2s.json is the manifest the previous exporter wrote for the earlier bundled
    rm2s-lite (its checkpoint metadata trimmed), laid over the toy networks with their hashes."""
    import json

    from dereflect.manifest import sha256_file

    directory = make_rm2s_export(tmp_path / "old")
    text = (Path(__file__).parent / "old_manifest_rm2s.json").read_text()
    for name in ("stage1", "stage2"):
        text = text.replace(f"SHA_{name}", sha256_file(directory / f"{name}.onnx"))
    (directory / "manifest.json").write_text(text)
    old = json.loads(text)
    assert "max_side" not in old and old["middle_step"]["epsilon"] == 1e-7
    remover = Remover.load(directory)
    assert remover.settings.gradient_threshold == 1.0 and remover.max_hw == (1024, 1024)
    image = _photo(seed=12)
    np.testing.assert_allclose(remover.remove(image, colour_order="RGB"), _expected(image)[0], atol=2e-3)


# -- an integrator's mistakes and edge cases ------------------------------------------------------

def test_batch_takes_a_generator(remover):
    images = [_photo(seed=s) for s in range(3)]
    outs = remover.remove_batch(image for image in images)  # read twice inside: it must not come back empty
    assert len(outs) == 3
    for out, image in zip(outs, images):
        np.testing.assert_allclose(out, remover.remove(image), atol=1e-6)
    with pytest.raises(InputError, match="list of images"):
        remover.remove_batch(5)


def test_a_closed_remover_says_so(rm2s_dir):
    remover = Remover.load(rm2s_dir)
    image = _photo()
    with remover:
        remover.remove(image)
    assert "closed" in repr(remover)
    for call in (lambda: remover.remove(image), lambda: remover.remove_batch([image, image]),
                 lambda: remover.remove_with_intermediates(image)):
        with pytest.raises(InputError, match="is closed"):
            call()
    assert not any(runner.is_active for runner in remover._host.runners.values())  # nothing loaded again
    remover.close()  # closing twice is harmless


def test_wrong_types_get_clear_errors(rm2s_dir):
    from dereflect.temporal import VideoSession

    with pytest.raises(InputError, match="Remover.load"):
        Remover("crrn-lite")
    for model in (123, b"crrn-lite"):
        with pytest.raises(InputError, match="bundled model's name"):
            Remover.load(model)
    with pytest.raises(InputError, match="takes a Remover"):
        VideoSession("crrn-lite")
    for side in (2.5, 1, 31, -4, "big", True):
        with pytest.raises(InputError, match="max_side"):
            Remover.load(rm2s_dir, max_side=side)
    assert Remover.load(rm2s_dir, max_side=np.int64(32)).max_hw == (32, 32)
    assert Remover.load(rm2s_dir, strength=-0.0).strength == 0.0 and "-0" not in repr(
        Remover.load(rm2s_dir, strength=-0.0))


def test_middle_step_overrides_are_input_errors(rm2s_dir):
    for value, message in ((-1, r"c1 must lie in \[0, 1\], got -1"), (float("nan"), "finite"), ("0.3", "finite")):
        with pytest.raises(InputError, match=message):
            Remover.load(rm2s_dir, c1=value)
    assert Remover.load(rm2s_dir, c1=np.float32(0.25), c2=np.int64(1)).settings.c1 == 0.25


def test_an_export_may_keep_only_its_fp16_files(tmp_path):
    import shutil

    from dereflect.models import bundled_model_dir

    full = bundled_model_dir("crrn-lite")
    fp16_only = Path(shutil.copytree(full, tmp_path / "crrn-lite"))
    (fp16_only / "crrn.onnx").unlink()
    image = (_photo(48, 64) * 255).astype(np.uint8)
    expected = Remover.load(full, precision="fp16", threads=1).remove(image)
    np.testing.assert_array_equal(Remover.load(fp16_only, precision="fp16", threads=1).remove(image), expected)
    with pytest.raises(ModelError, match="--precision fp16"):
        Remover.load(fp16_only)  # FP32 by default on a CPU: the error says how to run what is there
    (fp16_only / "crrn.fp16.onnx").write_bytes(b"changed")
    with pytest.raises(ModelError, match="SHA-256"):  # what is there is still checked
        Remover.load(fp16_only, precision="fp16")
    (fp16_only / "crrn.fp16.onnx").unlink()
    with pytest.raises(ModelError, match="missing"):
        Remover.load(fp16_only, precision="fp16")


def test_video_sessions_on_one_remover_share_its_strength(rm2s_dir):
    import dereflect

    remover = Remover.load(rm2s_dir)
    first, second = dereflect.VideoSession(remover), dereflect.VideoSession(remover)
    first.strength = 0.5
    assert second.strength == 0.5 == remover.strength


def test_tiles_report_their_progress(crrn_dir):
    image = _photo(100, 150)
    calls = []
    tiled = Remover.load(crrn_dir, max_side=64, large_image="tile")
    out = tiled.remove(image, colour_order="RGB", progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_allclose(out, tiled.remove(image, colour_order="RGB"))
    total = calls[-1][1]
    assert total > 1 and calls == [(done, total) for done in range(1, total + 1)]
    assert tiled.remove_with_intermediates(image, colour_order="RGB", progress=lambda *a: calls.append(a)).tiles \
        == total and len(calls) == 2 * total
    calls.clear()
    Remover.load(crrn_dir, max_side=64).remove(image, progress=lambda *a: calls.append(a))  # guided: one pass
    Remover.load(crrn_dir, max_side=0).remove(image, progress=lambda *a: calls.append(a))
    assert calls == []



def test_cli_shows_a_bar_over_tiles_on_a_terminal(cli, crrn_dir, tmp_path, monkeypatch):
    source = tmp_path / "big.png"
    cv2.imwrite(str(source), (_photo(100, 150) * 255).astype(np.uint8))
    args = ["remove", str(source), "--model", str(crrn_dir), "--max-side", "64", "--large-image", "tile"]
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cli(args + ["-o", str(tmp_path / "a.png")]) == 0
    assert "tile" in terminal.getvalue() and "big.png" in terminal.getvalue()
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    assert cli(args + ["-o", str(tmp_path / "b.png"), "-q"]) == 0
    assert "tile" not in quiet.getvalue()


def test_a_failed_imread_is_named(remover):
    with pytest.raises(InputError, match="cv2.imread gives None"):
        remover.remove(cv2.imread("/nonexistent/photo.jpg"))


def test_a_frame_within_one_strip_is_converted_once(crrn_dir, monkeypatch):
    import dereflect.remover as remover_module

    calls = []
    convert = remover_module.rgb_rows
    monkeypatch.setattr(remover_module, "rgb_rows", lambda *a, **k: calls.append(a[2:]) or convert(*a, **k))
    frame = (_photo(120, 160) * 255).astype(np.uint8)
    remover = Remover.load(crrn_dir, max_side=64, strength=1.5)  # downscale, upsampling, strength: 3 reads
    whole = remover.remove(frame)
    assert len(calls) == 1
    monkeypatch.setattr(remover_module, "STRIP_PIXELS", 3000)  # in strips: each read converts its own rows
    calls.clear()
    # (OpenCV's resize with Intel IPP and the strips' own arithmetic differ in the last float digits.)
    assert np.abs(remover.remove(frame).astype(int) - whole).max() <= 1
    assert len(calls) > 3


def test_background_of_is_process_without_the_reflection_layer(crrn_dir):
    with Remover.load(crrn_dir) as remover:
        rgb = np.random.default_rng(3).random((40, 56, 3), dtype=np.float32)
        layers = remover.process(rgb)
        np.testing.assert_array_equal(remover.background_of(rgb), layers.background)
        np.testing.assert_allclose(layers.reflection, rgb - layers.background)
        with pytest.raises(InputError, match="HxWx3 float32 RGB frame"):
            remover.background_of(rgb.astype(np.float64))

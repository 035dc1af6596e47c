"""The RM2S middle step: NumPy reference vs OpenCV, scikit-learn, brute force, the CPU path and torch."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
from dereflect.errors import InputError
from dereflect.middle_step.cpu import middle_step_cpu
from dereflect.middle_step.reference import (
    HISTOGRAM_BINS,
    LUMA,
    MiddleStepResult,
    confidence_map,
    edge_masks,
    gray,
    histogram_bin_index,
    middle_step_reference,
    sobel_magnitude,
    sobel_xy,
    stage2_input,
    two_means_objective,
    two_means_threshold,
    two_means_threshold_histogram,
)


def synthetic_pair(rng: np.random.Generator, h: int, w: int, noise: float = 0.0):
    """A photo-like (image, stage-1 estimate): sharp background shapes plus a blurred reflection."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    background = np.stack([0.3 + 0.4 * xx, 0.2 + 0.5 * yy, 0.4 + 0.2 * xx * yy], axis=2)
    reflection = np.zeros((h, w, 3), np.float32)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        y1, x1 = y0 + rng.integers(3, h // 2 + 4), x0 + rng.integers(3, w // 2 + 4)
        background[y0:y1, x0:x1] = rng.random(3)
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(h, w) // 3)
        reflection[(yy * max(h, w) - cy) ** 2 + (xx * max(h, w) - cx) ** 2 < r * r] += rng.random(3) * 0.6
    reflection = cv2.GaussianBlur(reflection, (0, 0), 1.0)
    image = np.clip(0.8 * background + reflection, 0, 1).astype(np.float32)
    stage1 = 0.8 * background + 0.1 * reflection + noise * rng.standard_normal((h, w, 3))
    return image, np.clip(stage1, 0, 1).astype(np.float32)


def sse(values: np.ndarray, low: float, high: float) -> float:
    return two_means_objective(values, low, high)


# ---- Sobel and confidence --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 53), (64, 48), (1, 1), (1, 7), (6, 1), (2, 3), (4, 4)])
def test_sobel_matches_opencv(shape):
    g = np.random.default_rng(1).random(shape, dtype=np.float32)
    gx, gy = sobel_xy(g)
    ref_x = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=5)
    ref_y = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=5)
    scale = max(1.0, float(np.abs(ref_x).max()), float(np.abs(ref_y).max()))
    np.testing.assert_allclose(gx, ref_x, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(gy, ref_y, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(sobel_magnitude(g), cv2.magnitude(ref_x, ref_y), rtol=1e-4, atol=1e-6 * scale)


def test_sobel_taps_and_flat_regions():
    # A unit impulse reproduces the 5x5 kernel (correlation: kernel mirrored around the pixel).
    g = np.zeros((9, 9), np.float32)
    g[4, 4] = 1.0
    gx, gy = sobel_xy(g)
    kernel_x = np.outer([1, 4, 6, 4, 1], [-1, -2, 0, 2, 1])
    np.testing.assert_array_equal(gx[2:7, 2:7], kernel_x[::-1, ::-1])
    np.testing.assert_array_equal(gy[2:7, 2:7], kernel_x.T[::-1, ::-1])
    # Flat input gives exactly zero, whatever the value (G_B is divided by G_B + 1e-7).
    flat = np.full((7, 11), 0.3137, np.float32)
    assert not np.any(sobel_magnitude(flat))


def test_gray_weights():
    img = np.random.default_rng(2).random((5, 6, 3), dtype=np.float32)
    expected = img @ np.array(LUMA, np.float32)
    np.testing.assert_allclose(gray(img), expected, rtol=1e-6)
    assert gray(img).dtype == np.float32


def test_confidence_map_definition():
    rng = np.random.default_rng(3)
    image, stage1 = synthetic_pair(rng, 40, 56)
    conf, mask = confidence_map(image, stage1)
    assert conf.dtype == np.float32 and mask.dtype == bool and conf.shape == mask.shape == (40, 56)
    g_i = sobel_magnitude(gray(image))
    g_b = sobel_magnitude(gray(stage1))
    g_r = sobel_magnitude(gray(image) - gray(stage1))
    np.testing.assert_array_equal(mask, g_i > 1)
    expected = np.log(g_r.astype(np.float64) / (g_b.astype(np.float64) + 1e-7) + 1) * mask
    np.testing.assert_allclose(conf, expected, rtol=1e-5, atol=1e-6)
    assert np.all(conf[~mask] == 0) and np.all(conf >= 0)
    # A strong edge over a flat stage-1 estimate: G_B = 0 exactly, so C = log(G_R / 1e-7 + 1).
    step = np.zeros((9, 9, 3), np.float32)
    step[:, 4:] = 1.0
    conf, mask = confidence_map(step, np.full_like(step, 0.5))
    g_r = sobel_magnitude(gray(step))
    np.testing.assert_allclose(conf[mask], np.log1p(g_r[mask] / np.float32(1e-7)), rtol=1e-6)
    assert conf.max() > 18


def test_confidence_map_validates_inputs():
    img = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(InputError, match="HxWx3"):
        confidence_map(img[..., 0], img[..., 0])
    with pytest.raises(InputError, match="same shape"):
        confidence_map(img, np.zeros((8, 9, 3), np.float32))
    bad = img.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        confidence_map(img, bad)
    with pytest.raises(InputError, match="float"):
        confidence_map(img.astype(np.uint8), img.astype(np.uint8))


# ---- exact 2-means -----------------------------------------------------------------------


def test_two_means_matches_brute_force():
    rng = np.random.default_rng(4)
    for n in range(2, 11):
        for _ in range(5):
            v = rng.choice(rng.random(n) * 3 + 0.01, size=n)  # repeated values included
            low, high = two_means_threshold(v)
            best = np.inf
            for bits in itertools.product([0, 1], repeat=n):
                side = np.array(bits, bool)
                if side.all() or not side.any():
                    continue
                a, b = v[side], v[~side]
                best = min(best, ((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum())
            if np.unique(v).size == 1:
                assert low == high == pytest.approx(v[0])
            else:
                assert low < high
                assert sse(v, low, high) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_two_means_against_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(5)
    maps = []
    for _ in range(12):
        conf = np.zeros(700)
        k = rng.integers(50, 700)
        low_part = rng.lognormal(rng.normal(-1, 0.5), 0.5, k // 2)
        conf[:k] = np.concatenate([low_part, rng.gamma(2, 3, k - k // 2)])
        maps.append(conf)
    for seed in range(6):
        image, stage1 = synthetic_pair(np.random.default_rng(seed), 48, 64, noise=0.01 * (seed % 2))
        maps.append(confidence_map(image, stage1)[0].ravel().astype(np.float64))
    matched = 0
    for conf in maps:
        v = conf[conf != 0]
        low, high = two_means_threshold(conf)
        # One thread: OpenMP start-up on a shared machine costs more than these tiny fits.
        with threadpoolctl.threadpool_limits(1):
            km = sklearn_cluster.KMeans(n_clusters=2, n_init=10, random_state=0).fit(v[:, None])
        ours, theirs = sse(v, low, high), float(km.inertia_)
        assert ours <= theirs * (1 + 1e-9) + 1e-12
        if theirs <= ours * (1 + 1e-9):
            matched += 1
            np.testing.assert_allclose(sorted(km.cluster_centers_.ravel()), [low, high], rtol=1e-6)
    # Lloyd finds the global optimum on most of these maps; then the centres agree.
    assert matched >= len(maps) // 2


def test_two_means_degenerate_inputs():
    assert two_means_threshold(np.zeros((5, 5), np.float32)) == (0.0, 0.0)
    assert two_means_threshold(np.zeros(0)) == (0.0, 0.0)
    one = np.zeros((5, 5), np.float32)
    one[2, 3] = 2.5
    assert two_means_threshold(one) == (2.5, 2.5)
    same = np.where(np.eye(6) > 0, 1.75, 0).astype(np.float32)
    assert two_means_threshold(same) == (1.75, 1.75)
    assert two_means_threshold_histogram(same) == (1.75, 1.75)
    assert two_means_threshold_histogram(np.zeros(4)) == (0.0, 0.0)
    # Degenerate centres give empty masks on the maps they come from.
    for conf in (np.zeros((6, 6), np.float32), same):
        mb, mr = edge_masks(conf, *two_means_threshold(conf))
        assert not mb.any() and not mr.any()
    two = np.array([0, 1.0, 0, 3.0])
    assert two_means_threshold(two) == (1.0, 3.0)
    with pytest.raises(InputError, match="NaN"):
        two_means_threshold(np.array([1.0, np.nan]))


# ---- histogram 2-means ------------------------------------------------------------------


def test_histogram_binning():
    v = np.array([1e-6, 0.5, 0.999, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(histogram_bin_index(v, 1.0, 4), [0, 2, 3, 3, 3])
    v = np.random.default_rng(9).random(1000, dtype=np.float32)
    idx = histogram_bin_index(v, v.max(), 64)
    assert idx.min() == 0 and idx.max() == 63 and idx[np.argmax(v)] == 63
    np.testing.assert_array_equal(np.bincount(idx, minlength=64), np.histogram(v, 64, (0, v.max()))[0])


def test_histogram_threshold_within_one_bin():
    rng = np.random.default_rng(6)
    mixture = np.concatenate([rng.normal(1, 0.2, 3000), rng.normal(6, 1, 800)]).clip(1e-3)
    maps = [rng.gamma(2, 2, 5000), mixture]
    for seed in range(4):
        image, stage1 = synthetic_pair(np.random.default_rng(seed), 64, 64, noise=0.01 * (seed % 2))
        maps.append(confidence_map(image, stage1)[0])
    for conf in maps:
        for bins in (HISTOGRAM_BINS, 256, 64):
            low, high = two_means_threshold(conf)
            h_low, h_high = two_means_threshold_histogram(conf, bins=bins)
            v = np.asarray(conf).ravel()
            v = v[v != 0]
            width = v.max() / bins
            # Contract: decision boundary within one bin; objective within 2 w (high - low) n_bin.
            assert abs((h_low + h_high) / 2 - (low + high) / 2) <= width * (1 + 1e-6)
            boundary_bin = histogram_bin_index(np.float32((low + high) / 2), v.max(), bins)
            n_bin = np.count_nonzero(histogram_bin_index(v, v.max(), bins) == boundary_bin)
            assert sse(v, h_low, h_high) <= sse(v, low, high) + 2 * width * (high - low) * n_bin + 1e-9
            if bins == HISTOGRAM_BINS:
                assert h_low == pytest.approx(low, rel=1e-2) and h_high == pytest.approx(high, rel=1e-2)


def test_histogram_centres_are_exact_means():
    v = np.array([1.0, 1.1, 1.2, 5.0, 5.5], np.float32)
    assert two_means_threshold_histogram(v, bins=16) == pytest.approx((1.1, 5.25))
    with pytest.raises(InputError):
        two_means_threshold_histogram(v, bins=0)


# ---- masks, stage-2 input, whole step --------------------------------------------------


def test_edge_masks_and_stage2_input():
    conf = np.array([[0.0, 0.5, 1.0], [2.0, 2.9, 3.5]], np.float32)
    mb, mr = edge_masks(conf, 1.0, 3.0)
    np.testing.assert_array_equal(mb, [[False, True, True], [False, False, False]])
    np.testing.assert_array_equal(mr, [[False, False, False], [False, True, True]])
    mb2, mr2 = edge_masks(conf, 1.0, 3.0, c1=0.2, c2=0.8)
    np.testing.assert_array_equal(mb2, [[False, True, True], [True, False, False]])
    np.testing.assert_array_equal(mr2, [[False, False, False], [False, True, True]])
    img = np.random.default_rng(7).random((2, 3, 3), dtype=np.float32)
    z = stage2_input(img, mb, mr)
    assert z.shape == (2, 3, 9) and z.dtype == np.float32
    np.testing.assert_array_equal(z[..., :3], img)
    np.testing.assert_array_equal(z[..., 3:6], img * mb[..., None])
    np.testing.assert_array_equal(z[..., 6:], img * mr[..., None])


def test_middle_step_reference_pieces():
    image, stage1 = synthetic_pair(np.random.default_rng(8), 37, 53)
    result = middle_step_reference(image, stage1, c1=0.2, c2=0.8)
    assert isinstance(result, MiddleStepResult)
    conf, mask = confidence_map(image, stage1)
    np.testing.assert_array_equal(result.confidence, conf)
    np.testing.assert_array_equal(result.gradient_mask, mask)
    assert (result.low, result.high) == two_means_threshold(conf)
    mb, mr = edge_masks(conf, result.low, result.high, 0.2, 0.8)
    np.testing.assert_array_equal(result.mask_background, mb)
    np.testing.assert_array_equal(result.mask_reflection, mr)
    assert mb.any() and mr.any() and not (mb & mr).any()
    np.testing.assert_array_equal(result.stage2_input, stage2_input(image, mb, mr))


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (3, 2), (64, 48)])
def test_flat_images_give_empty_masks(shape):
    image = np.full(shape + (3,), 0.4, np.float32)
    result = middle_step_reference(image, image)
    assert not result.confidence.any() and not result.gradient_mask.any()
    assert (result.low, result.high) == (0.0, 0.0)
    assert not result.mask_background.any() and not result.mask_reflection.any()
    assert np.all(np.isfinite(result.stage2_input))


def _assert_same_step(fast: MiddleStepResult, ref: MiddleStepResult, image: np.ndarray, c1: float, c2: float):
    """Same step up to rounding: masks may differ only within float tolerance of a threshold."""
    g_i = sobel_magnitude(gray(image))
    near_edge = np.abs(g_i - 1.0) < 1e-4
    assert np.all((fast.gradient_mask == ref.gradient_mask) | near_edge)
    both = fast.gradient_mask & ref.gradient_mask
    np.testing.assert_allclose(fast.confidence[both], ref.confidence[both], atol=1e-4, rtol=1e-4)
    assert fast.low == pytest.approx(ref.low, rel=1e-4, abs=1e-6)
    assert fast.high == pytest.approx(ref.high, rel=1e-4, abs=1e-6)
    spread = ref.high - ref.low
    tol = 1e-4 * max(1.0, ref.high)
    near = np.zeros_like(near_edge)
    for t in (ref.low + c2 * spread, ref.high - c1 * spread, 0.0):
        near |= np.abs(ref.confidence - t) < tol
    near |= near_edge
    assert np.all((fast.mask_background == ref.mask_background) | near)
    assert np.all((fast.mask_reflection == ref.mask_reflection) | near)
    np.testing.assert_array_equal(fast.stage2_input[..., :3], image)
    agree = ~near[..., None]
    np.testing.assert_array_equal(np.where(agree, fast.stage2_input, 0), np.where(agree, ref.stage2_input, 0))


@pytest.mark.parametrize(
    "seed,shape,noise,c", [(0, (37, 53), 0.0, (0.5, 0.5)), (1, (48, 64), 0.01, (0.2, 0.8))]
)
def test_middle_step_cpu_matches_reference(seed, shape, noise, c):
    image, stage1 = synthetic_pair(np.random.default_rng(seed), *shape, noise=noise)
    ref = middle_step_reference(image, stage1, *c)
    fast = middle_step_cpu(image, stage1, *c)
    assert fast.stage2_input.shape == shape + (9,) and fast.stage2_input.dtype == np.float32
    _assert_same_step(fast, ref, image, *c)
    hist = middle_step_cpu(image, stage1, *c, threshold="histogram")
    low, high = two_means_threshold_histogram(ref.confidence)
    assert hist.low == pytest.approx(low, rel=1e-4) and hist.high == pytest.approx(high, rel=1e-4)


def test_middle_step_cpu_edge_cases():
    flat = np.full((5, 7, 3), 0.25, np.float32)
    result = middle_step_cpu(flat, flat, threshold="histogram")
    assert not result.mask_background.any() and not result.mask_reflection.any()
    dot = np.zeros((9, 9, 3), np.float32)
    dot[4, 4] = 1.0
    result = middle_step_cpu(dot, np.zeros_like(dot))
    ref = middle_step_reference(dot, np.zeros_like(dot))
    _assert_same_step(result, ref, dot, 0.5, 0.5)
    with pytest.raises(InputError, match="threshold"):
        middle_step_cpu(flat, flat, threshold="kmeans")
    with pytest.raises(InputError):
        middle_step_cpu(flat, flat[:4])


# ---- torch (training) ------------------------------------------------------------------


def test_torch_matches_numpy_on_a_batch():
    torch = pytest.importorskip("torch")
    from dereflect.middle_step.torch_ops import (
        confidence_map_torch,
        edge_masks_torch,
        ground_truth_masks_torch,
        stage2_input_from_masks,
        stage2_input_torch,
        two_means_threshold_torch,
    )

    pairs = [synthetic_pair(np.random.default_rng(s), 37, 53, noise=0.01 * s) for s in range(3)]
    images = np.stack([p[0] for p in pairs])
    stage1 = np.stack([p[1] for p in pairs])

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    conf, mask = confidence_map_torch(nchw(images), nchw(stage1))
    assert conf.shape == (3, 1, 37, 53) and conf.dtype == torch.float32 and mask.dtype == torch.bool
    low, high = two_means_threshold_torch(conf)
    mb, mr = edge_masks_torch(conf, low, high, 0.2, 0.8)
    z = stage2_input_torch(nchw(images), nchw(stage1), c1=0.2, c2=0.8)
    assert z.shape == (3, 9, 37, 53)
    for i in range(3):
        ref = middle_step_reference(images[i], stage1[i], 0.2, 0.8)
        np.testing.assert_array_equal(mask[i, 0].numpy(), ref.gradient_mask)
        np.testing.assert_allclose(conf[i, 0].numpy(), ref.confidence, rtol=1e-6, atol=1e-6)
        assert low[i].item() == pytest.approx(ref.low, rel=1e-6)
        assert high[i].item() == pytest.approx(ref.high, rel=1e-6)
        np.testing.assert_array_equal(mb[i, 0].numpy(), ref.mask_background)
        np.testing.assert_array_equal(mr[i, 0].numpy(), ref.mask_reflection)
        np.testing.assert_array_equal(z[i].numpy().transpose(1, 2, 0), ref.stage2_input)

    # Degenerate rows in the same batch: all-zero map and a single distinct value.
    degenerate = torch.zeros(2, 1, 4, 5)
    degenerate[1, 0, 1:3, 2] = 0.75
    low, high = two_means_threshold_torch(degenerate)
    assert low.tolist() == [0.0, 0.75] and high.tolist() == [0.0, 0.75]

    # No gradient reaches the masks; the image channels keep theirs.
    image_t = nchw(images).requires_grad_(True)
    stage1_t = nchw(stage1).requires_grad_(True)
    stage2_input_torch(image_t, stage1_t).sum().backward()
    assert stage1_t.grad is None
    with torch.no_grad():
        mb5, mr5 = edge_masks_torch(conf, *two_means_threshold_torch(conf))
        expected = 1 + mb5.float() + mr5.float()
    np.testing.assert_array_equal(image_t.grad.numpy(), expected.expand(-1, 3, -1, -1).numpy())

    # Training masks from the ground-truth layers.
    background = nchw(stage1)
    reflection = nchw(np.clip(images - stage1, 0, 1))
    gt_b, gt_r = ground_truth_masks_torch(nchw(images), background, reflection)
    for i in range(3):
        g_i = sobel_magnitude(gray(images[i]))
        g_b = sobel_magnitude(gray(stage1[i]))
        g_r = sobel_magnitude(gray(np.clip(images[i] - stage1[i], 0, 1)))
        np.testing.assert_array_equal(gt_b[i, 0].numpy(), (g_i > 0.5) & (g_b > g_r))
        np.testing.assert_array_equal(gt_r[i, 0].numpy(), (g_i > 0.5) & (g_r > g_b))
    assert gt_b.any() and gt_r.any() and not (gt_b & gt_r).any()
    z_gt = stage2_input_from_masks(nchw(images), gt_b, gt_r[:, 0])
    np.testing.assert_array_equal(z_gt[:, 3:6].numpy(), (nchw(images) * gt_b).numpy())
    with pytest.raises(InputError):
        confidence_map_torch(nchw(images)[:, :, :2], nchw(stage1)[:, :, :2])


# --- how the confidence map is shown ----------------------------------------------------------------------


def test_confidence_map_is_shown_one_way_scaled_to_the_99th_percentile_of_its_edges():
    """NAME.confidence.png (remove --save-intermediates) and the eval contact sheet colour the map alike,
    and a few extreme ratios do not leave every other edge dark."""
    import types

    from dereflect.cli_runtime import _intermediate_images
    from dereflect.tools.evaluate import confidence_colours

    def inferno(level: int) -> np.ndarray:
        return cv2.applyColorMap(np.full((1, 1), level, np.uint8), cv2.COLORMAP_INFERNO)[0, 0, ::-1]

    confidence = np.zeros((20, 30), np.float32)
    confidence[:, :15] = 1.0
    confidence[0, 0] = 1000.0  # one extreme ratio (G_B near zero)
    rgb = confidence_colours(confidence)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[10, 5], inferno(255))  # the edges at full scale, not near black
    np.testing.assert_array_equal(rgb[10, 20], inferno(0))  # no edge: black
    np.testing.assert_array_equal(confidence_colours(np.zeros((4, 4), np.float32)), np.broadcast_to(inferno(0),
                                                                                                    (4, 4, 3)))

    result = types.SimpleNamespace(stage1=None, confidence=confidence, mask_background=None, mask_reflection=None,
                                   gradient=None, reflection=np.zeros((20, 30, 3), np.float32))
    bgr = _intermediate_images(result)["confidence"]
    np.testing.assert_array_equal(bgr[:, :, ::-1], rgb)

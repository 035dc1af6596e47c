"""Losses (RM2S, WGAN, CRRN) and the SSIM / SI / PSNR metrics (NumPy and torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dereflect.errors import InputError
from dereflect.tools import metrics
from dereflect.train.losses import (
    CRRNLoss,
    FeatureReductionLoss,
    PerceptualLoss,
    RM2SStage1Loss,
    RM2SStage2Loss,
    clip_weights_,
    discriminator_loss,
    gradient_penalty,
    si_torch,
    ssim_torch,
)
from dereflect.train.vgg import DEFAULT_LAYERS, VGGFeatures, vgg_features

skimage_metrics = pytest.importorskip("skimage.metrics")


def _images(shape=(37, 45, 3), seed=0):
    """A smooth image with texture and a noisy, shifted-brightness copy (float64 in [0, 1])."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.3 * np.sin(6 * xx + 3 * yy)
    a = base[..., None] * np.ones(shape[2:] or (1,)) + 0.1 * rng.random((h, w) + (shape[2:] or (1,)))
    a = np.clip(a.reshape(shape), 0, 1)
    b = np.clip(a + 0.08 * rng.standard_normal(shape) + 0.05, 0, 1)
    return a, b


def _skimage_ssim(a, b, data_range=1.0, full=False):
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range, full=full)
    if a.ndim == 3:
        kw["channel_axis"] = -1
    return skimage_metrics.structural_similarity(a, b, **kw)


def _to_torch(x):
    x = x if x.ndim == 3 else x[..., None]
    return torch.from_numpy(x).permute(2, 0, 1)[None].float()


# ---------------------------------------------------------------- NumPy metrics


@pytest.mark.parametrize("shape", [(37, 45, 3), (40, 33)])
def test_numpy_ssim_matches_skimage(shape):
    a, b = _images(shape)
    ref = _skimage_ssim(a, b)
    assert 0.2 < ref < 0.99  # a real difference, not a trivial 1
    assert abs(metrics.ssim(a, b) - ref) < 1e-4
    _, full = _skimage_ssim(a, b, full=True)
    full = full.mean(axis=2) if full.ndim == 3 else full
    assert np.abs(metrics.ssim_map(a, b) - full).max() < 1e-4


def test_numpy_ssim_matches_skimage_on_uint8():
    a, b = _images((30, 30, 3), seed=3)
    a8 = (a * 255).round().astype(np.uint8)
    b8 = (b * 255).round().astype(np.uint8)
    ref = _skimage_ssim(a8.astype(np.float64), b8.astype(np.float64), data_range=255)
    assert abs(metrics.ssim(a8, b8, data_range=255) - ref) < 1e-4


def test_si_properties():
    a, b = _images()
    assert metrics.si(a, a) == pytest.approx(1.0, abs=1e-12)
    # SI measures structure only: a brightness shift leaves it at 1, unlike SSIM.
    shifted = a + 0.2
    assert metrics.si(a, shifted) == pytest.approx(1.0, abs=1e-9)
    assert metrics.ssim(a, shifted) < 0.95
    assert metrics.si(a, b) < 1.0
    assert metrics.si(a, b) >= metrics.ssim(a, b) - 0.05


def test_psnr_known_values():
    a = np.zeros((8, 8, 3))
    assert metrics.psnr(a, a + 0.1) == pytest.approx(20.0)
    assert metrics.psnr(a, a + 0.01) == pytest.approx(40.0)
    assert metrics.psnr(np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8), data_range=255) == 0.0
    assert metrics.psnr(a, a) == float("inf")
    with pytest.raises(InputError):
        metrics.psnr(a, a[:4])


def test_regional_metrics():
    a, _ = _images((40, 40, 3))
    b = a.copy()
    b[:, 25:] = np.clip(b[:, 25:] + 0.2 * np.random.default_rng(1).standard_normal(b[:, 25:].shape), 0, 1)
    left = np.zeros((40, 40), bool)
    left[:, :18] = True  # more than the window radius (5) away from the changed columns
    assert metrics.ssim_region(a, b, left) == pytest.approx(1.0, abs=1e-12)
    assert metrics.si_region(a, b, left) == pytest.approx(1.0, abs=1e-12)
    right = ~left
    assert metrics.ssim_region(a, b, right) < 0.9
    full = np.ones((40, 40), bool)
    assert metrics.ssim_region(a, b, full) == pytest.approx(metrics.ssim_map(a, b).mean())
    assert metrics.si_region(a, b, full[..., None]) == pytest.approx(metrics.si_map(a, b).mean())
    with pytest.raises(InputError, match="empty"):
        metrics.ssim_region(a, b, np.zeros((40, 40), bool))
    with pytest.raises(InputError, match="mask"):
        metrics.si_region(a, b, np.ones((20, 40), bool))


def test_metric_input_errors():
    a, b = _images((20, 20, 3))
    with pytest.raises(InputError, match="same shape"):
        metrics.ssim(a, b[:19])
    with pytest.raises(InputError, match="at least"):
        metrics.ssim(a[:8], b[:8])


def test_metrics_module_imports_no_torch():
    code = "import sys, dereflect.tools.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- torch SSIM / SI


@pytest.mark.parametrize("shape", [(37, 45, 3), (40, 33)])
def test_torch_ssim_si_match_numpy(shape):
    a, b = _images(shape)
    ta, tb = _to_torch(a), _to_torch(b)
    assert abs(ssim_torch(ta, tb).item() - metrics.ssim(a, b)) < 1e-4
    assert abs(si_torch(ta, tb).item() - metrics.si(a, b)) < 1e-4
    assert si_torch(ta, ta).item() == pytest.approx(1.0, abs=1e-5)


def test_torch_ssim_batch_reduction_and_half_inputs():
    a1, b1 = _images((32, 32, 3), seed=1)
    a2, b2 = _images((32, 32, 3), seed=2)
    x = torch.cat([_to_torch(a1), _to_torch(a2)])
    y = torch.cat([_to_torch(b1), _to_torch(b2)])
    per = ssim_torch(x, y, reduction="none")
    assert per.shape == (2,)
    assert abs(per[0].item() - metrics.ssim(a1, b1)) < 1e-4
    assert abs(per[1].item() - metrics.ssim(a2, b2)) < 1e-4
    assert ssim_torch(x, y).item() == pytest.approx(per.mean().item(), abs=1e-6)
    half = ssim_torch(x.half(), y.half())
    assert half.dtype == torch.float32 and abs(half.item() - per.mean().item()) < 1e-3
    with pytest.raises(InputError):
        ssim_torch(x, y, reduction="sum")
    with pytest.raises(InputError):
        ssim_torch(x[..., :8, :8], y[..., :8, :8])


def test_torch_ssim_is_differentiable():
    a, b = _images((24, 24, 3))
    x = _to_torch(b).requires_grad_(True)
    target = _to_torch(a)
    loss = 1 - ssim_torch(x, target)
    loss.backward()
    with torch.no_grad():
        stepped = x - 0.5 * x.grad / x.grad.abs().max() * 0.02
    assert ssim_torch(stepped, target) > 1 - loss.item()


# ---------------------------------------------------------------- RM2S losses


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    feats = vgg_features("vgg16")
    with torch.no_grad():
        # Zero-mean first filters and no biases: flat images give no activation, like trained edge filters.
        feats[0].weight -= feats[0].weight.mean(dim=(2, 3), keepdim=True)
        for m in feats:
            if isinstance(m, torch.nn.Conv2d):
                m.bias.zero_()
    return VGGFeatures(feats, "vgg16", layers=DEFAULT_LAYERS)


def _blur(x, k=5):
    w = torch.ones(3, 1, k, k) / (k * k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="replicate"), w, groups=3)


def test_perceptual_loss(vgg):
    x = torch.rand(2, 3, 32, 32)
    perc = PerceptualLoss(vgg, weight=2.0)
    assert perc(x, x).item() == 0.0
    out = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = perc(out, x)
    assert loss.item() > 0
    fo, fx = vgg(out), vgg(x)
    expected = 2.0 * sum(F.mse_loss(fo[n], fx[n]) for n in DEFAULT_LAYERS)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert out.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())
    with pytest.raises(InputError, match="conv5_3"):
        PerceptualLoss(vgg, layers=("conv5_3",))


def test_feature_reduction_drops_when_output_is_blurred(vgg):
    torch.manual_seed(1)
    sharp = (0.5 + 0.3 * torch.randn(2, 3, 32, 32)).clamp(0, 1)
    fr = FeatureReductionLoss(vgg)
    assert fr.layers == ("conv1_2", "conv2_2", "conv3_2")
    s, b = fr(sharp).item(), fr(_blur(sharp)).item()
    assert b < 0.7 * s
    assert fr(torch.full((1, 3, 32, 32), 0.4)).item() < 0.2 * s  # flat: only the zero-padded border responds


def test_stage1_total_and_single_vgg_pass_for_output(vgg):
    calls = []
    hook = vgg.register_forward_hook(lambda m, i, o: calls.append(i[0].requires_grad))
    try:
        loss = RM2SStage1Loss(vgg)
        target = torch.rand(2, 3, 32, 32)
        out = torch.rand(2, 3, 32, 32, requires_grad=True)
        total, terms = loss(out, target)
    finally:
        hook.remove()
    assert calls == [True, False]  # output once (shared by both terms), target once
    assert set(terms) == {"perceptual", "l1", "fr"}
    perc = PerceptualLoss(vgg)(out, target)
    fr = FeatureReductionLoss(vgg)(out)
    l1 = (out - target).abs().mean()
    assert total.item() == pytest.approx((3 * perc + 0.4 * l1 + 3 * fr).item(), rel=1e-5)
    assert terms["fr"].item() == pytest.approx(fr.item(), rel=1e-5)
    assert not terms["perceptual"].requires_grad
    total.backward()
    assert out.grad is not None


def test_stage2_generator_loss(vgg):
    loss = RM2SStage2Loss(vgg)
    target = torch.rand(1, 3, 32, 32)
    out = target.clone()
    low, terms = loss(out, target, torch.tensor([[2.0]]))
    high, _ = loss(out, target, torch.tensor([[-2.0]]))
    assert terms["perceptual"].item() == 0.0 and terms["adversarial"].item() == -2.0
    assert low.item() == pytest.approx(-0.1) and high.item() == pytest.approx(0.1)


def test_discriminator_loss_sign():
    d_real = torch.tensor([1.0, 3.0])
    d_fake = torch.tensor([0.0, -1.0])
    assert discriminator_loss(d_real, d_fake).item() == pytest.approx(-2.5)
    assert discriminator_loss(d_fake, d_real).item() == pytest.approx(2.5)


def test_clip_weights_bounds():
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 3))
    with torch.no_grad():
        critic[0].weight[0, 0, 0, 0] = 0.005
    clip_weights_(critic, 0.01)
    for p in critic.parameters():
        assert p.abs().max() <= 0.01
    assert critic[0].weight[0, 0, 0, 0].item() == pytest.approx(0.005)  # in-range values untouched
    assert critic[1].weight.abs().max().item() == pytest.approx(0.01)  # BN weights (1.0) clipped too


def test_gradient_penalty_known_values():
    real = torch.rand(4, 3, 8, 8)
    fake = torch.rand(4, 3, 8, 8, requires_grad=True)
    w = torch.randn(3, 8, 8)
    for norm, expected in ((1.0, 0.0), (2.0, 10.0), (3.0, 40.0)):
        wn = (w / w.norm() * norm).requires_grad_(True)
        gp = gradient_penalty(lambda x, wn=wn: (x * wn).flatten(1).sum(1), real, fake)
        assert torch.isfinite(gp) and gp.item() == pytest.approx(expected, abs=1e-4)
    gp.backward()
    assert wn.grad is not None and torch.isfinite(wn.grad).all()
    assert fake.grad is None  # the penalty trains the critic only


def test_gradient_penalty_with_conv_critic_is_finite():
    torch.manual_seed(0)
    nn = torch.nn
    critic = nn.Sequential(nn.Conv2d(3, 4, 4, 2), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 7))
    gp = gradient_penalty(critic, torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    assert torch.isfinite(gp) and gp.item() >= 0
    gp.backward()
    # the last bias does not change dD/dx, so it gets no gradient
    weights = [critic[0].weight, critic[0].bias, critic[2].weight]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in weights)


# ---------------------------------------------------------------- CRRN


def test_crrn_loss():
    torch.manual_seed(0)
    b = torch.rand(2, 3, 24, 24)
    r = torch.rand(2, 3, 24, 24) * 0.3
    g = torch.rand(2, 1, 24, 24)
    loss = CRRNLoss(gamma=0.8)
    zero, terms = loss(b, b, r, r, g, g)
    assert zero.item() == pytest.approx(0.0, abs=1e-5)
    assert set(terms) == {"ssim_b", "l1_b", "ssim_r", "si_grad"}
    pb = (b + 0.1 * torch.randn_like(b)).requires_grad_(True)
    pr = torch.rand_like(r)
    pg = torch.rand_like(g).requires_grad_(True)
    total, terms = loss(pb, b, pr, r, pg, g)
    expected = 0.8 * (1 - ssim_torch(pb, b)) + (pb - b).abs().mean()
    expected = expected + (1 - ssim_torch(pr, r)) + (1 - si_torch(pg, g))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["si_grad"].item() == pytest.approx(1 - si_torch(pg, g).item(), rel=1e-6)
    assert all(v.item() > 0 for v in terms.values())
    total.backward()
    assert pb.grad.abs().sum() > 0 and pg.grad.abs().sum() > 0


def test_crrn_loss_reflection_weight_scales_only_the_reflection_term():
    torch.manual_seed(1)
    b, r, g = torch.rand(2, 3, 24, 24), torch.rand(2, 3, 24, 24) * 0.3, torch.rand(2, 1, 24, 24)
    pb, pr, pg = b + 0.1 * torch.randn_like(b), torch.rand_like(r), torch.rand_like(g)
    full, terms = CRRNLoss()(pb, b, pr, r, pg, g)
    for weight in (0.0, 0.25):
        total, _ = CRRNLoss(reflection_weight=weight)(pb, b, pr, r, pg, g)
        assert total.item() == pytest.approx(full.item() - (1 - weight) * terms["ssim_r"].item(), rel=1e-6)
    with pytest.raises(InputError, match="reflection_weight"):
        CRRNLoss(reflection_weight=-1)

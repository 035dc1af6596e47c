"""Training losses: RM2S (perceptual, feature reduction, WGAN) and CRRN (SSIM, SI, L1).

SSIM and SI here are the differentiable twins of ``dereflect.tools.metrics.ssim`` / ``si``: the same
11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, population (co)variances,
averaged over the "valid" positions (the window inside the image), which is exactly the
border-cropped mean of the NumPy metric. SI = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2).
They are computed in float32 even under autocast: E[x^2] - E[x]^2 loses too much in float16.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from dereflect.errors import InputError
from dereflect.tools.metrics import (
    AUTO_MASK_BLUR,
    AUTO_MASK_LEVEL,
    AUTO_MASK_OPEN,
    CHANNEL_GAIN_RANGE,
    K1,
    K2,
    RADIUS,
    SIGMA,
    WINDOW,
)
from torch import nn

from .vgg import VGGFeatures

Terms = Dict[str, torch.Tensor]

# ---------------------------------------------------------------- SSIM / SI


def _window(device: torch.device) -> torch.Tensor:
    x = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return k / k.sum()


def _moments(x: torch.Tensor, y: torch.Tensor):
    """Local means, variances and covariance over the valid positions of an 11x11 Gaussian window."""
    if x.shape != y.shape:
        raise InputError(f"SSIM inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4 or min(x.shape[-2:]) < WINDOW:
        raise InputError(f"SSIM needs (N, C, H, W) tensors with H, W >= {WINDOW}, got {tuple(x.shape)}")
    x = x.float()
    y = y.float()
    c = x.shape[1]
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    k = _window(x.device)
    ch = stacked.shape[1]
    blurred = F.conv2d(stacked, k.view(1, 1, WINDOW, 1).expand(ch, 1, WINDOW, 1), groups=ch)
    blurred = F.conv2d(blurred, k.view(1, 1, 1, WINDOW).expand(ch, 1, 1, WINDOW), groups=ch)
    ux, uy, uxx, uyy, uxy = blurred.split(c, dim=1)
    return ux, uy, uxx - ux * ux, uyy - uy * uy, uxy - ux * uy


def _reduce(m: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return m.mean()
    if reduction == "none":
        return m.flatten(1).mean(dim=1)
    raise InputError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def ssim_torch(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Differentiable SSIM of (N, C, H, W) tensors: a scalar ("mean") or one value per image ("none")."""
    ux, uy, vx, vy, vxy = _moments(x, y)
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    m = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return _reduce(m, reduction)


def si_torch(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Differentiable structure index (CRRN's SI, c = C2) of (N, C, H, W) tensors."""
    _, _, vx, vy, vxy = _moments(x, y)
    c2 = (K2 * data_range) ** 2
    return _reduce((2 * vxy + c2) / (vx + vy + c2), reduction)


# ---------------------------------------------------------------- RM2S


def _check_layers(vgg: VGGFeatures, layers: Sequence[str], what: str) -> Tuple[str, ...]:
    layers = tuple(layers)
    missing = [name for name in layers if name not in vgg.layers]
    if missing or not layers:
        raise InputError(f"{what} needs VGG layers {list(layers)}, the extractor gives {list(vgg.layers)}")
    return layers


class PerceptualLoss(nn.Module):
    """``weight`` x sum over layers of the mean squared difference of VGG features (output vs target)."""

    def __init__(self, vgg: VGGFeatures, layers: Optional[Sequence[str]] = None, weight: float = 1.0) -> None:
        super().__init__()
        self.vgg = vgg
        self.layers = _check_layers(vgg, vgg.layers if layers is None else layers, "PerceptualLoss")
        self.weight = weight

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, output_features: Optional[Terms] = None
    ) -> torch.Tensor:
        """``output_features``: the output's VGG features when already computed (shared with other terms)."""
        fo = self.vgg(output) if output_features is None else output_features
        with torch.no_grad():  # the target is data: no graph through its features
            ft = self.vgg(target)
        return self.weight * sum(F.mse_loss(fo[n], ft[n]) for n in self.layers)


class FeatureReductionLoss(nn.Module):
    """RM2S feature reduction: ``weight`` x sum over layers of the output's mean absolute VGG activation."""

    def __init__(
        self, vgg: VGGFeatures, layers: Sequence[str] = ("conv1_2", "conv2_2", "conv3_2"), weight: float = 1.0
    ) -> None:
        super().__init__()
        self.vgg = vgg
        self.layers = _check_layers(vgg, layers, "FeatureReductionLoss")
        self.weight = weight

    def forward(self, output: torch.Tensor, output_features: Optional[Terms] = None) -> torch.Tensor:
        fo = self.vgg(output) if output_features is None else output_features
        return self.weight * sum(fo[n].abs().mean() for n in self.layers)


class RM2SStage1Loss(nn.Module):
    """L_ini = lambda1 perceptual + lambda2 L1 + lambda3 feature reduction (RM2S eq. 2-4).

    ``forward(output, target)`` returns ``(total, terms)``; ``terms`` holds the unweighted,
    detached "perceptual", "l1" and "fr" values. The output's VGG features are computed once.
    """

    def __init__(
        self,
        vgg: VGGFeatures,
        lambda1: float = 3.0,
        lambda2: float = 0.4,
        lambda3: float = 3.0,
        perceptual_layers: Optional[Sequence[str]] = None,
        fr_layers: Sequence[str] = ("conv1_2", "conv2_2", "conv3_2"),
    ) -> None:
        super().__init__()
        self.vgg = vgg
        self.perceptual = PerceptualLoss(vgg, perceptual_layers)
        self.fr = FeatureReductionLoss(vgg, fr_layers)
        self.lambda1, self.lambda2, self.lambda3 = lambda1, lambda2, lambda3

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Terms]:
        feats = self.vgg(output)
        perc = self.perceptual(output, target, feats)
        l1 = F.l1_loss(output, target)
        fr = self.fr(output, feats)
        total = self.lambda1 * perc + self.lambda2 * l1 + self.lambda3 * fr
        return total, {"perceptual": perc.detach(), "l1": l1.detach(), "fr": fr.detach()}


class RM2SStage2Loss(nn.Module):
    """Generator loss of stage 2: lambda1 perceptual + lambda2 L1 - lambda4 mean D(fake) (RM2S eq. 7).

    ``forward(output, target, d_fake)`` returns ``(total, terms)`` with unweighted, detached
    "perceptual", "l1" and "adversarial" (= -mean D(fake)).
    """

    def __init__(
        self,
        vgg: VGGFeatures,
        lambda1: float = 3.0,
        lambda2: float = 0.4,
        lambda4: float = 0.05,
        perceptual_layers: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        self.perceptual = PerceptualLoss(vgg, perceptual_layers)
        self.lambda1, self.lambda2, self.lambda4 = lambda1, lambda2, lambda4

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, d_fake: torch.Tensor
    ) -> Tuple[torch.Tensor, Terms]:
        perc = self.perceptual(output, target)
        l1 = F.l1_loss(output, target)
        adv = -d_fake.mean()
        total = self.lambda1 * perc + self.lambda2 * l1 + self.lambda4 * adv
        return total, {"perceptual": perc.detach(), "l1": l1.detach(), "adversarial": adv.detach()}


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """WGAN critic loss (RM2S eq. 8): mean D(fake) - mean D(real), minimised by the critic."""
    return d_fake.mean() - d_real.mean()


@torch.no_grad()
def clip_weights_(module: nn.Module, limit: float = 0.01) -> None:
    """Clamp every parameter of the critic to [-limit, limit] in place (WGAN weight clipping)."""
    for p in module.parameters():
        p.clamp_(-limit, limit)


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float = 10.0
) -> torch.Tensor:
    """WGAN-GP term: ``weight`` x mean (||grad D(x_hat)||_2 - 1)^2 on random real/fake interpolates.

    An alternative to weight clipping; the graph is kept so the penalty trains the critic.
    """
    alpha = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return weight * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


# ---------------------------------------------------------------- transfer recipe (all methods)


#: MobileNetV2 blocks whose outputs :class:`FeatureLoss` compares (strides 2, 4 and 8).
FEATURE_LOSS_TAPS = (1, 3, 6)


class FeatureLoss(nn.Module):
    """Light perceptual loss: mean absolute difference of frozen ImageNet MobileNetV2 features.

    Taps at strides 2, 4 and 8 (the first seven blocks): about 4 GFLOP per megapixel, a few
    percent of VGG's, which keeps the term affordable on a CPU.
    """

    def __init__(self, state: Dict[str, torch.Tensor], taps: Sequence[int] = FEATURE_LOSS_TAPS):
        super().__init__()
        from .models.mobilenet_v2 import MobileNetV2Encoder

        self.taps = tuple(taps)
        used = max(self.taps) + 1  # the blocks past the last tap are never run, nor loaded
        encoder = MobileNetV2Encoder()
        encoder.load_imagenet(state, blocks=used)
        self.blocks = encoder.features[:used]
        self.register_buffer("mean", encoder.mean.clone(), persistent=False)
        self.register_buffer("std", encoder.std.clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureLoss:
        return super().train(False)  # always frozen, BatchNorm included

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = (x - self.mean) / self.std
        out = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                out.append(x)
        return tuple(out)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            wanted = self.features(target)
        got = self.features(output)
        return sum((a - b).abs().mean() for a, b in zip(got, wanted)) / len(got)


def reflection_region(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The torch twin of ``dereflect.tools.metrics.reflection_mask`` for a batch: (N, 1, H, W) of 0/1.

    The same blur (OpenCV's own Gaussian taps and its reflect-101 border) and the same opening, so a
    training pair's emphasised region is the region ``dereflect eval --masks auto`` scores.
    """
    import cv2

    k = int(round(AUTO_MASK_BLUR * 8 + 1)) | 1  # the kernel size OpenCV picks for a float image at ksize (0, 0)
    taps = torch.from_numpy(cv2.getGaussianKernel(k, AUTO_MASK_BLUR, cv2.CV_32F).ravel()).to(image)
    difference = (image - target).mean(1, keepdim=True).float()
    difference = F.pad(difference, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    difference = F.conv2d(difference, taps.view(1, 1, 1, k))
    difference = F.conv2d(difference, taps.view(1, 1, k, 1))
    mask = (difference > AUTO_MASK_LEVEL).float()
    # Opening: erosion then dilation over a square; max-pooling pads with -inf, so the frame's edge
    # neither erodes nor dilates, as in OpenCV.
    eroded = -F.max_pool2d(-mask, AUTO_MASK_OPEN, 1, AUTO_MASK_OPEN // 2)
    return F.max_pool2d(eroded, AUTO_MASK_OPEN, 1, AUTO_MASK_OPEN // 2)


def _weighted_means(values: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample means of ``values`` (N, C, H, W), weighted by ``weight`` (N, 1, H, W) or not."""
    if weight is None:
        return values.flatten(1).mean(1)
    return (values * weight).flatten(1).sum(1) / (weight.flatten(1).sum(1) * values.shape[1])


def _image_gradients(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def _extra_edges(output_diff: torch.Tensor, target_diff: torch.Tensor) -> torch.Tensor:
    """How far each of the output's finite differences exceeds the largest of the target's within a pixel."""
    nearby = F.max_pool2d(target_diff.abs(), 3, 1, 1)
    return F.relu(output_diff.abs() - nearby)


#: The transfer loss's weight on the gradient L1 term (ERRNet's).
GRADIENT_WEIGHT = 0.4
PERCEPTUAL_WEIGHT = 0.1


def best_channel_gains(output: torch.Tensor, target: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(N, 3, 1, 1) gains, not differentiated: per real sample (``real`` 1) the torch twin of
    ``dereflect.tools.metrics.best_channel_gains``, 1 for the others."""
    with torch.no_grad():
        gains = (output * target).sum((2, 3)) / (output * output).sum((2, 3)).clamp_min(1e-6)
        gains = gains.clamp(*CHANNEL_GAIN_RANGE)
        gains = torch.where(real.view(-1, 1) > 0.5, gains, torch.ones_like(gains))
    return gains[..., None, None]


class RestorationLoss(nn.Module):
    """The ``transfer`` loss: L1 + ``gradient`` x gradient L1 + ``perceptual`` x :class:`FeatureLoss`.

    What the strongest recent methods train with (ERRNet's L1, 0.4 x gradient L1 and a perceptual
    term), with the light MobileNetV2 features in place of VGG's. Real pairs are slightly
    misaligned, and finite differences are what a shift of a pixel disturbs most: their gradient
    term is scaled by ``real_gradient_scale``.

    ``reflection_emphasis`` (E > 0) weighs the L1 and gradient terms 1 + E inside each pair's
    reflection region (:func:`reflection_region` of input and target) and 1 elsewhere, normalised
    per pair: a pair's loss stays on the same scale, more of it comes from where the reflection is.
    A pair without a reflection is weighed evenly.

    ``real_colour_weight`` (W < 1) scores a real pair W x as above plus (1 - W) x the same on the
    output after that pair's best channel gains (least squares from output to target, not
    differentiated): the exposure and white balance a camera changes between the two shots of a
    real pair, which nothing in the photo predicts, then weighs less against what the reflection
    itself leaves. Synthetic pairs, whose colour change is drawn from matched statistics, keep
    the plain loss.

    ``extra_edge`` (X > 0) adds X x the mean of the edges the output has beyond its target's: each
    finite difference's magnitude above the largest of the target's within a pixel (so a real
    pair's slight misalignment is not counted). The gradient L1 term scores an edge left in and an
    edge taken out alike, and where the network cannot tell a reflection's edge from the scene's it
    then keeps half of it; this term makes leaving a reflection's edge in cost more than taking a
    scene's out, so an uncertain edge goes.

    ``forward(output, target, real, image)`` takes ``real`` as an (N,) tensor of 0/1 (or None: all
    synthetic) and ``image``, the network's input (needed with an emphasis), and returns
    ``(total, terms)``.
    """

    def __init__(self, features: Optional[FeatureLoss], gradient: float = GRADIENT_WEIGHT,
                 perceptual: float = PERCEPTUAL_WEIGHT, real_gradient_scale: float = 0.5,
                 reflection_emphasis: float = 0.0, real_colour_weight: float = 1.0, extra_edge: float = 0.0) -> None:
        super().__init__()
        if not all(math.isfinite(w) and w >= 0 for w in (gradient, perceptual, real_gradient_scale,
                                                          reflection_emphasis, extra_edge)):
            raise InputError("RestorationLoss weights must be finite numbers >= 0")
        if not 0.0 <= real_colour_weight <= 1.0:
            raise InputError(f"RestorationLoss: real_colour_weight must be in [0, 1], got {real_colour_weight:g}")
        if perceptual > 0 and features is None:
            raise InputError("RestorationLoss: a perceptual weight needs the FeatureLoss network")
        self.features = features
        self.gradient, self.perceptual, self.real_gradient_scale = gradient, perceptual, real_gradient_scale
        self.reflection_emphasis, self.real_colour_weight = reflection_emphasis, real_colour_weight
        self.extra_edge = extra_edge

    def describe(self) -> Dict[str, object]:
        """The loss's settings as a checkpoint's metadata records them."""
        return {"name": "transfer", "gradient": self.gradient, "perceptual": self.perceptual,
                "real_gradient_scale": self.real_gradient_scale, "reflection_emphasis": self.reflection_emphasis,
                "real_colour_weight": self.real_colour_weight, "extra_edge": self.extra_edge}

    def forward(self, output: torch.Tensor, target: torch.Tensor, real: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Terms]:
        weight = None
        if self.reflection_emphasis > 0:
            if image is None:
                raise InputError("RestorationLoss: a reflection emphasis needs the network's input image")
            weight = 1.0 + self.reflection_emphasis * reflection_region(image, target)
        total, terms = self._score(output, target, real, weight)
        if self.real_colour_weight < 1 and real is not None:
            fitted, _ = self._score(output * best_channel_gains(output, target, real), target, real, weight)
            total = self.real_colour_weight * total + (1 - self.real_colour_weight) * fitted
            terms["colour_fitted"] = fitted.detach()
        return total, terms

    def _score(self, output: torch.Tensor, target: torch.Tensor, real: Optional[torch.Tensor],
               weight: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Terms]:
        l1 = _weighted_means((output - target).abs(), weight).mean()
        (ox, oy), (tx, ty) = _image_gradients(output), _image_gradients(target)
        per_sample = (_weighted_means((ox - tx).abs(), None if weight is None else weight[..., :, 1:]) +
                      _weighted_means((oy - ty).abs(), None if weight is None else weight[..., 1:, :]))
        if real is not None:
            per_sample = per_sample * (1.0 - real.float() * (1.0 - self.real_gradient_scale))
        grad = per_sample.mean()
        total = l1 + self.gradient * grad
        terms = {"l1": l1.detach(), "gradient": grad.detach()}
        if self.extra_edge > 0:
            extra = (_weighted_means(_extra_edges(ox, tx), None if weight is None else weight[..., :, 1:]) +
                     _weighted_means(_extra_edges(oy, ty), None if weight is None else weight[..., 1:, :])).mean()
            total = total + self.extra_edge * extra
            terms["extra_edge"] = extra.detach()
        if self.perceptual > 0:
            perc = self.features(output, target)
            total = total + self.perceptual * perc
            terms["perceptual"] = perc.detach()
        return total, terms


# ---------------------------------------------------------------- CRRN


class CRRNLoss(nn.Module):
    """CRRN loss: gamma (1 - SSIM(B)) + L1(B) + w_R (1 - SSIM(R)) + (1 - SI(grad B)).

    ``reflection_weight`` (w_R) is 1 in the paper. With a transmission loss in the data the target
    R = I - B holds faint copies of the background's edges, which SSIM weighs like a reflection;
    the bundled crrn-lite was trained with w_R = 0, a departure from the paper (docs/TRAINING.md).

    ``forward(pred_b, true_b, pred_r, true_r, pred_grad, true_grad)`` returns ``(total, terms)``;
    terms (detached): "ssim_b", "l1_b", "ssim_r" and "si_grad", each as its loss value (1 - score
    for the similarity terms). ``pred_grad``/``true_grad`` are the GiN output and the gradient
    magnitude of the true background's grey image, shape (N, 1, H, W).
    """

    def __init__(self, gamma: float = 0.8, data_range: float = 1.0, reflection_weight: float = 1.0) -> None:
        super().__init__()
        if reflection_weight < 0:
            raise InputError(f"CRRNLoss: reflection_weight must be >= 0, got {reflection_weight:g}")
        self.gamma = gamma
        self.reflection_weight = reflection_weight
        self.data_range = data_range

    def forward(
        self,
        pred_b: torch.Tensor,
        true_b: torch.Tensor,
        pred_r: torch.Tensor,
        true_r: torch.Tensor,
        pred_grad: torch.Tensor,
        true_grad: torch.Tensor,
    ) -> Tuple[torch.Tensor, Terms]:
        ssim_b = 1 - ssim_torch(pred_b, true_b, self.data_range)
        l1_b = F.l1_loss(pred_b, true_b)
        ssim_r = 1 - ssim_torch(pred_r, true_r, self.data_range)
        si_grad = 1 - si_torch(pred_grad, true_grad, self.data_range)
        total = self.gamma * ssim_b + l1_b + self.reflection_weight * ssim_r + si_grad
        terms = {"ssim_b": ssim_b, "l1_b": l1_b, "ssim_r": ssim_r, "si_grad": si_grad}
        return total, {k: v.detach() for k, v in terms.items()}

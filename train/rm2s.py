"""RM2S training tasks: stage 1 (U-Net, perceptual + L1 + feature reduction) and stage 2 (GAN).

Stage 2's checkpoint also carries the stage-1 network it was trained with, so one stage-2
checkpoint is a complete RM2S model for export.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from dereflect.errors import InputError
from dereflect.middle_step.torch_ops import ground_truth_masks_torch, stage2_input_from_masks, stage2_input_torch

from .checkpoint import Checkpoint, load_same_network, transplant_state
from .losses import (
    RestorationLoss,
    RM2SStage1Loss,
    RM2SStage2Loss,
    Terms,
    clip_weights_,
    discriminator_loss,
    gradient_penalty,
)
from .models import build_model
from .models.rm2s import DiscriminatorConfig, MobileUNetConfig, UNetConfig
from .trainer import Task, dropped_rate, encoder_parameter_groups, loss_values, set_learning_rate, to_uint8_rgb
from .vgg import VGGFeatures

# The paper's learning rates (the authors' code used 2e-3 for the generators).
STAGE1_LR = 2e-4
STAGE2_LR = 2e-4
DISCRIMINATOR_LR = 2e-5
#: The transfer recipe's rate (Adam, as ERRNet) and the pretrained encoder's share of it.
TRANSFER_LR = 1e-4
ENCODER_LR_SCALE = 0.1


class Stage1Task(Task):
    """Stage 1 with the paper's recipe (VGG losses, RMSprop) or the transfer recipe.

    ``transfer_loss`` given: the :class:`RestorationLoss`, Adam, the pretrained encoder at
    ``encoder_lr_scale`` of the rate (0 freezes it); otherwise the paper's loss with ``vgg``.
    ``arch`` is ``rm2s_unet`` (paper / from-scratch lite) or ``rm2s_mobile_unet``; ``imagenet``
    (a MobileNetV2 state dict) initialises the latter's encoder.
    """

    method = "rm2s"
    kind = "rm2s-stage1"

    def __init__(self, config: Union[UNetConfig, MobileUNetConfig], vgg: Optional[VGGFeatures] = None,
                 lr: float = STAGE1_LR, data_recipe: Optional[dict] = None,
                 loss_weights: Optional[Dict[str, float]] = None, arch: str = "rm2s_unet",
                 transfer_loss: Optional[RestorationLoss] = None, imagenet: Optional[Dict[str, torch.Tensor]] = None,
                 encoder_lr_scale: float = ENCODER_LR_SCALE, lr_drop_at: Optional[int] = None,
                 init: Optional[Checkpoint] = None):
        self.config = config
        self.lr_drop_at = lr_drop_at
        self.arch = arch
        self.model = build_model(arch, config.to_dict())
        if imagenet is not None:
            self.model.load_imagenet(imagenet)
        self.init_source: Optional[Dict[str, Any]] = None
        if init is not None:
            self._init_from(init)
        self.lr = lr
        self.transfer = transfer_loss is not None
        if self.transfer:
            self.loss = transfer_loss
            self.optimizer = torch.optim.Adam(encoder_parameter_groups(self.model, lr, encoder_lr_scale), lr=lr)
        else:
            self.loss = RM2SStage1Loss(vgg, **(loss_weights or {}))
            self.optimizer = torch.optim.RMSprop(self.model.parameters(), lr=lr)
        self.encoder_lr_scale = encoder_lr_scale
        self.data_recipe = data_recipe or {}
        self.loss_weights = loss_weights or {}
        self._train_model = self.model  # what training_step runs: DistributedDataParallel once distributed

    def carry_over(self, checkpoint: Checkpoint) -> None:
        if self.init_source is None:
            self.init_source = checkpoint.metadata.get("init")

    def _init_from(self, checkpoint: Checkpoint) -> None:
        """The network's weights from ``checkpoint``'s stage 1 (of a stage-1 or a stage-2 checkpoint: both hold
        it as ``stage1``), which must be this very network; the optimiser starts afresh."""
        if checkpoint.metadata.get("kind") not in ("rm2s-stage1", "rm2s-stage2"):
            raise InputError(f"--init {checkpoint.path}: a {checkpoint.metadata.get('kind')} checkpoint holds no RM2S "
                             "stage 1; give a stage-1 or stage-2 checkpoint, or a bundled RM2S model")
        load_same_network(self.model, checkpoint, "stage1", self.arch, self.config)
        self.init_source = {"path": str(checkpoint.path), "step": checkpoint.step,
                            "kind": checkpoint.metadata.get("kind")}

    def networks(self) -> Dict[str, Tuple[str, Dict[str, Any], torch.nn.Module]]:
        return {"stage1": (self.arch, self.config.to_dict(), self.model)}

    def distribute(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        self._train_model = wrap(self.model)

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"stage1": self.optimizer}

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.loss.to(device)

    def set_step(self, step: int) -> None:
        set_learning_rate(self.optimizer, dropped_rate(self.lr, step, self.lr_drop_at))

    def _loss(self, estimate: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Terms]:
        if self.transfer:
            return self.loss(estimate, batch["background"], batch.get("real"), batch["input"])
        return self.loss(estimate, batch["background"])

    def training_step(self, batch: Dict[str, torch.Tensor], step: int,
                      scaler: torch.amp.GradScaler) -> Dict[str, float]:
        with torch.autocast(device_type=batch["input"].device.type, enabled=scaler.is_enabled()):
            estimate = self._train_model(batch["input"])
        total, terms = self._loss(estimate.float(), batch)
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(self.optimizer)
        scaler.update()
        return loss_values(loss=total, **terms)

    @torch.no_grad()
    def validation_step(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, float], torch.Tensor]:
        estimate = self.model(batch["input"])
        total, terms = self._loss(estimate, batch)
        return loss_values(loss=total, **terms), estimate

    def metadata(self) -> Dict[str, Any]:
        if self.transfer:
            loss = self.loss.describe()
            optimiser = {"name": "adam", "lr": self.lr, "encoder_lr_scale": self.encoder_lr_scale}
        else:
            # The VGG's input convention is part of the loss: the weights 3 / 0.4 / 3 mean what they
            # meant only for the features they were tuned on.
            loss = {"name": "rm2s-stage1", **self.loss_weights, "vgg": self.loss.perceptual.vgg.describe()}
            optimiser = {"name": "rmsprop", "lr": self.lr}
        optimiser["lr_drop_at"] = self.lr_drop_at  # recorded when None too: a resume notes one set later
        extra = {"init": self.init_source} if self.init_source else {}
        return {"data_recipe": self.data_recipe, "loss": loss, "optimiser": optimiser, **extra}


class Stage2Task(Task):
    """The stage-2 generator and its WGAN critic.

    ``masks="stage1"`` derives the edge masks from the frozen stage-1 network (the paper's way,
    as at inference); ``masks="ground-truth"`` uses the authors' training masks from B and R.

    With ``transfer_loss`` the generator trains on that loss plus ``adversarial_weight`` times
    the critic's -D(fake) (the paper's 0.05), with Adam; ``rm2s_mobile_unet`` generators start
    from the stage-1 network's weights (``checkpoint.transplant_state``: the mask channels start
    at zero), so stage 2 begins exactly where stage 1 is and learns to use the edge masks.
    """

    method = "rm2s"
    kind = "rm2s-stage2"
    preview_labels = ("input", "stage 1", "edges B/R", "stage 2", "ground truth")

    def __init__(self, config: Union[UNetConfig, MobileUNetConfig], stage1: Checkpoint, vgg: Optional[VGGFeatures],
                 masks: str = "stage1", critic: Optional[DiscriminatorConfig] = None, lr: float = STAGE2_LR,
                 critic_lr: float = DISCRIMINATOR_LR, clip: float = 0.01, gp_weight: float = 0.0,
                 c1: float = 0.5, c2: float = 0.5, data_recipe: Optional[dict] = None,
                 loss_weights: Optional[Dict[str, float]] = None, arch: str = "rm2s_unet",
                 transfer_loss: Optional[RestorationLoss] = None, adversarial_weight: float = 0.05,
                 encoder_lr_scale: float = ENCODER_LR_SCALE, lr_drop_at: Optional[int] = None,
                 stage1_source: Optional[Dict[str, Any]] = None):
        if masks not in ("stage1", "ground-truth"):
            raise InputError(f"masks must be 'stage1' or 'ground-truth', not {masks!r}")
        if stage1.metadata.get("kind") not in ("rm2s-stage1", "rm2s-stage2"):
            raise InputError(f"{stage1.path}: expected an RM2S stage-1 checkpoint, got {stage1.metadata.get('kind')}")
        if config.in_channels != 9:
            raise InputError("the stage-2 U-Net takes 9 input channels")
        self.stage1_spec = stage1.network_spec("stage1")
        self.stage1 = stage1.build("stage1").requires_grad_(False)
        self.config = config
        self.arch = arch
        self.critic_config = critic or DiscriminatorConfig.preset("paper")
        self.generator = build_model(arch, config.to_dict())
        if arch == "rm2s_mobile_unet":
            if self.stage1_spec["arch"] != arch:
                raise InputError(f"a {arch} stage 2 starts from a stage 1 of the same architecture; "
                                 f"{stage1.path} holds {self.stage1_spec['arch']}")
            transplant_state(self.generator, stage1.states["stage1"])
        self.critic = build_model("rm2s_discriminator", self.critic_config.to_dict())
        self.lr, self.lr_drop_at = lr, lr_drop_at
        self.transfer = transfer_loss is not None
        if self.transfer:
            self.loss = transfer_loss
            self.g_optimizer = torch.optim.Adam(encoder_parameter_groups(self.generator, lr, encoder_lr_scale),
                                                lr=lr)
        else:
            self.loss = RM2SStage2Loss(vgg, **(loss_weights or {}))
            self.g_optimizer = torch.optim.RMSprop(self.generator.parameters(), lr=lr)
        self.adversarial_weight = adversarial_weight
        self.encoder_lr_scale = encoder_lr_scale
        self.d_optimizer = torch.optim.RMSprop(self.critic.parameters(), lr=critic_lr)
        self.masks, self.clip, self.gp_weight, self.c1, self.c2 = masks, clip, gp_weight, c1, c2
        self.data_recipe = data_recipe or {}
        self.loss_weights = loss_weights or {}
        # ``stage1_source``: where the stage 1 first came from, for a resumed run whose ``stage1`` is its own
        # checkpoint (else that checkpoint is the source).
        self.stage1_source = stage1_source or {"path": str(stage1.path), "step": stage1.step}
        # What training_step runs: DistributedDataParallel once distributed. Stage 1 is frozen: each rank
        # runs it alone.
        self._train_generator, self._train_critic = self.generator, self.critic

    def distribute(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        self._train_generator, self._train_critic = wrap(self.generator), wrap(self.critic)

    def networks(self) -> Dict[str, Tuple[str, Dict[str, Any], torch.nn.Module]]:
        return {
            "stage1": (self.stage1_spec["arch"], self.stage1_spec["config"], self.stage1),
            "generator": (self.arch, self.config.to_dict(), self.generator),
            "discriminator": ("rm2s_discriminator", self.critic_config.to_dict(), self.critic),
        }

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"generator": self.g_optimizer, "discriminator": self.d_optimizer}

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.loss.to(device)

    def set_step(self, step: int) -> None:
        set_learning_rate(self.g_optimizer, dropped_rate(self.lr, step, self.lr_drop_at))

    def _generator_loss(self, fake: torch.Tensor, batch: Dict[str, torch.Tensor],
                        d_fake: torch.Tensor) -> Tuple[torch.Tensor, Terms]:
        if not self.transfer:
            return self.loss(fake, batch["background"], d_fake)
        total, terms = self.loss(fake, batch["background"], batch.get("real"), batch["input"])
        adversarial = -d_fake.mean()
        terms["adversarial"] = adversarial.detach()
        return total + self.adversarial_weight * adversarial, terms

    def stage2_input(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The 9-channel generator input and the stage-1 estimate (both without gradients)."""
        image = batch["input"]
        with torch.no_grad():
            self.stage1.eval()
            estimate = self.stage1(image)
            if self.masks == "stage1":
                z = stage2_input_torch(image, estimate, c1=self.c1, c2=self.c2)
            else:
                mask_b, mask_r = ground_truth_masks_torch(image, batch["background"], batch["reflection"])
                z = stage2_input_from_masks(image, mask_b, mask_r)
        return z, estimate

    def training_step(self, batch: Dict[str, torch.Tensor], step: int,
                      scaler: torch.amp.GradScaler) -> Dict[str, float]:
        z, _ = self.stage2_input(batch)
        device_type = z.device.type
        real = batch["background"]

        with torch.autocast(device_type=device_type, enabled=scaler.is_enabled()):
            fake = self._train_generator(z)
        d_real = self._train_critic(real)
        d_fake = self._train_critic(fake.detach().float())
        d_loss = discriminator_loss(d_real, d_fake)
        if self.gp_weight > 0:
            # The plain critic: the penalty differentiates it with respect to its input (create_graph), which
            # DistributedDataParallel does not support; its share of the critic's gradient still reaches
            # the parameters in d_loss.backward() below, where the wrapped critic averages it.
            d_loss = d_loss + gradient_penalty(self.critic, real, fake.detach().float(), weight=self.gp_weight)
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optimizer.step()
        if self.gp_weight <= 0:
            clip_weights_(self.critic, self.clip)

        # The plain critic: this loss steps the generator only, so the critic's gradients from it are not
        # exchanged between ranks (the critic's optimiser clears them before its next step).
        total, terms = self._generator_loss(fake.float(), batch, self.critic(fake.float()))
        self.g_optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(self.g_optimizer)
        scaler.update()
        return loss_values(loss=total, d_loss=d_loss, **terms)

    @torch.no_grad()
    def validation_step(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, float], torch.Tensor]:
        z, _ = self.stage2_input(batch)
        fake = self.generator(z)
        # The critic's score is left out of the validation loss: it drifts as the critic
        # trains, and the critic needs larger images than some validation sets have.
        total, terms = self._generator_loss(fake, batch, torch.zeros(fake.shape[0], device=fake.device))
        return loss_values(loss=total, **terms), fake

    def preview_row(self, batch: Dict[str, torch.Tensor], estimate: torch.Tensor, index: int) -> List[np.ndarray]:
        z, stage1 = self.stage2_input({k: v[index:index + 1] for k, v in batch.items()})
        edges = torch.stack([z[0, 6:9].amax(0) > 0, z[0, 3:6].amax(0) > 0, torch.zeros_like(z[0, 0], dtype=bool)])
        return [to_uint8_rgb(batch["input"][index]), to_uint8_rgb(stage1[0]), to_uint8_rgb(edges.float()),
                to_uint8_rgb(estimate[index]), to_uint8_rgb(batch["background"][index])]

    def metadata(self) -> Dict[str, Any]:
        if self.transfer:
            loss = {**self.loss.describe(), "adversarial": self.adversarial_weight}
            optimiser = {"name": "adam", "lr": self.lr, "encoder_lr_scale": self.encoder_lr_scale}
        else:
            loss = {"name": "rm2s-stage2", **self.loss_weights, "vgg": self.loss.perceptual.vgg.describe()}
            optimiser = {"name": "rmsprop", "lr": self.lr}
        optimiser["lr_drop_at"] = self.lr_drop_at  # recorded when None too: a resume notes one set later
        return {
            "data_recipe": self.data_recipe,
            "loss": loss,
            "optimiser": optimiser,
            "stage2": {"masks": self.masks, "c1": self.c1, "c2": self.c2, "clip": self.clip,
                       "gp_weight": self.gp_weight, "stage1_source": self.stage1_source},
        }

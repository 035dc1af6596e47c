"""CRRN training task with the paper's staged schedule.

The paper trains GiN alone for 40 epochs at 1e-4, then the whole network end to end for
50 epochs at 1e-4 and 30 at 1e-5 (120 in all). Here one ``total_steps`` setting is split in
the same proportions, so a short run keeps the schedule's shape.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from dereflect.errors import InputError

from .checkpoint import Checkpoint, load_same_network, transplant_state
from .losses import CRRNLoss, RestorationLoss, Terms, si_torch
from .models import build_model, encoder_of
from .models.common import gradient_magnitude
from .models.crrn import CRRNConfig, MobileCRRNConfig
from .trainer import Task, encoder_parameter_groups, loss_values, set_learning_rate, to_uint8_rgb

CRRN_LR = 1e-4
PAPER_EPOCHS = {"gin": 40, "joint": 50, "joint_low_lr": 30}
#: Recorded in checkpoints: what the reflection output was trained towards (see ``CRRNTask.targets``).
REFLECTION_TARGET = "input - background"


def vgg16_init_state(source: str = "auto") -> Dict[str, torch.Tensor]:
    """Pretrained VGG-16 conv weights (torchvision keys) for IiN, for inputs ImageNet-normalised.

    ``source="auto"`` takes torchvision's ImageNet VGG-16 where it is cached, as the paper
    initialises IiN from ImageNet weights, and the offline HED VGG-16 (fine-tuned for edge
    detection) only where it is not (see ``vgg.load_vgg``; ``dereflect train crrn`` notes which).
    The HED weights expect Caffe input (BGR, 0..255, mean subtracted); that input
    transform is folded into the first conv so IiN's ImageNet normalisation stays as it is.
    The fold is exact except in the one-pixel zero-padded border of the first conv.
    """
    from .vgg import IMAGENET_MEAN, IMAGENET_STD, load_vgg

    vgg = load_vgg("vgg16", source=source, layers=("conv5_3",))
    state = {f"features.{k}": v.clone() for k, v in vgg.features.state_dict().items()}
    if vgg.normalize == "caffe":
        weight, bias = state["features.0.weight"], state["features.0.bias"]
        std = torch.tensor(IMAGENET_STD, dtype=weight.dtype)
        mean = torch.tensor(IMAGENET_MEAN, dtype=weight.dtype)
        caffe_mean_bgr = torch.tensor(vgg.caffe_mean_bgr, dtype=weight.dtype)
        rgb_weight = weight.flip(1)
        # caffe_k = 255 * x_rgb[2-k] - mean_bgr[k], with x_rgb = x_norm * std + mean
        offset = 255 * mean.flip(0) - caffe_mean_bgr
        state["features.0.bias"] = bias + (weight * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
        state["features.0.weight"] = rgb_weight * (255 * std).view(1, 3, 1, 1)
    return state


def phase_ends(total_steps: int, gin_fraction: float) -> Dict[str, int]:
    """Phase -> the number of steps done when it ends ('gin': GiN alone; 'joint'; 'joint_low_lr' at a tenth
    of the rate), in the paper's 40 : 50 : 30 proportions after GiN."""
    gin_steps = int(round(total_steps * gin_fraction))
    joint_steps = total_steps - gin_steps
    high_lr_steps = int(round(joint_steps * PAPER_EPOCHS["joint"] / (PAPER_EPOCHS["joint"] +
                                                                        PAPER_EPOCHS["joint_low_lr"])))
    return {"gin": gin_steps, "joint": gin_steps + high_lr_steps, "joint_low_lr": total_steps}


def schedule_phase(step: int, total_steps: int, gin_fraction: float) -> str:
    """'gin', 'joint' or 'joint_low_lr' for a step (0-based), in the paper's 40 : 50 : 30 proportions after GiN."""
    ends = phase_ends(total_steps, gin_fraction)
    return next((phase for phase, end in ends.items() if step < end), "joint_low_lr")


class CRRNTask(Task):
    method = "crrn"
    kind = "crrn"
    preview_labels = ("input", "gradient", "background", "reflection", "ground truth")

    def __init__(self, config: Union[CRRNConfig, MobileCRRNConfig], total_steps: int, gin_fraction: float = 40 / 120,
                 lr: float = CRRN_LR, vgg_init: Optional[Dict[str, torch.Tensor]] = None, gamma: float = 0.8,
                 data_recipe: Optional[dict] = None, reflection_weight: float = 1.0, arch: str = "crrn",
                 transfer_loss: Optional[RestorationLoss] = None, imagenet: Optional[Dict[str, torch.Tensor]] = None,
                 init: Optional[Checkpoint] = None, encoder_lr_scale: float = 0.1):
        self.config = config
        self.arch = arch
        self.model = build_model(arch, config.to_dict())
        if vgg_init is not None:
            self.model.load_vgg16_features(vgg_init)
        if imagenet is not None:
            self.model.load_imagenet(imagenet)
        self.init_source: Optional[Dict[str, Any]] = None
        if init is not None:
            self._init_from(init)
        self.transfer = transfer_loss is not None
        self.loss = transfer_loss if self.transfer else CRRNLoss(gamma=gamma, reflection_weight=reflection_weight)
        self.lr = lr
        self.total_steps = total_steps
        self.gin_fraction = gin_fraction
        self.gin_optimizer = torch.optim.Adam(self.model.gin.parameters(), lr=lr)
        groups = encoder_parameter_groups(self.model, lr, encoder_lr_scale) if self.transfer else \
            self.model.parameters()
        self.optimizer = torch.optim.Adam(groups, lr=lr)
        self.encoder_lr_scale = encoder_lr_scale
        self.phase = schedule_phase(0, total_steps, gin_fraction)
        self._announced: Optional[str] = None  # the phase whose note was printed last
        self.data_recipe = data_recipe or {}
        self.vgg_init = vgg_init is not None
        # What training_step runs: DistributedDataParallel once distributed.
        self._train_gin, self._train_model = self.model.gin, self.model

    def carry_over(self, checkpoint: Checkpoint) -> None:
        if self.init_source is None:
            self.init_source = (checkpoint.metadata.get("schedule") or {}).get("init")

    def _init_from(self, checkpoint: Checkpoint) -> None:
        """The weights of a CRRN checkpoint of this very network (fine-tuning it as a new run), else IiN's from a
        lite RM2S stage 1 (:meth:`_init_from_stage1`)."""
        if checkpoint.metadata.get("kind") != "crrn":
            self._init_from_stage1(checkpoint)
            return
        load_same_network(self.model, checkpoint, "crrn", self.arch, self.config)
        self.init_source = {"path": str(checkpoint.path), "step": checkpoint.step, "kind": "crrn"}

    def _init_from_stage1(self, checkpoint: Checkpoint) -> None:
        """IiN (encoder, decoder, head, gain) from a lite RM2S stage-1 network (of a stage-1 checkpoint, or the
        stage 1 a stage-2 checkpoint holds): the same layers.

        Its decoder inputs for GiN's features start at zero, so the untrained CRRN gives the stage-1
        network's output, and GiN's features come in as training finds them useful.
        """
        kind = checkpoint.metadata.get("kind")
        if self.arch != "crrn_mobile" or kind not in ("rm2s-stage1", "rm2s-stage2") or \
                checkpoint.network_spec("stage1")["arch"] != "rm2s_mobile_unet":
            raise InputError("--init takes a CRRN checkpoint, or a lite RM2S stage 1 (rm2s_mobile_unet, of a stage-1 "
                             f"or stage-2 checkpoint) for a lite CRRN; {checkpoint.path} is a {kind}"
                             + (f" whose stage 1 is a {checkpoint.network_spec('stage1')['arch']}"
                                if kind in ("rm2s-stage1", "rm2s-stage2") else ""))
        stage1_encoder = encoder_of(checkpoint.network_spec("stage1"))
        if stage1_encoder != self.config.encoder:
            raise InputError(f"{checkpoint.path}: a stage 1 on {stage1_encoder} cannot start a CRRN on "
                             f"{self.config.encoder}")
        untouched = transplant_state(self.model, checkpoint.states["stage1"])
        if any(not key.startswith("gin.") for key in untouched):
            raise InputError(f"{checkpoint.path}: does not cover IiN ({[k for k in untouched if 'gin' not in k][:3]})")
        self.init_source = {"path": str(checkpoint.path), "step": checkpoint.step, "kind": kind}

    def networks(self) -> Dict[str, Tuple[str, Dict[str, Any], torch.nn.Module]]:
        return {"crrn": (self.arch, self.config.to_dict(), self.model)}

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"gin": self.gin_optimizer, "crrn": self.optimizer}

    def to(self, device: torch.device) -> None:
        super().to(device)
        if self.transfer:  # the transfer loss holds its feature network (the paper's loss has no state)
            self.loss.to(device)

    def distribute(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        # GiN gets a wrapper of its own for the GiN-alone phase: one wrapper over the whole network would
        # wait there for IiN's gradients, which never come (find_unused_parameters would instead search
        # the graph for unused parameters at every step of every phase). The two share GiN's parameters;
        # a wrapper exchanges gradients only after its own forward, so each step averages them once.
        self._train_gin, self._train_model = wrap(self.model.gin), wrap(self.model)

    def set_step(self, step: int) -> None:
        self.phase = schedule_phase(step, self.total_steps, self.gin_fraction)
        set_learning_rate(self.optimizer, self.lr * (0.1 if self.phase == "joint_low_lr" else 1.0))

    def log_fields(self) -> Dict[str, Any]:
        # Validation PSNR is flat while GiN trains alone: the log says why.
        return {"phase": self.phase}

    def phase_note(self, step: int) -> Optional[str]:
        """A note at the first step of each phase (and at the first step of a run, resumed or not), saying what
        trains and what validation shows meanwhile; ``set_step(step)`` has set ``phase``."""
        if self.phase == self._announced:
            return None
        self._announced = self.phase
        ends = phase_ends(self.total_steps, self.gin_fraction)
        # From the step about to run: a run resumed mid-phase has done the phase's earlier steps.
        first = max(step + 1, {"gin": 1, "joint": ends["gin"] + 1, "joint_low_lr": ends["joint"] + 1}[self.phase])
        last = ends[self.phase]
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        if self.phase == "gin":
            return (f"note: {steps} (--gin-fraction {self.gin_fraction:.3g}) train GiN, the gradient "
                    f"network, alone: the background output does not train yet, so val_psnr stays flat through "
                    f"step {last}; log.jsonl's phase says which part trains")
        if self.phase == "joint":
            return f"note: {steps} train the whole network (GiN's phase is over): val_psnr moves from here"
        return f"note: {steps} train the whole network at a tenth of the rate (the paper's last epochs)"

    def targets(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(background, reflection, background gradient) targets for the model's three outputs.

        The model's reflection is R = I - B (see ``models.crrn``), so its target is the input minus
        the true background, not the data's display-space reflection ``I - B_t``: with a
        transmission loss (B_t = t B, t < 1) the two differ by (1 - t) B, and training R towards
        ``I - B_t`` pulls every estimate of B darker than the truth, against the L1/SSIM terms on B.
        """
        background = batch["background"]
        return background, batch["input"] - background, gradient_magnitude(background)

    def training_step(self, batch: Dict[str, torch.Tensor], step: int,
                      scaler: torch.amp.GradScaler) -> Dict[str, float]:
        _, _, gradient = self.targets(batch)
        image = batch["input"]
        if self.phase == "gin":
            with torch.autocast(device_type=image.device.type, enabled=scaler.is_enabled()):
                predicted, _ = self._train_gin(image)
            total = 1 - si_torch(predicted.float(), gradient)
            terms = {"si_gradient": total}
            optimizer = self.gin_optimizer
        else:
            with torch.autocast(device_type=image.device.type, enabled=scaler.is_enabled()):
                b, r, g = self._train_model(image)
            total, terms = self._loss(b.float(), r.float(), g.float(), batch)
            optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss_values(loss=total, **terms)

    @torch.no_grad()
    def validation_step(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, float], torch.Tensor]:
        b, r, g = self.model(batch["input"])
        total, terms = self._loss(b, r, g, batch)
        return loss_values(loss=total, **terms), b

    def _loss(self, b: torch.Tensor, r: torch.Tensor, g: torch.Tensor,
              batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Terms]:
        """The paper's loss, or the transfer loss on B plus CRRN's SI term on GiN's gradient."""
        background, reflection, gradient = self.targets(batch)
        if not self.transfer:
            return self.loss(b, background, r, reflection, g, gradient)
        total, terms = self.loss(b, background, batch.get("real"), batch["input"])
        si_grad = 1 - si_torch(g, gradient)
        terms["si_grad"] = si_grad.detach()
        return total + si_grad, terms

    def preview_row(self, batch: Dict[str, torch.Tensor], estimate: torch.Tensor, index: int) -> List[np.ndarray]:
        _, r, g = self.model(batch["input"][index:index + 1])
        scale = float(g.amax()) or 1.0
        return [to_uint8_rgb(batch["input"][index]), to_uint8_rgb(g[0] / scale), to_uint8_rgb(estimate[index]),
                to_uint8_rgb(r[0]), to_uint8_rgb(batch["background"][index])]

    def metadata(self) -> Dict[str, Any]:
        if self.transfer:
            loss = {**self.loss.describe(), "si_gradient": 1.0}
        else:
            loss = {"name": "crrn", "gamma": self.loss.gamma, "reflection_weight": self.loss.reflection_weight,
                    "reflection_target": REFLECTION_TARGET}
        return {
            "data_recipe": self.data_recipe,
            "loss": loss,
            "schedule": {"total_steps": self.total_steps, "gin_fraction": self.gin_fraction,
                         "paper_epochs": PAPER_EPOCHS, "lr": self.lr, "vgg_init": self.vgg_init,
                         "encoder_lr_scale": self.encoder_lr_scale if self.transfer else None,
                         "init": self.init_source},
        }

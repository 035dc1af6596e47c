"""One training loop for every method and stage.

A *task* (``rm2s.Stage1Task``, ``rm2s.Stage2Task``, ``crrn.CRRNTask``) says what is trained:
its networks, optimisers, one training step, one validation step and a preview picture. The
``Trainer`` does everything around it the same way for all of them: device and mixed precision,
the progress bar, the JSON-lines log, periodic validation PSNR, preview PNGs, checkpoints and
resuming, and data-parallel training over several processes (see ``distributed``): the task's
networks wrapped for gradient averaging, every file written by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
from dereflect.errors import DereflectError, InputError
from dereflect.stop_signals import StopSignals
from safetensors import SafetensorError
from tqdm import tqdm

from .checkpoint import Checkpoint, load_checkpoint, load_state_strict, read_metadata, save_checkpoint
from .data import training_data_record, validation_set_record
from .distributed import DistributedContext, pick_device
from .models import config_class


class TrainingDivergedError(DereflectError, FloatingPointError):
    """A loss term or a weight became NaN or infinite: the run stops without saving what it has now.

    A ``DereflectError``, so the command line prints its one line (what diverged, and what to try) and
    exits with status 2; a ``FloatingPointError`` as before for callers that catch that.
    """


class CheckpointWriteError(DereflectError):
    """A checkpoint could not be written (a full disk, a file-size limit, a folder gone): one line naming the
    file and the last good checkpoint, exit status 2 as any DereflectError; no partial file is left."""


@dataclass
class TrainConfig:
    """What the loop does around a task; recorded in the checkpoint's ``training`` metadata."""

    steps: int = 1000
    batch_size: int = 6
    val_every: int = 100
    preview_every: int = 100
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    #: also keep the checkpoint of every N-th step as ``stepNNNNNNN.safetensors`` (0: off)
    keep_every: int = 0
    #: stop after this many seconds of training, saving ``final.safetensors`` (None: no limit);
    #: the learning-rate schedule stays the one of ``steps``
    time_limit_s: Optional[float] = None


def psnr_torch(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR in dB over a batch of images in [0, 1]."""
    mse = ((estimate.float().clamp(0, 1) - target.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def loss_values(**terms: Any) -> Dict[str, float]:
    """A step's loss terms (tensors or numbers) as floats, read from the device in one transfer:
    a ``float()`` per term would wait for the GPU once per term."""
    tensors = {k: v.detach().float().reshape(()) for k, v in terms.items() if isinstance(v, torch.Tensor)}
    values = dict(zip(tensors, torch.stack(list(tensors.values())).tolist())) if tensors else {}
    return {k: values[k] if k in values else float(v) for k, v in terms.items()}


def to_uint8_rgb(tensor: torch.Tensor) -> np.ndarray:
    """CHW tensor in [0, 1] (1 or 3 channels) -> HxWx3 uint8."""
    array = tensor.detach().float().clamp(0, 1).cpu().numpy()
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return (array.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)


def preview_grid(rows: List[List[np.ndarray]], labels: List[str]) -> np.ndarray:
    """Stack rows of equally sized HxWx3 uint8 images into one picture with column labels."""
    height, width = rows[0][0].shape[:2]
    header = np.full((22, width * len(labels), 3), 255, np.uint8)
    for column, label in enumerate(labels):
        cv2.putText(header, label, (column * width + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    body = [np.concatenate([cv2.resize(img, (width, height)) for img in row], axis=1) for row in rows]
    return np.concatenate([header, *body], axis=0)


class Task:
    """What a trainer trains. Subclasses fill in the hooks below."""

    method: str = ""
    kind: str = ""
    preview_labels: Tuple[str, ...] = ("input", "estimate", "ground truth")

    def networks(self) -> Dict[str, Tuple[str, Dict[str, Any], torch.nn.Module]]:
        """Name -> (arch, config dict, module) of every network saved in the checkpoint."""
        raise NotImplementedError

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def training_step(self, batch: Dict[str, torch.Tensor], step: int,
                      scaler: torch.amp.GradScaler) -> Dict[str, float]:
        """One optimisation step; returns the loss terms for the log."""
        raise NotImplementedError

    @torch.no_grad()
    def validation_step(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, float], torch.Tensor]:
        """Loss terms and the background estimate for a validation batch."""
        raise NotImplementedError

    def preview_row(self, batch: Dict[str, torch.Tensor], estimate: torch.Tensor, index: int) -> List[np.ndarray]:
        return [to_uint8_rgb(batch["input"][index]), to_uint8_rgb(estimate[index]),
                to_uint8_rgb(batch["background"][index])]

    def set_step(self, step: int) -> None:
        """Called before every step, for tasks whose schedule changes with the step."""

    def carry_over(self, checkpoint: Checkpoint) -> None:
        """Called when a run resumes ``checkpoint``: keep what it records of the run's start (such as the
        checkpoint an --init took its weights from), which this run's checkpoints record again."""

    def log_fields(self) -> Dict[str, Any]:
        """Extra fields of every log record (CRRN: the schedule's ``phase``)."""
        return {}

    def phase_note(self, step: int) -> Optional[str]:
        """A line to print when step ``step`` (0-based, about to run) starts a phase of the schedule, or at
        the first step a run trains; None otherwise (one training phase throughout)."""
        return None

    def distribute(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Train through ``wrap(module)`` (DistributedDataParallel) for each network the task trains.

        Called on every rank after the networks are on their device (and with the identity at the end of
        ``fit``, to drop the wrappers). ``training_step`` then runs the wrapped modules (their gradients
        are averaged over the ranks in backward); validation, previews and checkpoints keep using the
        plain ones.
        """
        raise InputError(f"{type(self).__name__} does not support data-parallel training")

    def metadata(self) -> Dict[str, Any]:
        """Extra checkpoint metadata (data recipe, loss weights, ...)."""
        return {}

    def to(self, device: torch.device) -> None:
        for _, _, module in self.networks().values():
            module.to(device)


def encoder_parameter_groups(model: torch.nn.Module, lr: float, encoder_lr_scale: float) -> List[Dict[str, Any]]:
    """Adam parameter groups: pretrained-encoder parameters at ``lr * encoder_lr_scale``, the rest at ``lr``.

    A parameter belongs to the encoder when a part of its name is ``encoder``. Scale 0 freezes the
    encoder (its parameters are left out and stop taking gradients).
    """
    if encoder_lr_scale < 0:
        raise InputError(f"the encoder's learning-rate scale must be >= 0, got {encoder_lr_scale}")
    encoder, rest = [], []
    for name, param in model.named_parameters():
        (encoder if "encoder" in name.split(".") else rest).append(param)
    groups: List[Dict[str, Any]] = [{"params": rest, "lr": lr, "lr_scale": 1.0}]
    if encoder and encoder_lr_scale > 0:
        groups.append({"params": encoder, "lr": lr * encoder_lr_scale, "lr_scale": encoder_lr_scale})
    else:
        for param in encoder:
            param.requires_grad_(False)
    return groups


def dropped_rate(lr: float, step: int, drop_at: Optional[int]) -> float:
    """``lr``, or a tenth of it from step ``drop_at`` on (None: never)."""
    return lr * 0.1 if drop_at is not None and step >= drop_at else lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr`` times its ``lr_scale`` (1 where it has none).

    Tasks call this each step, so a run resumed with another ``--lr`` uses it.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _cycle(loader: Iterable, start_epoch: int, skip_batches: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch, from batch ``skip_batches`` of ``start_epoch`` on.

    A loader without ``set_epoch`` has no positions to resume at: it simply runs on.
    """
    epoch = start_epoch
    while True:
        if hasattr(loader, "set_epoch"):
            if skip_batches:
                loader.set_epoch(epoch, skip_batches)
            else:
                loader.set_epoch(epoch)
        skip_batches = 0
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise InputError("the training data loader produced no batch: too few usable images for one batch")
        epoch += 1


class Trainer:
    """Runs a task for ``config.steps`` steps, writing everything into ``run_dir``.

    With a ``dist`` context of several ranks, every rank runs this with its own share of the batches
    (``train_loader`` built with its rank) and the same task; rank 0 alone validates, logs, writes
    previews and checkpoints (``val_loader`` is used on rank 0 only), and the ranks stop together.
    ``config.batch_size`` is the batch of one rank. Without ``dist`` it is one process on
    ``config.device``.

    ``max_side``, the longest side the networks are meant to run at, is recorded in every checkpoint
    (the runtime and ``export onnx`` run them at that side); None keeps the side of the checkpoint the
    run resumes from, if it records one.
    """

    def __init__(self, task: Task, config: TrainConfig, run_dir: Path, train_loader: Iterable[Dict[str, Any]],
                 val_loader: Optional[Iterable[Dict[str, Any]]] = None, dist: Optional[DistributedContext] = None,
                 max_side: Optional[int] = None):
        self.task = task
        self.config = config
        self.max_side = max_side
        self.run_dir = Path(run_dir)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.dist = dist or DistributedContext(pick_device(config.device))
        self.device = self.dist.device
        # On the device before resuming: loading optimiser state puts it where the parameters are.
        self.task.to(self.device)
        self._wrapped = False
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0
        self.best_val: Optional[float] = None
        # What the best is a best on, and what the run trains on: recorded in every checkpoint, so that a
        # resumed run knows whether the recorded best still applies and can say what data changed.
        self.val_set = validation_set_record(val_loader.dataset) if hasattr(val_loader, "dataset") else None
        self.train_data = training_data_record(train_loader.dataset) if hasattr(train_loader, "dataset") else {}
        #: (path, step) of the newest checkpoint with finite weights (written or resumed from), to name
        #: when the run diverges
        self.last_good: Optional[Tuple[Path, int]] = None
        self.elapsed = 0.0  # training seconds, summed over resumed runs
        #: earlier runs of a resumed training, one entry per machine session (steps, hardware, time)
        self.segments: List[Dict[str, Any]] = []
        self._segment_start = (0, 0.0)  # step and elapsed seconds where this run began
        self._started: Optional[float] = None
        #: "SIGINT", "SIGTERM" or "SIGHUP" when the last ``fit`` was stopped by one (and saved ``last.safetensors``)
        self.stopped_by: Optional[str] = None
        self.history: List[Dict[str, Any]] = []
        #: what ``fit`` writes to log.jsonl as its ``resumed`` record (None: a new run)
        self.resumed_from: Optional[Dict[str, Any]] = None

    def resume(self, checkpoint: Checkpoint) -> None:
        """Restore networks, optimisers and step from a checkpoint of the same task."""
        if checkpoint.metadata.get("kind") != self.task.kind:
            raise InputError(
                f"cannot resume a {self.task.kind} run from a {checkpoint.metadata.get('kind')} checkpoint"
            )
        for name, (arch, config, module) in self.task.networks().items():
            # Through the config class: a key added since the checkpoint was written takes its default.
            recorded = config_class(arch).from_dict(checkpoint.network_spec(name)["config"]).to_dict()
            wanted = config_class(arch).from_dict(config).to_dict()
            differ = [f"{key} (checkpoint: {recorded.get(key)}, this run: {wanted.get(key)})"
                      for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]
            if differ:
                raise InputError(f"cannot resume: network {name!r} config differs from the checkpoint's in "
                                 + "; ".join(differ))
            load_state_strict(module, checkpoint.states[name], f"{checkpoint.path}:{name}")
        for name, optimizer in self.task.optimizers().items():
            if name in checkpoint.optimizer_states:
                optimizer.load_state_dict(checkpoint.optimizer_states[name])
        self.step = checkpoint.step
        if self.max_side is None:
            self.max_side = checkpoint.metadata.get("max_side")
        training = checkpoint.metadata.get("training", {})
        self.best_val = self._carried_best(training.get("best_val_loss"), training.get("val_set"))
        self.task.carry_over(checkpoint)
        self._note_other_data(checkpoint)
        self._note_changed_options(checkpoint)
        self._note_later_checkpoints(checkpoint)
        self.last_good = (Path(checkpoint.path), checkpoint.step)
        self.elapsed = float(training.get("elapsed_s", 0.0))
        # Written to log.jsonl when fit starts: without it the log of a run resumed in its own folder shows a
        # step going backwards (or the same steps twice) with nothing to say why.
        self.resumed_from = {"checkpoint": str(checkpoint.path), "step": checkpoint.step,
                             "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             "elapsed_s": round(self.elapsed, 1)}
        # Checkpoints written before segments were recorded describe their whole run in one entry.
        self.segments = list(training.get("segments") or [{
            "from_step": None, "to_step": checkpoint.step, "hardware": training.get("hardware"),
            "batch_size": training.get("batch_size"), "elapsed_s": training.get("elapsed_s")}])
        self._segment_start = (self.step, self.elapsed)

    def _carried_best(self, best: Optional[float], validated_on: Optional[Dict[str, str]]) -> Optional[float]:
        """The best validation loss a resumed run starts from: the checkpoint's ``best`` when this run
        validates on the same set (``validated_on``, recorded with it), else None, said in one line."""
        if self.val_loader is None:  # nothing validated here: the record goes on unchanged
            self.val_set = validated_on
            return best
        same = validated_on is not None and self.val_set is not None and (
            validated_on.get("digest") == self.val_set["digest"])
        if best is None or same:
            return best
        if self.dist.is_main:
            if validated_on is None:
                why = "the checkpoint does not record which set that was"
            elif self.val_set is None:
                why = f"it was on {validated_on.get('description')}, and this run's validation set cannot be named"
            elif validated_on.get("description") == self.val_set["description"]:
                why = (f"both are {self.val_set['description']}, but their files or settings (synthesis recipe, "
                       "seed, scale) differ")
            else:
                why = (f"it was on {validated_on.get('description')}, this run validates on "
                       f"{self.val_set['description']}")
            print(f"note: the checkpoint's best validation loss ({best:.4g}) is not carried over ({why}); "
                  "best.safetensors will be this run's best")
        return None

    def _note_other_data(self, checkpoint: Checkpoint) -> None:
        """One note line naming what this run trains on differently from ``checkpoint`` (fine-tuning on other
        data is legitimate: nothing is refused)."""
        if not self.dist.is_main:
            return
        recorded = checkpoint.metadata.get("training", {}).get("train_data") or {}
        changes = [f"{key} ({recorded[key]} -> {self.train_data[key]})" for key in sorted(recorded)
                   if key in self.train_data and recorded[key] != self.train_data[key]]
        old_recipe, new_recipe = checkpoint.metadata.get("data_recipe"), self.task.metadata().get("data_recipe")
        if old_recipe and new_recipe and old_recipe != new_recipe:
            parts = [len(recipe.get("mix", [None])) for recipe in (old_recipe, new_recipe)]
            # The crop size is the settings note's (--size old -> new), not a change of data.
            keys = [key for key in _differing_keys(old_recipe, new_recipe) if key.rsplit(".", 1)[-1] != "size"]
            shown = ""
            if parts[0] != parts[1]:  # --mix / --clean-fraction added or dropped: every key would differ
                shown = " -> ".join("one recipe" if n == 1 else f"a mix of {n}" for n in parts)
            elif keys:
                shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            if shown:
                changes.append(f"synthesis recipe ({shown})")
        if changes:
            print(f"note: this run trains on other data than {checkpoint.path}: {'; '.join(changes)}")

    def _note_changed_options(self, checkpoint: Checkpoint) -> None:
        """One note line naming each setting this run trains with differently from ``checkpoint`` (learning
        rate, batch size, crop size, loss weights, schedule ...), old -> new. Nothing is refused: a
        continuation at a lower rate is legitimate, but a changed setting should never go unnoticed."""
        if not self.dist.is_main:
            return
        changes = changed_settings(checkpoint.metadata, self.task.metadata(),
                                   {**asdict(self.config), **self._batch_sizes()})
        if changes:
            print(f"note: this run trains with other settings than {checkpoint.path}: {'; '.join(changes)}")

    def _note_later_checkpoints(self, checkpoint: Checkpoint) -> None:
        """Name the checkpoints of this run folder that are further on than ``checkpoint``: resuming an
        earlier step in place overwrites those this run writes again (last, best, final, the same stepN)
        and leaves the others, which belong to the earlier run's later steps. They are not deleted."""
        if not self.dist.is_main or not self.run_dir.is_dir():
            return
        later = []
        for path in sorted(self.run_dir.glob("*.safetensors")):
            if checkpoint.path is not None and path.resolve() == Path(checkpoint.path).resolve():
                continue
            try:
                step = read_metadata(path)["step"]
            except DereflectError:  # not a checkpoint of ours, or unreadable: not this note's business
                continue
            if step > checkpoint.step:
                later.append(f"{path.name} (step {step})")
        if later:
            shown = ", ".join(later[:6]) + (f" and {len(later) - 6} more" if len(later) > 6 else "")
            print(f"note: {self.run_dir} holds checkpoints further on than step {checkpoint.step} that this run "
                  f"resumes from: {shown}; last, best and final (and a stepN this run reaches) will be "
                  "overwritten by this run's, the others are left as they are")

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` (rank 0 only; other ranks write nothing and get the same path).

        Weights that are no longer finite are never written: TrainingDivergedError instead. Every rank
        checks (their weights are the same), so all of them stop at the same point.
        """
        broken = [network for network, (_, _, module) in self.task.networks().items() if not _finite(module)]
        if broken:
            raise self._diverged(f"the weights of {', '.join(broken)} are no longer finite")
        path = self.run_dir / name
        if not self.dist.is_main:
            return path
        try:
            path = self._write_checkpoint(path)
        except (OSError, SafetensorError) as exc:
            # A full disk or a file-size limit: safetensors' own error is a traceback-worthy
            # "Error while serializing: I/O error: ..."; the staged write has removed its partial file.
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {_write_failure(exc)}; "
                                       f"{self._last_good_text()}") from exc
        self.last_good = (path, self.step)
        return path

    def _last_good_text(self) -> str:
        if self.last_good is None:
            return "no checkpoint of this run was written before it"
        path, step = self.last_good
        return f"the last good checkpoint is {path} (step {step}): free some space and go on with --resume {path}"

    def _write_checkpoint(self, path: Path) -> Path:
        return save_checkpoint(
            path,
            method=self.task.method,
            kind=self.task.kind,
            networks=self.task.networks(),
            step=self.step,
            training={**asdict(self.config), "device": str(self.device), "best_val_loss": self.best_val,
                      "val_set": self.val_set, "train_data": self.train_data,
                      "hardware": _hardware(self.device), "elapsed_s": round(self._elapsed(), 1),
                      **self._batch_sizes(), "segments": self.segments + [self._current_segment()]},
            optimizers=self.task.optimizers(),
            extra=self.task.metadata(),
            max_side=self.max_side,
        )

    def _diverged(self, what: str) -> TrainingDivergedError:
        """The error of a run that diverged at the step in progress: what went, and what to try."""
        if self.last_good is None:
            advice = "Start again with a lower --lr (no checkpoint was written before it)"
        else:
            path, step = self.last_good
            advice = f"Try a lower --lr, or go on from the last good checkpoint with --resume {path} (step {step})"
        return TrainingDivergedError(f"training diverged at step {self.step + 1}: {what}; nothing of it was "
                                     f"saved. {advice}")

    def _batch_sizes(self) -> Dict[str, int]:
        """``batch_size`` is per rank (the option); a step trains on ``global_batch_size`` samples."""
        return {"world_size": self.dist.world_size, "batch_size": self.config.batch_size,
                "global_batch_size": self.config.batch_size * self.dist.world_size}

    def _current_segment(self) -> Dict[str, Any]:
        start_step, start_elapsed = self._segment_start
        return {"from_step": start_step, "to_step": self.step, "hardware": _hardware(self.device),
                **self._batch_sizes(), "elapsed_s": round(self._elapsed() - start_elapsed, 1)}

    def _elapsed(self) -> float:
        return self.elapsed + (time.monotonic() - self._started if self._started is not None else 0.0)

    def validate(self) -> Dict[str, float]:
        if self.val_loader is None:
            return {}
        if hasattr(self.val_loader, "set_epoch"):
            self.val_loader.set_epoch(0)  # the same validation samples every time
        totals: Dict[str, float] = {}
        count = 0
        with self._evaluating():
            for batch in self.val_loader:
                batch = _to_device(batch, self.device)
                terms, estimate = self.task.validation_step(batch)
                terms["psnr"] = psnr_torch(estimate, batch["background"])
                terms["psnr_input"] = psnr_torch(batch["input"], batch["background"])
                for key, value in terms.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                if count == 0:
                    self.write_preview(batch, estimate, name=f"val_{self.step:07d}.png")
                count += 1
        return {f"val_{k}": v / max(count, 1) for k, v in totals.items()}

    @contextlib.contextmanager
    def _evaluating(self):
        """Networks in eval mode and no gradients inside; back in training mode after."""
        modules = [module for _, _, module in self.task.networks().values()]
        for module in modules:
            module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module in modules:
                module.train()

    def write_preview(self, batch: Dict[str, torch.Tensor], estimate: torch.Tensor, name: str) -> Path:
        rows = [self.task.preview_row(batch, estimate, i) for i in range(min(4, estimate.shape[0]))]
        picture = preview_grid(rows, list(self.task.preview_labels))
        path = self.run_dir / "previews" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        return path

    def log(self, record: Dict[str, Any]) -> None:
        """Append ``record`` to ``log.jsonl`` (rank 0 only)."""
        if not self.dist.is_main:
            return
        self.history.append(record)
        with open(self.run_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def fit(self) -> Path:
        """Train until ``config.steps`` or the time limit; returns the path of ``final.safetensors``.

        Ctrl+C (SIGINT) or SIGTERM stops the run after the step in progress and saves
        ``last.safetensors`` instead, to resume from (its path is returned; ``stopped_by`` names the
        signal).
        """
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.task.to(self.device)
        for _, _, module in self.task.networks().values():
            module.train()
        if self.dist.enabled and not self._wrapped:
            self.task.distribute(self.dist.wrap)
            self._wrapped = True
        steps_per_epoch = max(len(self.train_loader), 1) if hasattr(self.train_loader, "__len__") else 1
        # Resuming continues inside the epoch where the run stopped, as an uninterrupted run would.
        batches = _cycle(self.train_loader, *divmod(self.step, steps_per_epoch))
        if self.resumed_from is not None and main:
            # Once per fit: a trainer that fits again goes on from where it is, no new resume.
            self.log({"step": self.step, "resumed": self.resumed_from, "time": round(self._elapsed(), 2)})
            self.resumed_from = None
        if self.step == 0 and self.val_loader is not None and main:
            self.log({"step": 0, **self.validate(), "time": 0.0})
        self.stopped_by = None
        try:
            with StopSignals() as signals:
                self._run_steps(batches, signals)
        finally:  # also when a step fails: loader workers left running would keep the process from exiting
            batches.close()
            for loader in (self.train_loader, self.val_loader):
                if hasattr(loader, "close"):
                    loader.close()
        # After Ctrl+C or SIGTERM the finished steps go where --resume expects them.
        final = self.save("last.safetensors" if self.stopped_by else "final.safetensors")
        if self._wrapped:
            # The gradient-averaging wrappers go while every rank is still here, so the process group is
            # torn down when the run leaves it; a wrapper freed only at exit, with the group destroyed and
            # a peer gone, was seen to hang a rank in gloo's teardown (torchrun then never returned).
            self.task.distribute(lambda module: module)
            self._wrapped = False
        self.dist.barrier()  # every rank returns once the checkpoint is written
        self.elapsed, self._started = self._elapsed(), None
        return final

    def _run_steps(self, batches: Iterator[Dict[str, Any]], signals: StopSignals) -> None:
        """Steps until ``config.steps``, the time limit or a stop signal, with logs, validation and saves."""
        main = self.dist.is_main
        started = self._started = time.monotonic()
        first_step = self.step
        # A bar on a terminal; in a log file (a run in the background) one line per log record instead
        # of the bar's redraws.
        bar = tqdm(total=self.config.steps, initial=self.step, desc=f"{self.task.kind}", unit="step",
                   dynamic_ncols=True, disable=None if main else True)
        lines = main and bar.disable
        running: Dict[str, float] = {}
        running_steps = 0
        # Whether to stop is decided by all ranks together, so that none waits for a step the others skip.
        timed_out, signalled = self.dist.any_rank(self._out_of_time(), signals.received is not None)
        try:
            while self.step < self.config.steps:
                if timed_out or signalled:
                    # A rank that saw no signal itself was stopped with the others by torchrun (SIGTERM).
                    self.stopped_by = (signals.received or "SIGTERM") if signalled else None
                    reason = self.stopped_by or "time limit"
                    if main:
                        tqdm.write(f"stopped by {reason} at step {self.step}; saving "
                                   f"{'last' if self.stopped_by else 'final'}.safetensors")
                    self.log({"step": self.step, "stopped": reason, "time": round(self._elapsed(), 2)})
                    break
                waiting = time.perf_counter()
                batch = next(batches)
                loaded = time.perf_counter()
                batch = _to_device(batch, self.device)
                self.task.set_step(self.step)
                note = self.task.phase_note(self.step)
                if note and main:
                    tqdm.write(note)
                terms = self.task.training_step(batch, self.step, self.scaler)
                stepped = time.perf_counter()  # the loss terms are on the host: the step has finished
                non_finite, timed_out, signalled = self.dist.any_rank(
                    not all(math.isfinite(v) for v in terms.values()), self._out_of_time(),
                    signals.received is not None)
                if non_finite:
                    bad = {key: value for key, value in terms.items() if not math.isfinite(value)}
                    self.log({"step": self.step + 1, "stopped": "non-finite loss", "terms": sorted(bad),
                              "time": round(self._elapsed(), 2)})
                    what = (", ".join(f"{key}={value}" for key, value in bad.items()) if bad
                            else "a loss term on another rank")
                    raise self._diverged(f"the loss is not finite ({what})")
                self.step += 1
                # Seconds waiting for the loader, and for the transfer plus the optimisation step.
                terms = {**terms, "data_s": loaded - waiting, "step_s": stepped - loaded}
                for key, value in terms.items():
                    running[key] = running.get(key, 0.0) + value
                running_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{terms.get('loss', 0.0):.4f}")
                record: Dict[str, Any] = {}
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    # Over the steps summed since the last record: a run resumed off the log grid has fewer.
                    record.update({k: v / running_steps for k, v in running.items()})
                    running, running_steps = {}, 0
                if main and (self.step % self.config.val_every == 0 or self.step == self.config.steps):
                    record.update(self.validate())
                    val_loss = record.get("val_loss")
                    # A NaN loss is no best, also when there is none yet (it would compare as not better).
                    if (val_loss is not None and math.isfinite(val_loss)
                            and (self.best_val is None or val_loss < self.best_val)):
                        self.best_val = val_loss
                        self.save("best.safetensors")
                if main and self.config.preview_every and self.step % self.config.preview_every == 0:
                    with self._evaluating():
                        _, estimate = self.task.validation_step(batch)
                        self.write_preview(batch, estimate, f"train_{self.step:07d}.png")
                if record:
                    elapsed = time.monotonic() - started
                    # time: seconds of training since step 0, summed over resumed runs (the rate is this run's)
                    record.update({"step": self.step, "time": round(self._elapsed(), 2),
                                   "steps_per_s": round((self.step - first_step) / max(elapsed, 1e-9), 3),
                                   **self.task.log_fields()})
                    self.log(record)
                    if lines:
                        print(progress_line(record, self.config.steps), flush=True)
                if self.step % self.config.save_every == 0:
                    self.save("last.safetensors")
                if self.config.keep_every and self.step % self.config.keep_every == 0:
                    self.save(f"step{self.step:07d}.safetensors")
        finally:
            bar.close()

    def _out_of_time(self) -> bool:
        limit = self.config.time_limit_s
        return limit is not None and time.monotonic() - self._started >= limit


def progress_line(record: Dict[str, Any], steps: int) -> str:
    """One log record as a line of text: the step, the loss, the rate and any validation figures."""
    parts = [f"step {record['step']}/{steps}"]
    if "phase" in record:
        parts.append(f"phase {record['phase']}")
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    parts.append(f"{record['steps_per_s']:.2f} steps/s")
    parts += [f"{key} {value:.4g}" for key, value in record.items()
              if key.startswith("val_") and isinstance(value, (int, float))]
    return "  ".join(parts)


def _write_failure(exc: BaseException) -> str:
    """Why a write failed, in one line: the OS's words where it gave them (safetensors wraps them in its own)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split("I/O error: ", 1)[-1]


#: Settings of the training loop a resumed run may change without a note: the run's length and
#: bookkeeping (--steps, the periods, device, time limit), which every continuation sets anew.
_UNNOTED_TRAINING = {"steps", "val_every", "preview_every", "save_every", "log_every", "keep_every", "device",
                     "time_limit_s", "global_batch_size"}  # (batch_size and world_size say the global one)
#: Task metadata that says where weights came from, not how they are trained.
_UNNOTED_TASK = {"data_recipe", "schedule.init", "stage2.stage1_source"}


def changed_settings(recorded: Dict[str, Any], task: Dict[str, Any], training: Dict[str, Any]) -> List[str]:
    """``key old -> new`` for each training setting that differs between a checkpoint's metadata
    (``recorded``) and a run's (``task``: its task's metadata; ``training``: its loop's settings).

    The crop sizes are read from the data recipes (``size``); other recipe changes are the data note's.
    A key the checkpoint does not record (written by an older version) is not compared.
    """
    changes = []
    old_training = recorded.get("training") or {}
    for key in sorted(training):
        if key in _UNNOTED_TRAINING or key not in old_training:
            continue
        if old_training[key] != training[key]:
            changes.append(f"{key} {_shown(old_training[key])} -> {_shown(training[key])}")
    old_sizes = _recipe_sizes(recorded.get("data_recipe"))
    new_sizes = _recipe_sizes(task.get("data_recipe"))
    if old_sizes and new_sizes and old_sizes != new_sizes:
        changes.append(f"size {old_sizes} -> {new_sizes}")
    for section in sorted(task):
        if section in _UNNOTED_TASK or section not in recorded:
            continue
        for key in _differing_keys(recorded[section], task[section], f"{section}."):
            if key in _UNNOTED_TASK or any(key.startswith(f"{skip}.") for skip in _UNNOTED_TASK):
                continue
            if _lookup(recorded, key, _MISSING) is _MISSING:
                continue  # a setting added since the checkpoint was written: not a change the user made
            changes.append(f"{key} {_shown(_lookup(recorded, key))} -> {_shown(_lookup(task, key))}")
    return changes


def _recipe_sizes(recipe: Any) -> str:
    """A data recipe's crop sizes as --size writes them ('64', '96x160,224x288'; '' when it records none)."""
    if not isinstance(recipe, dict):
        return ""
    # A mix (--mix, --clean-fraction) records its parts as {"weight", "recipe"}, each at the run's sizes.
    sizes = recipe.get("size") if "size" in recipe else _lookup(recipe, "mix.0.recipe.size")
    if not isinstance(sizes, list):
        return ""
    return ",".join(str(h) if h == w else f"{h}x{w}" for h, w in (tuple(size) for size in sizes))


_MISSING = object()


def _lookup(record: Dict[str, Any], dotted: str, missing: Any = None) -> Any:
    """The value at key path ``dotted`` ("loss.vgg.input", "mix.0.recipe"), else ``missing``."""
    value: Any = record
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return missing
    return value


def _shown(value: Any) -> str:
    """A setting's value in a note: numbers as %g, None as 'none', the rest as JSON."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def _finite(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``module`` is finite (one read from the device)."""
    checks = [torch.isfinite(t).all() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def _differing_keys(old: Any, new: Any, prefix: str = "") -> List[str]:
    """The dotted keys (``reflection_weight``, ``mix.1.weight``) where two recorded recipes differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for name in sorted(set(old) | set(new))
                for key in _differing_keys(old.get(name), new.get(name), f"{prefix}{name}.")]
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and any(isinstance(item, dict) for item in old + new)):
        return [key for index, (a, b) in enumerate(zip(old, new)) for key in _differing_keys(a, b, f"{prefix}{index}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    """The tensors of a batch on ``device`` (names and other non-tensors are dropped)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def resume_trainer(trainer: Trainer, path: Optional[str]) -> None:
    if path:
        trainer.resume(load_checkpoint(path))

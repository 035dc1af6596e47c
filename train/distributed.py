"""Data-parallel training across processes: one process per GPU (or per CPU worker), started by torchrun.

``torchrun --nproc_per_node N -m dereflect train ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
in each process; :func:`distributed` reads them, joins the process group (NCCL on GPUs, gloo on CPUs)
and gives a :class:`DistributedContext`. The trainer asks the context to wrap the trained networks in
:class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged over the ranks in backward),
to take decisions every rank must share (stop on the time limit, a non-finite loss), and writes files on
rank 0 only. Without torchrun (``WORLD_SIZE`` unset or 1) the context is a single process and wraps
nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, List

import torch
import torch.distributed as dist
from dereflect.errors import InputError

#: How long a rank waits for the others at a collective. Rank 0 validates and writes checkpoints while the
#: others wait at their next gradient exchange, so this must cover the longest validation.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def pick_device(name: str = "auto") -> torch.device:
    """The device a single process trains on: ``auto`` (CUDA when there is a GPU), ``cpu``, ``cuda:1`` ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run (a single process: rank 0 of 1)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates, logs and writes files."""
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (its gradients averaged over the ranks), or as it is alone.

        The wrapper shares the module's parameters; call the plain module where no gradient is exchanged
        (validation, previews), so those never wait for the other ranks.
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def any_rank(self, *flags: bool) -> List[bool]:
        """Each flag OR-ed over the ranks (a collective: every rank must call it at the same point)."""
        if not self.enabled:
            return [bool(flag) for flag in flags]
        values = torch.tensor([int(bool(flag)) for flag in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(value) for value in values.tolist()]

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for alone)."""
        if self.enabled:
            dist.barrier()


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{name} is {text!r}, not a whole number: start data-parallel training with torchrun "
                         "(torchrun --nproc_per_node N -m dereflect train ...)") from None


def _rank_device(name: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its machine: its own GPU, or the CPU."""
    device = pick_device(name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise InputError(f"--device {name}: under torchrun each process takes the GPU of its local rank; "
                         "pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise InputError(f"local rank {local_rank} has no GPU of its own: this machine has {count}; start at "
                         f"most {count} processes per machine (torchrun --nproc_per_node {count})")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistributedContext]:
    """The context of this process: joins torchrun's process group on entry and leaves it on exit.

    ``device`` is the ``--device`` option: under torchrun ``cuda`` (or ``auto`` with GPUs) means the GPU of
    this process's local rank, with NCCL; ``cpu`` means gloo. (A program that sets up its own process group
    builds a :class:`DistributedContext` itself.)
    """
    world_size = _env_int("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 1
    if world_size <= 1:
        yield DistributedContext(pick_device(device))
        return
    if not dist.is_available():
        raise InputError("WORLD_SIZE is set but this torch build has no torch.distributed")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    target = _rank_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)  # pinned-memory threads and NCCL use the current device
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=target)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield DistributedContext(target, rank, world_size, local_rank)
    finally:
        dist.destroy_process_group()

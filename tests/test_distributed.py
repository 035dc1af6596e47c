"""Data-parallel training: two gloo processes on the CPU against one process on the same samples.

One module fixture starts two ranks (spawned processes) that run every scenario once and save what
they saw; the tests compare that with single-process runs here. Networks are tiny and without
BatchNorm, so that a step on two ranks of two samples equals a step on one process of four up to float
rounding (BatchNorm would normalise each rank's batch on its own, as it does in real DDP training).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import write_photo_folder  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.train import distributed as distributed_module  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dereflect.train.crrn import CRRNTask  # noqa: E402
from dereflect.train.data import SyntheticPairs, make_loader  # noqa: E402
from dereflect.train.distributed import DistributedContext, distributed  # noqa: E402
from dereflect.train.losses import FeatureLoss, RestorationLoss  # noqa: E402
from dereflect.train.models import build_model  # noqa: E402
from dereflect.train.models.crrn import CRRNConfig  # noqa: E402
from dereflect.train.models.mobilenet_v2 import MobileNetV2Encoder  # noqa: E402
from dereflect.train.models.rm2s import DiscriminatorConfig, UNetConfig  # noqa: E402
from dereflect.train.rm2s import Stage2Task  # noqa: E402
from dereflect.train.synthesis import SynthesisConfig  # noqa: E402
from dereflect.train.trainer import TrainConfig, Trainer  # noqa: E402

WORLD = 2
PER_RANK = 2  # samples per rank and step; the single-process references take WORLD * PER_RANK
SIZE = (64, 96)
#: Generous for two tiny processes on a busy 2-core machine, short enough that a rank stuck in a
#: collective fails the test instead of hanging it.
RUN_TIMEOUT_S = 240


def _loaders(photos: Path, batch: int, rank: int = 0, world_size: int = 1):
    recipe = SynthesisConfig.crrn(size=[SIZE])
    train = SyntheticPairs(photos, recipe, seed=0, exclude=("test_",))
    val = SyntheticPairs(photos, recipe, seed=9, length=2, include=("test_",))
    return (make_loader(train, batch, seed=0, workers=0, rank=rank, world_size=world_size),
            make_loader(val, 2, shuffle=False, seed=9, workers=0, drop_last=False))


def _crrn_task(steps: int, gin_fraction: float) -> CRRNTask:
    torch.manual_seed(0)  # the same initial weights in every process
    return CRRNTask(CRRNConfig.preset("lite", norm="none"), total_steps=steps, gin_fraction=gin_fraction, lr=1e-3)


def _stage2_task(stage1: Path, gp_weight: float) -> Stage2Task:
    torch.manual_seed(0)
    loss = RestorationLoss(FeatureLoss(MobileNetV2Encoder(3).state_dict()))  # a random feature network
    return Stage2Task(UNetConfig.preset("lite", in_channels=9, widths=(8, 8, 16, 16, 16), norm="none"),
                      load_checkpoint(stage1), None, critic=DiscriminatorConfig(widths=(8, 8, 8, 8), norm="none"),
                      transfer_loss=loss, gp_weight=gp_weight, lr=1e-3, critic_lr=1e-3)


def _config(steps: int, **options) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "batch_size": PER_RANK, "val_every": steps, "preview_every": steps,
                          "save_every": 1, "log_every": 1, "device": "cpu", **options})


def _state(task) -> dict:
    """Weights and the last step's gradients of every network of a task."""
    out = {}
    for name, (_, _, module) in task.networks().items():
        for key, param in module.named_parameters():
            out[f"{name}.{key}"] = param.detach().clone()
            if param.grad is not None:
                out[f"grad:{name}.{key}"] = param.grad.detach().clone()
    return out


def _fit(task, config: TrainConfig, run_dir: Path, photos: Path, context=None) -> Trainer:
    rank, world = (context.rank, context.world_size) if context else (0, 1)
    trainer = Trainer(task, config, run_dir, *_loaders(photos, config.batch_size, rank, world), dist=context)
    trainer.fit()
    return trainer


def _rank_main(rank: int, port: int, work: Path) -> None:
    """One rank of the two-process run: every scenario in turn, results saved under ``work``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    distributed_module.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=RUN_TIMEOUT_S // 2)
    photos = work / "photos"
    with distributed("cpu") as context:
        # The samples each rank's loader gives for three steps (two epochs of two steps).
        loader, _ = _loaders(photos, PER_RANK, rank, WORLD)
        seen = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen += [batch["input"] for batch in loader]
        torch.save(seen[:3], work / f"samples-{rank}.pt")

        # CRRN's schedule: step 0 trains GiN alone, step 1 everything.
        task = _crrn_task(2, gin_fraction=0.5)
        _fit(task, _config(2), work / f"crrn-{rank}", photos, context)
        torch.save({"state": _state(task), "phase": task.phase}, work / f"crrn-{rank}.pt")

        # The GAN stage: generator and critic, one step with weight clipping, two with the gradient penalty.
        for gp_weight, steps in ((0.0, 1), (10.0, 2)):
            task = _stage2_task(work / "stage1.safetensors", gp_weight)
            _fit(task, _config(steps), work / f"gan{gp_weight:g}-{rank}", photos, context)
            torch.save(_state(task), work / f"gan{gp_weight:g}-{rank}.pt")

        # A time limit reached on rank 1 only: both ranks must stop (rank 0 would otherwise wait forever).
        limited = _config(3, time_limit_s=1e-9 if rank == 1 else None)
        trainer = _fit(_crrn_task(3, 0.0), limited, work / f"limited-{rank}", photos, context)
        torch.save({"step": trainer.step}, work / f"limited-{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The folder where the two ranks left their results (photos and stage-1 checkpoint made here)."""
    work = tmp_path_factory.mktemp("ddp")
    write_photo_folder(work / "photos", 8)
    write_photo_folder(work / "photos", 2, seed=1, prefix="test_")
    torch.manual_seed(1)
    config = UNetConfig.preset("lite", widths=(8, 8, 16, 16, 16), norm="none")
    save_checkpoint(work / "stage1.safetensors", method="rm2s", kind="rm2s-stage1",
                    networks={"stage1": ("rm2s_unet", config.to_dict(), build_model("rm2s_unet", config.to_dict()))})
    import torch.multiprocessing as mp

    ranks = mp.start_processes(_rank_main, args=(_free_port(), work), nprocs=WORLD, start_method="spawn",
                               join=False)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ranks.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the two ranks did not finish in {RUN_TIMEOUT_S} s (a collective left waiting?)")
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
    return work


def _assert_close(got: dict, want: dict, what: str, lr: float = 1e-3) -> None:
    """Gradients equal up to float rounding (relative to each tensor's scale); weights within 5 % of a step.

    The weights get a looser bound because Adam's and RMSprop's first steps divide each gradient by its
    own size: a gradient near zero that rounds differently moves its weight by a fraction of the rate.
    Gradients that were not averaged would differ by their own size, and weights by whole steps.
    """
    assert set(got) == set(want), what
    for key, value in want.items():
        if key.startswith("grad:"):
            close = torch.allclose(got[key], value, rtol=1e-4, atol=1e-5 * float(value.abs().max()) + 1e-12)
        else:
            close = torch.allclose(got[key], value, rtol=0.0, atol=0.05 * lr)
        assert close, f"{what}: {key} differs by up to {float((got[key] - value).abs().max()):.3g}"


def test_loaders_give_each_rank_its_own_samples_and_together_the_single_process_batches(two_ranks):
    ranks = [torch.load(two_ranks / f"samples-{rank}.pt") for rank in range(WORLD)]
    loader, _ = _loaders(two_ranks / "photos", WORLD * PER_RANK)
    single = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        single += [batch["input"] for batch in loader]
    for step in range(3):
        mine, theirs = ranks[0][step], ranks[1][step]
        assert mine.shape == theirs.shape == (PER_RANK, 3, *SIZE)
        assert not any(torch.equal(a, b) for a in mine for b in theirs), f"step {step}: a sample on both ranks"
        assert torch.equal(torch.cat([mine, theirs]), single[step]), f"step {step}: not the global batch"


def test_gradients_are_averaged_over_ranks_through_crrns_staged_schedule(two_ranks, tmp_path):
    ranks = [torch.load(two_ranks / f"crrn-{rank}.pt") for rank in range(WORLD)]
    task = _crrn_task(2, gin_fraction=0.5)
    _fit(task, _config(2, batch_size=WORLD * PER_RANK), tmp_path / "single", two_ranks / "photos")
    assert ranks[0]["phase"] == ranks[1]["phase"] == task.phase == "joint"
    single = _state(task)
    assert any(key.startswith("grad:crrn.iin") for key in single)  # the last step trained IiN too
    for rank, result in enumerate(ranks):
        _assert_close(result["state"], single, f"rank {rank} against one process on both ranks' samples")


@pytest.mark.parametrize("gp_weight", [0.0, 10.0])
def test_gan_stage_keeps_generator_and_critic_in_step_on_every_rank(two_ranks, tmp_path, gp_weight):
    ranks = [torch.load(two_ranks / f"gan{gp_weight:g}-{rank}.pt") for rank in range(WORLD)]
    for key, value in ranks[0].items():
        if not key.startswith("grad:"):
            assert torch.equal(value, ranks[1][key]), f"{key} differs between the ranks"
    if gp_weight == 0:
        assert all(float(value.abs().max()) <= 0.01 + 1e-7 for key, value in ranks[0].items()
                   if key.startswith("discriminator") and value.ndim > 1), "critic weights not clipped"
        # The penalty draws random interpolates per process; with weight clipping one step is comparable.
        task = _stage2_task(two_ranks / "stage1.safetensors", gp_weight)
        _fit(task, _config(1, batch_size=WORLD * PER_RANK), tmp_path / "single", two_ranks / "photos")
        # After the step the critic's gradients also hold the generator loss's share, which each rank keeps
        # to itself (it never steps the critic); the critic's averaged gradients show in its new weights.
        ours = {k: v for k, v in ranks[0].items() if not k.startswith("grad:discriminator")}
        single = {k: v for k, v in _state(task).items() if not k.startswith("grad:discriminator")}
        _assert_close(ours, single, "one GAN step on two ranks against one process")


def test_only_rank_zero_writes_and_its_checkpoint_records_the_batch_sizes(two_ranks):
    main_dir, other_dir = two_ranks / "crrn-0", two_ranks / "crrn-1"
    assert not other_dir.exists()
    assert {p.name for p in main_dir.iterdir()} >= {"log.jsonl", "final.safetensors", "last.safetensors", "previews"}
    records = [json.loads(line) for line in (main_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and "val_psnr" in records[-1]
    assert all(r["data_s"] >= 0 and r["step_s"] > 0 for r in records[1:])
    training = load_checkpoint(main_dir / "final.safetensors").metadata["training"]
    assert (training["world_size"], training["batch_size"], training["global_batch_size"]) == (2, 2, 4)
    assert training["segments"][-1]["world_size"] == 2


def test_a_time_limit_on_one_rank_stops_every_rank(two_ranks):
    assert [torch.load(two_ranks / f"limited-{rank}.pt")["step"] for rank in range(WORLD)] == [0, 0]
    last = json.loads((two_ranks / "limited-0" / "log.jsonl").read_text().splitlines()[-1])
    assert last["stopped"] == "time limit"
    assert load_checkpoint(two_ranks / "limited-0" / "final.safetensors").step == 0


def test_a_single_process_run_resumes_from_a_two_rank_checkpoint(two_ranks, tmp_path):
    task = _crrn_task(3, gin_fraction=0.5)
    trainer = Trainer(task, _config(3, batch_size=WORLD * PER_RANK), tmp_path / "resumed",
                      *_loaders(two_ranks / "photos", WORLD * PER_RANK))
    trainer.resume(load_checkpoint(two_ranks / "crrn-0" / "final.safetensors"))
    final = load_checkpoint(trainer.fit())
    assert final.step == 3
    segments = final.metadata["training"]["segments"]
    assert [(s["from_step"], s["to_step"], s["world_size"], s["global_batch_size"]) for s in segments] == [
        (0, 2, 2, 4), (2, 3, 1, 4)]


def test_torchrun_trains_crrn_on_two_ranks_and_one_process_resumes_it(tmp_path, capsys):
    photos = write_photo_folder(tmp_path / "photos", 8)
    write_photo_folder(photos, 2, seed=1, prefix="test_")
    out = tmp_path / "run"
    options = ["--config", "lite-scratch", "--recipe", "paper", "--device", "cpu", "--data", str(photos),
               "--size", "64x96", "--batch-size", "1", "--gin-fraction", "0.5", "--val-count", "2",
               "--workers", "0", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Output to files, not pipes: torchrun starts each rank in a session of its own, so a rank left
    # behind (one was seen hanging in gloo's teardown) would keep a pipe open and a read of it waiting.
    # On a timeout torchrun and its ranks are killed, so that none outlives the test.
    logs = {name: tmp_path / f"torchrun.{name}" for name in ("out", "err")}
    with open(logs["out"], "w") as stdout_file, open(logs["err"], "w") as stderr_file:
        launched = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
             "-m", "dereflect", "train", "crrn", *options, "--steps", "2", "--out", str(out)],
            stdout=stdout_file, stderr=stderr_file, text=True, env=env)
        try:
            launched.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            ranks = Path(f"/proc/{launched.pid}/task/{launched.pid}/children")
            for pid in (ranks.read_text().split() if ranks.exists() else []):
                os.kill(int(pid), signal.SIGKILL)
            launched.kill()
            launched.wait()
            pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s: {logs['err'].read_text()[-3000:]}")
    stdout, stderr = logs["out"].read_text(), logs["err"].read_text()
    assert launched.returncode == 0, stderr[-3000:]
    assert stdout.count("checkpoint:") == 1  # rank 0 alone reports
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    checkpoint = load_checkpoint(out / "final.safetensors")
    assert checkpoint.metadata["training"]["global_batch_size"] == 2

    assert main(["train", "crrn", *options, "--steps", "3", "--resume", str(out / "final.safetensors"),
                 "--out", str(tmp_path / "resumed")]) == 0
    resumed = load_checkpoint(tmp_path / "resumed" / "final.safetensors")
    assert resumed.step == 3 and resumed.metadata["training"]["world_size"] == 1
    assert "checkpoint:" in capsys.readouterr().out


def test_every_task_moves_its_losses_with_its_networks_to_the_rank_device():
    # Each rank puts its task on its own GPU; a loss left behind on the CPU fails the first step there.
    features = RestorationLoss(FeatureLoss(MobileNetV2Encoder(3).state_dict()))
    task = CRRNTask(CRRNConfig.preset("lite", norm="none"), total_steps=2, transfer_loss=features)
    task.to(torch.device("meta"))
    assert {t.device.type for t in [*task.model.parameters(), *task.loss.buffers()]} == {"meta"}


def test_under_torchrun_a_numbered_gpu_or_a_missing_rank_is_refused(monkeypatch):
    from dereflect.errors import InputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(InputError, match="RANK"):
        with distributed("cpu"):
            pass
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        with pytest.raises(InputError, match="local rank"):
            with distributed("cuda:1"):
                pass
    else:
        with pytest.raises(InputError, match="no CUDA GPU"):
            with distributed("cuda"):
                pass
    single = DistributedContext(torch.device("cpu"))
    module = torch.nn.Linear(2, 2)
    assert single.wrap(module) is module and single.any_rank(True, False) == [True, False]

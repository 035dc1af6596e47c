"""The training loader: batches split over ranks, resuming mid-epoch, decoded images kept in memory."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import smooth_photo, write_photo_folder  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.errors import InputError  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint  # noqa: E402
from dereflect.train.crrn import CRRNTask  # noqa: E402
from dereflect.train.data import (  # noqa: E402
    DecodedImages,
    ImageSkippedWarning,
    MixedPairs,
    MultiSizeBatchSampler,
    RealPairs,
    SyntheticPairs,
    make_loader,
    read_rgb,
)
from dereflect.train.models.crrn import CRRNConfig  # noqa: E402
from dereflect.train.synthesis import SynthesisConfig  # noqa: E402
from dereflect.train.trainer import TrainConfig, Trainer  # noqa: E402

# ----------------------------------------------------------------------------- batches over ranks


def test_each_rank_takes_its_slice_of_every_global_batch():
    world, batch = 3, 2
    single = MultiSizeBatchSampler(20, batch * world, n_sizes=2, seed=4)
    ranks = [MultiSizeBatchSampler(20, batch, n_sizes=2, seed=4, rank=r, world_size=world) for r in range(world)]
    assert [len(r) for r in ranks] == [len(single)] * world == [3] * world
    for epoch in (0, 1):
        per_rank = [r.batches(epoch) for r in ranks]
        for step, whole in enumerate(single.batches(epoch)):
            slices = [per_rank[r][step] for r in range(world)]
            assert sum(slices, []) == whole  # together: the single process's batch, in rank order
            assert len({key[2] for part in slices for key in part}) == 1  # one size for the whole step
        drawn = [key[0] for batches in per_rank for part in batches for key in part]
        assert len(drawn) == len(set(drawn)) == 3 * batch * world  # no sample on two ranks


def test_sampler_refuses_ranks_it_cannot_serve():
    with pytest.raises(InputError, match="rank 2 is not one of the 2"):
        MultiSizeBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(InputError, match="drop_last"):
        MultiSizeBatchSampler(10, 2, drop_last=False, rank=0, world_size=2)
    with pytest.raises(InputError, match="batch of 2 on each of 3 ranks"):
        MultiSizeBatchSampler(5, 2, rank=0, world_size=3)


def test_set_epoch_can_start_a_pass_mid_epoch_once():
    sampler = MultiSizeBatchSampler(12, 2, seed=1)
    sampler.set_epoch(3, skip_batches=4)
    assert list(sampler) == sampler.batches(3)[4:]
    assert list(sampler) == sampler.batches(4)  # the next pass is a whole epoch
    with pytest.raises(InputError, match="cannot skip 6 of the 6"):
        sampler.set_epoch(0, skip_batches=6)


def _tiny_crrn_run(photos: Path, run_dir: Path, steps: int, resume=None) -> Trainer:
    torch.manual_seed(0)
    task = CRRNTask(CRRNConfig.preset("lite", norm="none"), total_steps=4, gin_fraction=0.0, lr=1e-3)
    data = SyntheticPairs(photos, SynthesisConfig.crrn(size=[(64, 96)]), seed=0, exclude=("test_",))
    config = TrainConfig(steps=steps, batch_size=2, val_every=100, preview_every=100, save_every=100,
                         log_every=1, device="cpu")
    trainer = Trainer(task, config, run_dir, make_loader(data, 2, seed=0, workers=0))
    if resume:
        trainer.resume(load_checkpoint(resume))
    trainer.fit()
    return trainer


def test_resuming_mid_epoch_trains_on_the_batches_an_unbroken_run_takes(photo_folder, tmp_path):
    straight = _tiny_crrn_run(photo_folder, tmp_path / "straight", steps=3)
    assert len(straight.train_loader) == 4  # eight photos, two per step: step 1 is mid-epoch
    first = _tiny_crrn_run(photo_folder, tmp_path / "first", steps=1)
    resumed = _tiny_crrn_run(photo_folder, tmp_path / "resumed", steps=3,
                             resume=first.run_dir / "final.safetensors")
    for (key, want), got in zip(straight.task.model.state_dict().items(), resumed.task.model.state_dict().values()):
        assert torch.allclose(got, want, atol=1e-6), key
    record = resumed.history[-1]
    assert record["data_s"] >= 0 and record["step_s"] > 0


FAILING_RUN = """
import sys
from dereflect.train.crrn import CRRNTask
from dereflect.train.data import SyntheticPairs, make_loader
from dereflect.train.synthesis import SynthesisConfig
from dereflect.train.models.crrn import CRRNConfig
from dereflect.train.trainer import TrainConfig, Trainer


class FailingTask(CRRNTask):
    def training_step(self, batch, step, scaler=None):
        if step == 1:
            raise RuntimeError("the step failed")
        return super().training_step(batch, step, scaler)


if __name__ == "__main__":
    photos, run_dir = sys.argv[1:]
    task = FailingTask(CRRNConfig.preset("lite", norm="none"), total_steps=4, gin_fraction=0.0)
    data = SyntheticPairs(photos, SynthesisConfig.crrn(size=[(64, 96)]), seed=0)
    config = TrainConfig(steps=4, batch_size=2, val_every=100, preview_every=100, save_every=100, device="cpu")
    Trainer(task, config, run_dir, make_loader(data, 2, workers=1)).fit()
"""


def test_a_failing_step_ends_the_process_with_its_loader_workers(photo_folder, tmp_path):
    """The workers ignore SIGTERM (Ctrl+C stops the trainer, not them), so a loader left alive by an
    exception kept the process waiting for them at exit, forever."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    process = subprocess.Popen([sys.executable, str(script), str(photo_folder), str(tmp_path / "run")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too
        process.communicate()
        pytest.fail("the process did not exit after its training step failed")
    assert process.returncode == 1 and "RuntimeError: the step failed" in err


# ----------------------------------------------------------------------------- decoded images


def _samples(dataset, keys):
    return [dataset.sample_arrays(key) for key in keys]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for pair_a, pair_b in zip(a, b) for x, y in zip(pair_a, pair_b))


KEYS = [(i, epoch, size) for i in range(4) for epoch in (0, 3) for size in (0, 1)]


def test_kept_images_give_bit_identical_samples_within_the_budget(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", 6, height=96, width=128)
    reflections = write_photo_folder(tmp_path / "reflections", 3, seed=5, prefix="r")
    recipe = SynthesisConfig.transfer(size=[(32, 48), (48, 64)])
    fresh = SyntheticPairs(photos, recipe, seed=2, reflection_folders=reflections)
    kept = SyntheticPairs(photos, recipe, seed=2, reflection_folders=reflections)
    image_bytes = 96 * 128 * 3  # 8-bit files are kept as their uint8 values
    assert kept.keep_decoded(10**9) == 9 * image_bytes
    assert _same(_samples(kept, KEYS), _samples(fresh, KEYS))

    partly = SyntheticPairs(photos, recipe, seed=2, reflection_folders=reflections)
    assert partly.keep_decoded(int(2.5 * image_bytes)) == 2 * image_bytes
    assert _same(_samples(partly, KEYS), _samples(fresh, KEYS))


def test_kept_images_are_exact_for_16_bit_files_and_skip_unusable_ones(tmp_path):
    folder = write_photo_folder(tmp_path / "photos", 3, height=96, width=128)
    deep = (smooth_photo(np.random.default_rng(7), 96, 128).astype(np.uint16) * 256 + 3)
    cv2.imwrite(str(folder / "deep.png"), deep)
    cv2.imwrite(str(folder / "tiny.png"), smooth_photo(np.random.default_rng(8), 16, 16))
    recipe = SynthesisConfig.rm2s_stage2(size=48)
    fresh = SyntheticPairs(folder, recipe, seed=1)
    kept = SyntheticPairs(folder, recipe, seed=1)
    with pytest.warns(ImageSkippedWarning, match="tiny.png"):
        kept.keep_decoded(10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageSkippedWarning)  # the fresh set meets tiny.png as it samples
        assert _same(_samples(kept, [(i, 0, 0) for i in range(5)]), _samples(fresh, [(i, 0, 0) for i in range(5)]))
    image = read_rgb(folder / "deep.png")
    store = DecodedImages([(0, image)], 10**9)
    assert store.nbytes == image.nbytes  # 16-bit values do not fit uint8: kept as float32
    assert np.array_equal(store.get(0), image) and store.get(1) is None


def test_real_and_mixed_pairs_keep_their_images_too(tmp_path):
    root = tmp_path / "real"
    rng = np.random.default_rng(3)
    for folder in ("blended", "transmission_layer"):
        (root / folder).mkdir(parents=True)
    for name in ("a", "b", "c"):
        photo = smooth_photo(rng, 96, 128)
        cv2.imwrite(str(root / "blended" / f"{name}.png"), photo)
        cv2.imwrite(str(root / "transmission_layer" / f"{name}.png"), (photo * 0.8).astype(np.uint8))
    photos = write_photo_folder(tmp_path / "photos", 4)

    def mixed():
        return MixedPairs([(SyntheticPairs(photos, SynthesisConfig.crrn(size=[(32, 48)]), seed=1), 0.5),
                           (RealPairs(root, size=[(32, 48)], seed=1), 0.5)], seed=1)

    fresh, kept = mixed(), mixed()
    assert kept.keep_decoded(10**9) == (4 + 6) * 96 * 128 * 3
    keys = [(i, epoch, 0) for i in range(4) for epoch in range(3)]
    assert {kept.part_of(key) for key in keys} == {0, 1}
    for key in keys:
        for name, value in fresh[key].items():
            assert torch.equal(kept[key][name], value), (key, name)


def test_kept_images_reach_spawned_workers_as_shared_memory(tmp_path):
    from multiprocessing.reduction import ForkingPickler

    photos = write_photo_folder(tmp_path / "photos", 6)
    data = SyntheticPairs(photos, SynthesisConfig.rm2s_stage1(size=32), seed=3)
    expected = [batch["input"] for batch in make_loader(data, 2, seed=3, workers=0)]
    kept_bytes = data.keep_decoded(10**9)
    assert len(ForkingPickler.dumps(data)) < kept_bytes / 10  # a handle to the bytes, not the bytes
    loader = make_loader(data, 2, seed=3, workers=1)
    loader.set_epoch(0)
    assert all(torch.equal(batch["input"], want) for batch, want in zip(loader, expected, strict=True))


def test_cache_option_is_checked_before_training(photo_folder, tmp_path, capsys):
    code = main(["train", "crrn", "--config", "lite-scratch", "--recipe", "paper", "--data", str(photo_folder),
                 "--steps", "1", "--workers", "0", "--cache-mb", "-1", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--cache-mb must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

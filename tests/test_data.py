"""Tests of dereflect.train.data and dereflect.train.synthesis: discovery, synthesis recipe, datasets and loaders."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from dereflect.errors import InputError
from dereflect.train.data import (
    GroundTruthPairs,
    ImageSkippedWarning,
    MultiSizeBatchSampler,
    SyntheticPairs,
    find_images,
    fit_for_network,
    make_loader,
)
from dereflect.train.synthesis import RecipeMix, SynthesisConfig, random_crop, sample_rng, synthesize

SMALL = {"size": 32}


def smooth_image(rng: np.random.Generator, h: int = 80, w: int = 100) -> np.ndarray:
    """A random smooth uint8 BGR image (bilinear upsampling of coarse noise)."""
    coarse = rng.integers(0, 256, size=(5, 6, 3)).astype(np.uint8)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def write_photos(folder: Path, names, seed: int = 0, h: int = 80, w: int = 100):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        assert cv2.imwrite(str(path), smooth_image(rng, h, w))
        paths.append(path)
    return paths


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_photos(folder, [f"img{i}.jpg" for i in range(4)] + ["img4.png", "img5.png"])
    return folder


def batches_bytes(loader):
    return [b"".join(t.numpy().tobytes() for t in (b["input"], b["background"], b["reflection"]))
            for b in loader]


# ----------------------------------------------------------------------------- discovery


def test_find_images_flat_sorted_extensions_and_hidden(tmp_path):
    write_photos(tmp_path, ["b.JPG", "a.png", "c.Jpeg", ".hidden.jpg"])
    (tmp_path / "notes.txt").write_text("not an image")
    write_photos(tmp_path / "sub", ["d.webp", "e.BMP"])
    found = find_images([tmp_path])
    assert [p.name for p in found] == ["a.png", "b.JPG", "c.Jpeg", "d.webp", "e.BMP"]
    assert find_images(str(tmp_path)) == found


def test_find_images_voc_layout_uses_jpegimages(tmp_path):
    voc = tmp_path / "VOC2012"
    write_photos(voc / "JPEGImages", ["2007_000001.jpg", "2007_000002.jpg"])
    write_photos(voc / "SegmentationClass", ["2007_000001.png"])
    found = find_images([voc])
    assert [p.parent.name for p in found] == ["JPEGImages", "JPEGImages"]
    assert len(found) == 2


def test_find_images_prefix_filters(tmp_path):
    write_photos(tmp_path, ["train_1.jpg", "val_2.jpg", "test_3.jpg"])
    assert [p.name for p in find_images([tmp_path], exclude=("test_",))] == ["train_1.jpg", "val_2.jpg"]
    assert [p.name for p in find_images([tmp_path], include=("test_",))] == ["test_3.jpg"]
    with pytest.raises(InputError, match="after filtering"):
        find_images([tmp_path], include=("nothing_",))


def test_find_images_empty_or_missing_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        find_images([empty])
    with pytest.raises(InputError, match="does not exist"):
        find_images([tmp_path / "nope"])


# ----------------------------------------------------------------------------- config


def test_config_json_round_trip_and_presets():
    for config in (SynthesisConfig(), SynthesisConfig.rm2s_stage2(size=(64, 96)), SynthesisConfig.crrn()):
        data = json.loads(json.dumps(config.to_dict()))
        assert SynthesisConfig.from_dict(data) == config
    assert SynthesisConfig.rm2s_stage1().ghost and not SynthesisConfig.rm2s_stage2().ghost
    assert SynthesisConfig().sizes == [(256, 256)]
    crrn = SynthesisConfig.crrn()
    assert crrn.mode == "crrn" and crrn.sizes == [(96, 160), (224, 288)]
    assert crrn.background_scale == (0.0, 0.2) and crrn.reflection_weight == (0.1, 0.5)
    assert crrn.min_source_size == (224, 288)


PAPER_PRESETS = (SynthesisConfig.rm2s_stage1, SynthesisConfig.rm2s_stage2, SynthesisConfig.crrn)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_take_the_whole_photo_of_the_target_aspect(preset):
    """CRRN trains on whole images and RM2S resizes its synthesised images: no 50-100 % crops."""
    assert preset().crop_scale == (1.0, 1.0)
    assert preset(crop_scale=(0.5, 1.0)).crop_scale == (0.5, 1.0)  # an override still wins
    fixed = dict(flip_p=0.0, rotate90=False)  # the geometry left: the crop alone
    # A photo of the target's aspect comes out whole, resized, whatever the draw.
    photo = np.random.default_rng(0).random((60, 90, 3), dtype=np.float32)
    whole = cv2.resize(photo, (60, 40), interpolation=cv2.INTER_AREA)
    config = preset(size=[(40, 60)], **fixed)
    for seed in range(8):
        np.testing.assert_allclose(random_crop(photo, (40, 60), config, np.random.default_rng(seed)), whole,
                                   atol=1e-6)
    # A square target of a wider photo: all of its height (a vertical ramp keeps its ends).
    ramp = np.repeat(np.linspace(0.0, 1.0, 60, dtype=np.float32)[:, None, None], 90, 1).repeat(3, 2)
    config = preset(size=30, **fixed)
    for seed in range(8):
        out = random_crop(ramp, (30, 30), config, np.random.default_rng(seed))
        assert out[0].max() < 0.02 and out[-1].min() > 0.98


def test_recipes_other_than_the_papers_keep_their_crops():
    assert SynthesisConfig.transfer().crop_scale == (0.3, 1.0)
    assert SynthesisConfig().crop_scale == (0.5, 1.0)


def test_crrn_preset_blurs_the_reflection_as_a_stand_in_for_captured_defocus():
    """Ordinary photos stand in for CRRN's captured reflections (RID): the preset blurs them, as their
    defocus would (docs/TRAINING.md, "Where the paper recipes depart from the papers")."""
    rng = np.random.default_rng(2)
    background = np.zeros((32, 48, 3), np.float32)
    reflection = (np.indices((32, 48)).sum(0) % 2).astype(np.float32)[:, :, None].repeat(3, 2)  # a checkerboard
    config = SynthesisConfig.crrn(size=[(32, 48)], blur_sigma=(1.0, 3.0))  # the preset's range, past its sharp end
    assert SynthesisConfig.crrn().blur_sigma == (0.0, 3.0)
    _, _, layer = synthesize(background, reflection, config, rng)
    # Blurred, the one-pixel checkerboard is a flat veil: alternate pixels all but equal.
    assert np.abs(np.diff(layer, axis=1)).max() < 0.05 * layer.max()


@pytest.mark.parametrize(
    "bad",
    [{"mode": "other"}, {"size": 0}, {"size": [(32, "x")]}, {"blur_sigma": (3, 1)}, {"flip_p": 2.0},
     {"background_scale": (0.0, 1.0)}],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(InputError):
        SynthesisConfig(**bad)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(InputError, match="unknown"):
        SynthesisConfig.from_dict({"size": 64, "colour": 1})


def test_recipe_mix_round_trip_shares_sizes_and_validates():
    mix = RecipeMix((SynthesisConfig.rm2s_stage2(size=64), SynthesisConfig.crrn()), (0.7, 0.3))
    assert mix.sizes == [(64, 64)] and all(r.sizes == [(64, 64)] for r in mix.recipes)
    assert mix.recipes[1].mode == "crrn" and mix.recipes[1].gamma == 1.0
    data = json.loads(json.dumps(mix.to_dict()))
    assert RecipeMix.from_dict(data) == mix
    assert mix.with_size([(32, 48), (64, 96)]).sizes == [(32, 48), (64, 96)]
    with pytest.raises(InputError, match="two or more"):
        RecipeMix((SynthesisConfig(),), (1.0,))
    with pytest.raises(InputError, match="> 0"):
        RecipeMix((SynthesisConfig(), SynthesisConfig.crrn()), (1.0, 0.0))
    with pytest.raises(InputError, match="mix"):
        RecipeMix.from_dict({"mix": [{"recipe": {}}]})


@pytest.mark.parametrize("recipe", [SynthesisConfig.rm2s_stage2(size=32), SynthesisConfig.crrn(size=32)])
def test_without_reflection_returns_the_background_as_input(recipe):
    rng = np.random.default_rng(4)
    background, reflection = rng.random((2, 32, 32, 3), dtype=np.float32)
    mixture, clean, layer = synthesize(background, reflection, recipe.without_reflection(), rng)
    np.testing.assert_allclose(mixture, background, atol=1e-6)
    assert np.array_equal(clean, background) and not layer.any()
    assert recipe.without_reflection().gamma == recipe.gamma


def test_recipe_mix_draws_each_recipe_at_its_weight():
    mix = RecipeMix((SynthesisConfig(size=32), SynthesisConfig.crrn(size=32)), (0.25, 0.75))
    modes = [mix.pick(sample_rng(0, 0, i)).mode for i in range(2000)]
    assert abs(modes.count("crrn") / len(modes) - 0.75) < 0.04


# ----------------------------------------------------------------------------- recipe


def plain(**overrides) -> SynthesisConfig:
    base = dict(ghost=False, vignette=False, blur_sigma=(0, 0), flip_p=0, rotate90=False)
    base.update(overrides)
    return SynthesisConfig(**base)


def test_zero_reflection_gives_scaled_background():
    rng = np.random.default_rng(1)
    b = rng.random((16, 16, 3), dtype=np.float32)
    r = rng.random((16, 16, 3), dtype=np.float32)
    config = plain(reflection_weight=(0, 0), background_scale=(0.25, 0.25), gamma=2.2)
    mixture, background, reflection = synthesize(b, r, config, np.random.default_rng(0))
    np.testing.assert_allclose(mixture, 0.75 ** (1 / 2.2) * b, atol=1e-5)
    np.testing.assert_array_equal(background, b)
    assert np.abs(reflection).max() < 1e-5


def test_overflow_correction_matches_formula():
    t = np.full((8, 8, 3), 0.9, np.float32)
    r = np.full((8, 8, 3), 0.8, np.float32)
    config = plain(reflection_weight=(1, 1), background_scale=(0, 0), overflow_attenuation=(1.1, 1.1))
    mixture, _, reflection = synthesize(t, r, config, np.random.default_rng(0))
    t_lin, r_lin = 0.9 ** 2.2, 0.8 ** 2.2
    r_corr = r_lin - (t_lin + r_lin - 1.0) * 1.1  # every pixel overflows: mean excess = the excess
    expected = (t_lin + r_corr) ** (1 / 2.2)
    np.testing.assert_allclose(mixture, expected, atol=1e-5)
    np.testing.assert_allclose(reflection, expected - 0.9, atol=1e-5)


def test_outputs_stay_in_range_under_heavy_overflow():
    rng = np.random.default_rng(2)
    t = np.clip(rng.random((32, 32, 3), dtype=np.float32) + 0.5, 0, 1)
    r = np.ones((32, 32, 3), np.float32)
    config = SynthesisConfig(reflection_weight=(1, 1), background_scale=(0, 0), size=32)
    for seed in range(5):
        mixture, background, reflection = synthesize(t, r, config, np.random.default_rng(seed))
        for arr in (mixture, background, reflection):
            assert arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
        # I = transmitted background + reflection (up to clipping at 1).
        np.testing.assert_allclose(np.minimum(t + reflection, 1), mixture, atol=1e-5)


def test_ghost_is_two_impulses():
    r = np.zeros((31, 31, 3), np.float32)
    r[15, 15] = 1.0
    t = np.zeros_like(r)
    config = plain(mode="crrn", gamma=1.0, ghost=True, ghost_attenuation=(0.5, 0.5), ghost_divisor=1.25,
                   ghost_max_shift=0.1, reflection_weight=(1, 1), background_scale=(0, 0))
    for seed in range(4):
        _, _, reflection = synthesize(t, r, config, np.random.default_rng(seed))
        ys, xs = np.nonzero(reflection[:, :, 0])
        values = sorted(reflection[ys, xs, 0].tolist())
        np.testing.assert_allclose(values, [0.4, 0.8], atol=1e-6)
        assert max(abs(ys - 15).max(), abs(xs - 15).max()) <= 3  # 0.1 of 31 px, rounded


def test_blur_kernel_extent():
    r = np.zeros((41, 41, 3), np.float32)
    r[20, 20] = 1.0
    config = plain(mode="crrn", gamma=1.0, blur_sigma=(1.6, 1.6), reflection_weight=(1, 1),
                   background_scale=(0, 0))
    _, _, reflection = synthesize(np.zeros_like(r), r, config, np.random.default_rng(0))
    ys, xs = np.nonzero(reflection[:, :, 0] > 0)
    radius = math.ceil(2 * 1.6)  # kernel 2*ceil(2 sigma)+1
    assert abs(ys - 20).max() == radius and abs(xs - 20).max() == radius
    assert reflection[20, 20, 0] < 0.2


def test_sample_rng_depends_on_seed_epoch_index():
    draws = {(s, e, i): sample_rng(s, e, i).random() for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(set(draws.values())) == 8
    assert sample_rng(3, 2, 1).random() == sample_rng(3, 2, 1).random()


# ----------------------------------------------------------------------------- SyntheticPairs


def test_synthetic_pairs_shapes_ranges_and_determinism(photos):
    config = SynthesisConfig.rm2s_stage1(**SMALL)
    data = SyntheticPairs([photos], config, seed=7)
    assert len(data) == 6
    sample = data[3]
    assert set(sample) == {"input", "background", "reflection"}
    for t in sample.values():
        assert t.dtype == torch.float32 and t.shape == (3, 32, 32)
        assert float(t.min()) >= 0 and float(t.max()) <= 1
    again = SyntheticPairs([photos], config, seed=7)[3]
    other = SyntheticPairs([photos], config, seed=8)[3]
    assert all(torch.equal(sample[k], again[k]) for k in sample)
    assert not torch.equal(sample["input"], other["input"])
    data.set_epoch(1)
    assert not torch.equal(data[3]["input"], sample["input"])
    assert torch.equal(data[(3, 0, 0)]["input"], sample["input"])
    with pytest.raises(IndexError):
        data[6]


def test_synthetic_pairs_with_a_mix_use_both_recipes(photos):
    # With no reflection, the rm2s recipe (gamma 2.2, scale in linear light) and the crrn one
    # (gamma 1) dim the background differently: the ratio input / background tells them apart.
    rm2s = plain(size=32, reflection_weight=(0, 0), background_scale=(0.5, 0.5))
    crrn = plain(mode="crrn", size=32, gamma=1.0, reflection_weight=(0, 0), background_scale=(0.5, 0.5))
    data = SyntheticPairs([photos], RecipeMix((rm2s, crrn), (1.0, 1.0)), seed=3, length=6)
    ratios = set()
    for epoch in range(4):
        for i in range(6):
            mixture, background, _ = data.sample_arrays((i, epoch, 0))
            ratio = float(mixture.sum() / background.sum())
            ratios.add(round(ratio, 2))
            again, _, _ = data.sample_arrays((i, epoch, 0))
            assert np.array_equal(mixture, again)
    assert ratios == {0.5, round(0.5 ** (1 / 2.2), 2)}


def test_reflection_never_the_background_and_backgrounds_cycle(photos):
    data = SyntheticPairs([photos], SynthesisConfig(**SMALL), seed=0, length=4)
    images = data.images
    seen = []
    for epoch in range(3):
        for i in range(4):
            src = data.sources((i, epoch, 0))
            assert src["background"] != src["reflection"]
            seen.append(src["background"])
    assert seen[:4] == images[:4] and seen[4:6] == images[4:6] and seen[6:8] == images[:2]


def test_real_reflection_folder_is_used(photos, tmp_path):
    refl_dir = tmp_path / "rid"
    refl = write_photos(refl_dir, ["r0.png", "r1.png"], seed=5)
    data = SyntheticPairs([photos], SynthesisConfig(**SMALL), seed=1, reflection_folders=refl_dir)
    assert data.reflection_images == refl
    for i in range(len(data)):
        assert data.sources(i)["reflection"].parent == refl_dir
        assert data[i]["input"].shape == (3, 32, 32)


def test_unusable_images_skipped_with_one_warning_each(photos, tmp_path):
    garbage = photos / "broken.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    tiny = write_photos(photos, ["tiny.png"], h=10, w=12)[0]
    data = SyntheticPairs([photos], SynthesisConfig(**SMALL), seed=0)
    assert len(data) == 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            for i in range(len(data)):
                assert data[(i, epoch, 0)]["input"].shape == (3, 32, 32)
    messages = [str(w.message) for w in caught if issubclass(w.category, ImageSkippedWarning)]
    assert sum(str(garbage) in m for m in messages) == 1
    assert sum(str(tiny) in m for m in messages) == 1
    assert len(messages) == 2


def test_all_images_unusable_raises(tmp_path):
    folder = tmp_path / "bad"
    write_photos(folder, ["a.png", "b.png"], h=10, w=10)
    data = SyntheticPairs([folder], SynthesisConfig(**SMALL))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageSkippedWarning)
        with pytest.raises(InputError, match="no photo images can be used"):
            data[0]


def test_single_photo_needs_reflection_folder(tmp_path):
    write_photos(tmp_path / "one", ["a.png"])
    with pytest.raises(InputError, match="at least two"):
        SyntheticPairs([tmp_path / "one"], SynthesisConfig(**SMALL))


def test_exclude_keeps_test_split_out(tmp_path):
    write_photos(tmp_path, ["train_1.jpg", "train_2.jpg", "test_3.jpg"])
    data = SyntheticPairs([tmp_path], SynthesisConfig(**SMALL), exclude=("test_",))
    assert [p.name for p in data.images] == ["train_1.jpg", "train_2.jpg"]
    assert all(data.sources(i)["reflection"].name.startswith("train_") for i in range(len(data)))


# ----------------------------------------------------------------------------- loaders


def test_multi_size_batches_have_one_size(photos):
    config = SynthesisConfig.crrn(size=[(32, 48), (48, 64)])
    data = SyntheticPairs([photos], config, seed=3, length=12)
    loader = make_loader(data, batch_size=3, shuffle=True, seed=3, workers=0)
    shapes = set()
    for batch in loader:
        shape = tuple(batch["input"].shape)
        assert shape in {(3, 3, 32, 48), (3, 3, 48, 64)}
        assert batch["background"].shape == batch["reflection"].shape == batch["input"].shape
        shapes.add(shape)
    assert len(shapes) == 2
    assert len(loader) == 4


def test_sampler_epochs_advance_and_set_epoch_replays():
    sampler = MultiSizeBatchSampler(10, 3, n_sizes=2, seed=1)
    first, second = list(sampler), list(sampler)
    assert first != second and len(first) == 3
    assert all(len({k[2] for k in batch}) == 1 for batch in first)
    assert {k[1] for batch in second for k in batch} == {1}
    sampler.set_epoch(1)
    assert list(sampler) == second
    plain_sampler = MultiSizeBatchSampler(5, 2, shuffle=False, drop_last=False, keys=False)
    assert list(plain_sampler) == [[0, 1], [2, 3], [4]]
    with pytest.raises(InputError, match="cannot fill"):
        MultiSizeBatchSampler(2, 4)


def test_loader_reproducible_across_worker_counts(photos):
    config = SynthesisConfig.rm2s_stage1(size=24)
    data = SyntheticPairs([photos], config, seed=11)
    serial = make_loader(data, batch_size=2, seed=5, workers=0)
    epoch0 = batches_bytes(serial)
    epoch1 = batches_bytes(serial)
    assert epoch0 != epoch1 and len(epoch0) == 3
    parallel = make_loader(data, batch_size=2, seed=5, workers=2)
    assert batches_bytes(parallel) == epoch0
    assert batches_bytes(parallel) == epoch1  # persistent workers still follow the epoch
    parallel.set_epoch(0)
    assert batches_bytes(parallel) == epoch0
    assert batches_bytes(make_loader(data, batch_size=2, seed=6, workers=0)) != epoch0


# ----------------------------------------------------------------------------- real pairs


def test_ground_truth_pairs_match_stems_and_crop(tmp_path):
    root = tmp_path / "real20"
    rng = np.random.default_rng(0)
    for stem, ext_in, ext_bg in (("a", ".jpg", ".png"), ("b", ".png", ".png")):
        bg = smooth_image(rng, 70, 100)
        mix = np.clip(bg.astype(int) + 40, 0, 255).astype(np.uint8)
        (root / "blended").mkdir(parents=True, exist_ok=True)
        (root / "transmission_layer").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "blended" / f"{stem}{ext_in}"), mix)
        cv2.imwrite(str(root / "transmission_layer" / f"{stem}{ext_bg}"), bg)
    data = GroundTruthPairs(root)
    assert len(data) == 2 and data.layout == "paired"
    sample = data[1]
    assert sample["name"] == "b"
    assert sample["input"].shape == (3, 64, 96) == sample["background"].shape
    expected = torch.clamp(sample["input"] - sample["background"], 0, 1)
    assert torch.allclose(sample["reflection"], expected)
    assert abs(float(sample["reflection"].mean()) - 40 / 255) < 0.02
    resized = GroundTruthPairs(root, size=(32, 32))[0]
    assert resized["input"].shape == (3, 32, 32)
    batch = next(iter(make_loader(data, batch_size=2, shuffle=False, workers=0)))
    assert batch["name"] == ["a", "b"]


def test_ground_truth_pairs_report_mismatches_like_the_evaluation(tmp_path):
    root = tmp_path / "pairs"
    write_photos(root / "blended", ["a.jpg", "c.jpg"])
    write_photos(root / "transmission_layer", ["a.png", "d.png"])
    with pytest.raises(InputError, match=r"1 image\(s\) in blended/ without ground truth \(c\).*in "
                                         r"transmission_layer/ without an input \(d\)"):
        GroundTruthPairs(root)
    with pytest.raises(InputError, match="no known dataset layout"):
        GroundTruthPairs(root / "blended")


def test_ground_truth_pairs_read_ceilnet_triplets(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("x1", "x2"):
        b, r = smooth_image(rng, 64, 64), smooth_image(rng, 64, 64) // 4
        cv2.imwrite(str(tmp_path / f"{name}-label1.png"), b)
        cv2.imwrite(str(tmp_path / f"{name}-label2.png"), r)
        cv2.imwrite(str(tmp_path / f"{name}-input.png"), np.clip(b.astype(int) + r, 0, 255).astype(np.uint8))
    data = GroundTruthPairs(tmp_path)
    assert len(data) == 2 and data.layout == "ceilnet"
    sample = data[0]
    assert sample["name"] == "x1" and sample["input"].shape == (3, 64, 64)
    label1, label2 = (cv2.cvtColor(cv2.imread(str(tmp_path / f"x1-{k}.png")), cv2.COLOR_BGR2RGB) for k in
                      ("label1", "label2"))
    unclipped = label1.astype(int) + label2 <= 255  # where the input did not saturate
    diff = np.abs(sample["reflection"].numpy().transpose(1, 2, 0) - label2 / 255.0)
    assert unclipped.mean() > 0.5 and diff[unclipped].max() <= 1e-6
    (tmp_path / "x2-label1.png").unlink()
    with pytest.raises(InputError, match="x2"):
        GroundTruthPairs(tmp_path)


def test_fit_for_network():
    img = np.zeros((70, 100, 3), np.uint8)
    assert fit_for_network(img).shape == (64, 96, 3)
    assert fit_for_network(img, max_side=50).shape == (32, 32, 3)
    assert fit_for_network(img, size=40).shape == (40, 40, 3)
    with pytest.raises(InputError):
        fit_for_network(np.zeros((20, 100, 3), np.uint8))


def test_synthesis_needs_neither_torch_nor_the_datasets():
    """The recipes and the blend are NumPy and OpenCV: a tool that only synthesises pairs never loads torch."""
    code = ("import sys, numpy as np, dereflect.train.synthesis as s; "
            "s.synthesize(np.full((8, 8, 3), 0.5, np.float32), np.full((8, 8, 3), 0.2, np.float32), "
            "s.SynthesisConfig(size=8), s.sample_rng(0, 0, 0)); "
            "print(sorted(m for m in ('torch', 'dereflect.train.data') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

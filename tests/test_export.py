"""Export: checkpoints to ONNX and FP16 ONNX, parity with PyTorch, the TensorRT parser check, goldens.

Tiny RM2S and CRRN checkpoints (lite configs with a few channels) are exported once per module.
BatchNorm statistics are randomised so that folding them into the (transposed) convs matters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from conftest import umask  # noqa: E402
from dereflect.errors import DereflectError, InputError, ModelError  # noqa: E402
from dereflect.export import cli as export_cli  # noqa: E402
from dereflect.export import fp16 as fp16_mod  # noqa: E402
from dereflect.export.onnx_export import FP16_MIN_PSNR, export_onnx  # noqa: E402
from dereflect.export.parity import check_parity, random_cases  # noqa: E402
from dereflect.export.trt_support import check_trt_compat, load_table, table_version  # noqa: E402
from dereflect.export.verify import natural_images, verify  # noqa: E402
from dereflect.manifest import load_manifest  # noqa: E402
from dereflect.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint  # noqa: E402
from dereflect.train.models import build_model  # noqa: E402
from dereflect.train.models.common import PaddedModel  # noqa: E402
from dereflect.train.models.rm2s import DiscriminatorConfig, UNetConfig  # noqa: E402

HAS_CRRN = (Path(__file__).resolve().parents[1] / "train" / "models" / "crrn.py").is_file()
UNET = {"widths": (4, 8, 8)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is many times faster than several on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_main(argv) -> int:
    """``dereflect ARGV`` with only the export commands registered (as dereflect.cli.main runs them)."""
    parser = argparse.ArgumentParser(prog="dereflect")
    export_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DereflectError:
        return 2


def _randomise(net):
    """Random BatchNorm statistics, and random weights for heads that start at zero (residual nets),
    so that the exported graph computes something that BatchNorm folding and float16 can get wrong."""
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) and not module.weight.detach().any():
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=generator) * 0.1)
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
    return net


def _rm2s_checkpoint(path: Path, with_stage2: bool = True) -> Path:
    torch.manual_seed(0)
    c1 = UNetConfig.preset("lite", **UNET).to_dict()
    networks = {"stage1": ("rm2s_unet", c1, _randomise(build_model("rm2s_unet", c1)))}
    if with_stage2:
        c2 = UNetConfig.preset("lite", in_channels=9, **UNET).to_dict()
        critic = DiscriminatorConfig(widths=(4, 8)).to_dict()
        networks["generator"] = ("rm2s_unet", c2, _randomise(build_model("rm2s_unet", c2)))
        networks["discriminator"] = ("rm2s_discriminator", critic, build_model("rm2s_discriminator", critic))
    extra = {"stage2": {"c1": 0.2, "c2": 0.8}} if with_stage2 else {}
    return save_checkpoint(path, method="rm2s", kind="stage2" if with_stage2 else "stage1", networks=networks,
                           extra=extra)


@pytest.fixture(scope="module")
def rm2s(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm2s")
    checkpoint = _rm2s_checkpoint(root / "rm2s.safetensors")
    manifest = export_onnx(checkpoint, root / "export")
    return checkpoint, manifest


@pytest.fixture(scope="module")
def crrn(tmp_path_factory):
    if not HAS_CRRN:
        pytest.skip("train/models/crrn.py is not there yet")
    from dereflect.train.models.crrn import CRRNConfig

    root = tmp_path_factory.mktemp("crrn")
    torch.manual_seed(0)
    config = CRRNConfig.preset("lite", gin_widths=(4, 4, 8, 8, 8), vgg_widths=(4, 8, 8, 8, 8), fc_channels=8,
                               feat_width=4, iin_widths=(8, 8, 4, 4, 4)).to_dict()
    net = _randomise(build_model("crrn", config))
    checkpoint = save_checkpoint(root / "crrn.safetensors", method="crrn", kind="final",
                                 networks={"crrn": ("crrn", config, net)})
    return checkpoint, export_onnx(checkpoint, root / "export")


# --- the export directory ---------------------------------------------------------------------------

def test_rm2s_manifest(rm2s):
    checkpoint, exported = rm2s
    manifest = load_manifest(exported.directory)
    manifest.verify_files(fp16=True)
    assert manifest.method == "rm2s" and list(manifest.networks) == ["stage1", "stage2"]
    stage1, stage2 = manifest.networks["stage1"], manifest.networks["stage2"]
    assert [(t.name, t.channels) for t in stage1.inputs] == [("image", 3)]
    assert [(t.name, t.channels) for t in stage2.inputs] == [("stage2_input", 9)]
    assert [(t.name, t.channels, t.dtype) for t in stage2.outputs] == [("background", 3, "float32")]
    assert stage1.onnx_fp16 == "stage1.fp16.onnx" and stage1.stride == 8
    assert (manifest.settings["c1"], manifest.settings["c2"]) == (0.2, 0.8)  # as stage 2 was trained
    record = manifest.checkpoint
    assert record["sha256"] == load_checkpoint_sha(checkpoint)
    assert record["metadata"]["method"] == "rm2s" and "optimizers" not in record["metadata"]
    extra = manifest.records
    assert extra["parity"]["passed"] and extra["parity"]["worst_max_abs"] < 1e-4
    assert extra["fp16"]["io_dtype"] == "float32"
    for network in ("stage1", "stage2"):
        assert extra["fp16"]["networks"][network]["outputs"]["background"]["psnr_db"] >= FP16_MIN_PSNR
    checks = extra["tensorrt_check"]
    assert len(checks) == 4 and all(all(v.values()) for v in checks.values())
    assert set(extra["golden"]) == {"stage1", "stage2"}
    assert not list(exported.directory.parent.glob(".export.*")), "temporary directories were left behind"


def test_an_export_starts_from_the_manifest_its_checkpoint_implies(rm2s):
    """What the runtime runs a checkpoint with (name, settings, side, its record) is what its export says."""
    from dereflect.models import open_source

    checkpoint, exported = rm2s
    implied, written = open_source(checkpoint).manifest, load_manifest(exported.directory)
    assert (written.name, written.settings, written.max_side) == (implied.name, implied.settings, implied.max_side)
    assert written.checkpoint == {**implied.checkpoint, "sha256": load_checkpoint_sha(checkpoint)}
    for name, spec in implied.networks.items():
        assert [t.to_dict() for t in written.networks[name].outputs] == [t.to_dict() for t in spec.outputs]


def test_output_ranges_measure_against_each_outputs_value_range():
    from dereflect.export.verify import output_ranges
    from dereflect.manifest import NetworkSpec, TensorSpec

    outputs = [TensorSpec("background", 3), TensorSpec("signed", 3, value_range=(-1.0, 1.0)),
               TensorSpec("flat", 1, value_range=(0.5, 0.5))]
    spec = NetworkSpec("net", "net.onnx", "0" * 64, [TensorSpec("image", 3)], outputs)
    assert output_ranges(spec) == {"background": 1.0, "signed": 2.0, "flat": 1.0}


def load_checkpoint_sha(path: Path) -> str:
    from dereflect.manifest import sha256_file

    return sha256_file(path)


def test_onnx_graph_is_clean_and_dynamic(rm2s):
    _, manifest = rm2s
    model = onnx.load(str(manifest.path_of("stage1")))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"BatchNormalization", "Identity"}, "BatchNorm and weight Identities must be folded"
    assert {"Pad", "Slice", "Conv", "ConvTranspose"} <= ops and ops & {"Sigmoid", "Clip"}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    assert helper.get_attribute_value(next(a for a in pad.attribute if a.name == "mode")) == b"edge"


def test_parity_at_odd_sizes_and_detects_a_wrong_model(rm2s):
    checkpoint, manifest = rm2s
    module = PaddedModel(load_checkpoint(checkpoint).build("stage1")).eval()
    cases = random_cases("image", 3, sizes=((1, 31, 45), (2, 64, 80), (1, 100, 33)), seed=3)
    cases.append(("natural", {"image": natural_images(1, 75, 121, seed=4)}))
    report = check_parity("stage1", module, str(manifest.path_of("stage1")), cases)
    assert report.passed and report.worst < 1e-4, report.format()
    shapes = {(1, 3, 31, 45), (2, 3, 64, 80), (1, 3, 100, 33), (1, 3, 75, 121)}
    assert {r.shape for r in report.rows} == shapes
    with torch.no_grad():
        module.net.head.bias.add_(0.5)
    assert not check_parity("stage1", module, str(manifest.path_of("stage1")), cases[:1]).passed


def test_fp16_file_types_and_psnr(rm2s):
    _, manifest = rm2s
    model = onnx.load(str(manifest.path_of("stage2", fp16=True)))
    weights = [init for init in model.graph.initializer if len(init.dims) == 4]
    assert weights and any(w.data_type == TensorProto.FLOAT16 for w in weights)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # The output layers (head conv, sigmoid, crop) stay float32.
    assert any(w.data_type == TensorProto.FLOAT for w in weights)
    images = natural_images(2, 96, 136, seed=21)
    emulated = fp16_mod.emulate_fp16(onnx.load(str(manifest.path_of("stage1", fp16=True))))
    stage1 = fp16_mod.compare_models(str(manifest.path_of("stage1")), emulated, [{"image": images}],
                                     {"background": 1.0})
    assert FP16_MIN_PSNR <= stage1["background"]["psnr_db"] < float("inf")
    assert verify(manifest.directory, fp16=True).passed


def _scale_graph(scale: float) -> onnx.ModelProto:
    """x -> Mul(scale) -> Relu -> Mul(1/scale) -> Div(2) -> y, plus a shape path (Shape -> Cast -> Mul)."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "big"),
             numpy_helper.from_array(np.array(1.0 / scale, np.float32), "small"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [
        helper.make_node("Mul", ["x", "big"], ["a"], name="scale_up"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Mul", ["b", "small"], ["c"], name="scale_down"),
        helper.make_node("Div", ["c", "two"], ["y"], name="halve"),
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="shape_float"),
        helper.make_node("Mul", ["sf", "two"], ["size2"], name="shape_math"),
    ]
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("size2", TensorProto.FLOAT, [2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fp16_conversion_keeps_float32_where_needed(tmp_path):
    import onnxruntime as ort

    model = _scale_graph(1e4)
    feed = {"x": np.array([[0.5, 10.0, -1.0, 0.25]], np.float32)}
    converted, plan = fp16_mod.convert_to_fp16(model, calibration=[feed], keep_output_layers=False)
    assert plan.kept_fp32 == {"scale_up": "large activations", "relu": "large activations",
                              "scale_down": "large activations", "halve": "float32 op"}
    shape_math = next(n for n in converted.graph.node if n.name == "shape_math")
    assert list(shape_math.input) == ["sf", "two"], "shape arithmetic must stay untouched"
    session = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    y, size2 = session.run(None, feed)
    assert y.dtype == np.float32 and np.allclose(y, [[0.25, 5.0, 0.0, 0.125]], rtol=1e-3)
    assert size2.tolist() == [2.0, 8.0]

    naive, plan = fp16_mod.convert_to_fp16(model, keep_output_layers=False)
    assert "scale_up" not in plan.kept_fp32
    emulated = fp16_mod.emulate_fp16(naive)
    session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, feed)[0]
    assert np.isinf(y[0, 1]) and np.allclose(y[0, [0, 2, 3]], [0.25, 0.0, 0.125], rtol=1e-3), \
        "without calibration the float16 activation 1e5 overflows"
    scores = fp16_mod.compare_models(model, naive, [feed], {"y": 10.0})
    assert scores["y"]["psnr_db"] > 40, "ONNX Runtime's CPU run of the file hides the overflow"
    assert fp16_mod.compare_models(model, emulated, [feed], {"y": 10.0})["y"]["psnr_db"] == float("-inf")


# --- TensorRT parser check -------------------------------------------------------------------------------

def test_compat_check_passes_on_exports(rm2s):
    _, manifest = rm2s
    for name in manifest.networks:
        for fp16 in (False, True):
            report = check_trt_compat(manifest.path_of(name, fp16=fp16))
            assert report.passed, report.format()
            assert report.summary() == {"8.5": True, "10": True, "11": True}


def test_compat_check_reports_problems():
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="cubic", name="upsample"),
        helper.make_node("Pad", ["r", "pads"], ["p"], mode="wrap", name="wrap_pad"),
        helper.make_node("Unique", ["p"], ["u"], name="unique"),
        helper.make_node("Custom", ["u"], ["y"], domain="com.example", name="plugin"),
    ]
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.zeros(8, np.int64), "pads")]
    graph = helper.make_graph(nodes, "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19),
                                                    helper.make_opsetid("com.example", 1)])
    report = check_trt_compat(model)
    assert not report.passed and not report.ok("8.5") and not report.ok("10.3.0")
    text = report.format()
    assert "opset 19 is outside the supported range 1-17" in text
    assert "mode='cubic' is not supported" in text and "mode='wrap' is not supported" in text
    assert "Unique" in text and "needs a TensorRT plugin" in text
    eight = [i for i in report.issues if i.version == "8.5"]
    ten = [i for i in report.issues if i.version == "10"]
    assert any(i.op == "Pad" for i in eight) and not any(i.op == "Pad" for i in ten)
    assert table_version("8.5.2.2") == "8.5" and table_version("11.1") == "11"
    assert "Conv" in load_table()["operators"]


@pytest.mark.parametrize("versions, message", [
    ("", r"--versions needs at least one TensorRT version, e\.g\. 8\.5,10,11"),
    (" , ", r"--versions needs at least one"),
    ("8.2", r"TensorRT 8\.2 is not supported: dereflect needs 8\.5 or later"),
    ("10,8.0", r"TensorRT 8\.0 is not supported"),
    ("8", r"TensorRT 8: give the minor version too \(8\.5 or later\)"),
    ("9.2", r"no compatibility table for TensorRT 9\.2"),
    ("ten", r"not a TensorRT version: 'ten'"),
])
def test_check_versions_are_refused_when_nothing_or_something_unsupported_would_be_checked(versions, message):
    from dereflect.export.trt_support import parse_versions

    with pytest.raises(InputError, match=message):
        parse_versions(versions)


def test_check_names_the_table_a_version_is_checked_with(rm2s, capsys):
    _, manifest = rm2s
    assert cli_main(["export", "check", str(manifest.directory), "--versions", "8.6,8.5.2,10.3,11"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT 8.6 (8.5's table): OK" in out and "TensorRT 8.5.2 (8.5's table): OK" in out
    assert "TensorRT 10.3 (10's table): OK" in out and "TensorRT 11: OK" in out
    assert cli_main(["export", "check", str(manifest.directory), "--versions", ""]) == 2


# --- goldens, tampering, overwrite -------------------------------------------------------------------------

def test_goldens_verify_with_onnxruntime(rm2s):
    _, manifest = rm2s
    report = verify(manifest.directory)
    assert report.passed and report.precision == "fp32", report.format()
    expected = {(n, f"golden {c}") for n in ("stage1", "stage2") for c in (0, 1)}
    assert {(r.network, r.case) for r in report.rows} == expected
    assert cli_main(["export", "verify", str(manifest.directory), "--network", "stage1"]) == 0
    assert cli_main(["export", "check", str(manifest.directory)]) == 0


def test_tampered_files_are_detected(rm2s, tmp_path):
    _, manifest = rm2s
    copy = tmp_path / "copy"
    shutil.copytree(manifest.directory, copy)
    with open(copy / "stage2.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="SHA-256"):
        load_manifest(copy)
    with pytest.raises(ModelError, match="SHA-256"):
        verify(copy)
    assert cli_main(["export", "verify", str(copy)]) == 2
    shutil.copy(manifest.directory / "stage2.onnx", copy / "stage2.onnx")
    data = dict(np.load(copy / "golden" / "stage1.npz"))
    data["case0.out.background"] = data["case0.out.background"] + 0.01
    np.savez_compressed(copy / "golden" / "stage1.npz", **data)
    with pytest.raises(ModelError, match="changed after export"):
        verify(copy)


def test_refuses_to_overwrite(rm2s, tmp_path):
    checkpoint, manifest = rm2s
    before = sorted(p.name for p in manifest.directory.iterdir())
    with pytest.raises(ModelError, match="--force"):
        export_onnx(checkpoint, manifest.directory)
    assert sorted(p.name for p in manifest.directory.iterdir()) == before
    user_dir = tmp_path / "photos"
    user_dir.mkdir()
    (user_dir / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ModelError, match="even with --force"):
        export_onnx(checkpoint, user_dir, force=True)
    assert (user_dir / "holiday.jpg").read_bytes() == b"precious"

    target = tmp_path / "again"
    shutil.copytree(manifest.directory, target)
    replaced = export_onnx(checkpoint, target, fp16=False, golden=False, force=True, model_name="my-model")
    assert replaced.directory == target.resolve()
    assert load_manifest(target).name == "my-model"
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "stage1.onnx", "stage2.onnx"]
    assert load_manifest(target).networks["stage1"].onnx_fp16 is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_engine_folder_is_a_complete_copy_of_an_export(rm2s, tmp_path):
    """export engine's folder: everything the manifest lists, copied and verified, before TensorRT builds there."""
    from dereflect.export.engine import plan_engine_dir

    checkpoint, manifest = rm2s
    copy = plan_engine_dir(manifest.directory, tmp_path / "engines").prepare()
    copy.verify_files(fp16=True)
    listed = sorted(str(p.relative_to(manifest.directory)) for p in manifest.directory.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(copy.directory)) for p in copy.directory.rglob("*") if p.is_file()) == listed
    assert copy.records == load_manifest(manifest.directory).records and copy.checkpoint == manifest.checkpoint
    assert verify(copy.directory, fp16=True).passed
    with pytest.raises(ModelError, match="training checkpoint; export it first"):
        plan_engine_dir(checkpoint, tmp_path / "from-checkpoint").prepare()
    assert not (tmp_path / "from-checkpoint").exists()


def test_stage1_checkpoint_is_refused(tmp_path):
    checkpoint = _rm2s_checkpoint(tmp_path / "stage1.safetensors", with_stage2=False)
    with pytest.raises(ModelError, match="train stage 2|Train stage 2"):
        export_onnx(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- CRRN -------------------------------------------------------------------------------------------------

def test_crrn_export(crrn):
    checkpoint, manifest = crrn
    spec = load_manifest(manifest.directory).networks["crrn"]
    expected = [("background", 3), ("reflection", 3), ("gradient", 1)]
    assert [(t.name, t.channels) for t in spec.outputs] == expected
    assert spec.outputs[1].value_range == (-1.0, 1.0)
    outputs = manifest.records["fp16"]["networks"]["crrn"]["outputs"]
    assert all(m["psnr_db"] >= FP16_MIN_PSNR for m in outputs.values()), outputs
    assert verify(manifest.directory).passed and verify(manifest.directory, fp16=True).passed
    module = PaddedModel(load_checkpoint(checkpoint).build("crrn")).eval()
    report = check_parity("crrn", module, str(manifest.path_of("crrn")),
                          random_cases("image", 3, sizes=((1, 35, 67),)), {"reflection": 2.0})
    assert report.passed and len(report.rows) == 3
    assert check_trt_compat(manifest.path_of("crrn", fp16=True)).passed


# --- natural images and the command line -------------------------------------------------------------------

def test_natural_images_are_deterministic_and_photo_like():
    a = natural_images(2, 64, 96, seed=5)
    assert a.shape == (2, 3, 64, 96) and a.dtype == np.float32
    assert np.array_equal(a, natural_images(2, 64, 96, seed=5))
    assert not np.array_equal(a, natural_images(2, 64, 96, seed=6))
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.08
    edges = np.abs(np.diff(a, axis=-1))
    assert 0.005 < float(np.median(edges)) < 0.1 and float(edges.max()) > 0.2  # smooth areas and sharp edges


def test_cli_does_not_import_torch_or_onnx():
    code = ("import argparse, sys; from dereflect.export import cli; "
            "cli.register(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'onnx', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_export_onnx(tmp_path, capsys):
    checkpoint = _rm2s_checkpoint(tmp_path / "rm2s.safetensors")
    assert cli_main(["export", "onnx", str(checkpoint), "-o", str(tmp_path / "out"), "--no-fp16",
                     "--no-golden"]) == 0
    printed = capsys.readouterr().out
    assert "stage2.onnx" in printed and "TensorRT parser check" in printed
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["method"] == "rm2s"
    assert cli_main(["export", "onnx", str(checkpoint), "-o", str(tmp_path / "out")]) == 2
    capsys.readouterr()
    # No FP16 files: the hint names the FP32 route of each command that can ask for them.
    from dereflect.cli import main

    assert main(["export", "verify", str(tmp_path / "out"), "--backend", "onnxruntime", "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "no FP16 ONNX file" in err and "export verify: without --fp16" in err


def test_a_checkpoint_and_its_export_run_with_the_same_settings_and_give_the_same_result(rm2s, tmp_path):
    """eval on a stage-2 checkpoint and on its export: one route, the trained c1/c2, the same scores."""
    from dereflect.tools.evaluate import evaluate

    checkpoint, manifest = rm2s
    rng = np.random.default_rng(5)
    for folder in ("blended", "transmission_layer"):
        (tmp_path / "pairs" / folder).mkdir(parents=True)
    for index in range(2):
        background = rng.uniform(0.1, 0.8, (48, 64, 3))
        blended = np.clip(background + 0.3 * cv2.GaussianBlur(rng.uniform(0, 1, (48, 64, 3)), (0, 0), 3), 0, 1)
        for folder, image in (("blended", blended), ("transmission_layer", background)):
            cv2.imwrite(str(tmp_path / "pairs" / folder / f"{index}.png"), (image * 255).astype(np.uint8))
    from_checkpoint = evaluate(checkpoint, tmp_path / "pairs", contact_images=0, progress=False, device="cpu")
    from_export = evaluate(manifest.directory, tmp_path / "pairs", contact_images=0, progress=False)
    assert from_checkpoint.model["backend"] == "torch" and from_export.model["backend"] == "onnxruntime"
    for a, b in zip(from_checkpoint.images, from_export.images):
        assert a.model["psnr"] == pytest.approx(b.model["psnr"], abs=1e-3)
    from dereflect.models import open_model

    assert open_model(checkpoint, device="cpu").settings == open_model(manifest.directory).settings
    assert (open_model(checkpoint, device="cpu").settings.c1, open_model(checkpoint).settings.c2) == (0.2, 0.8)


def test_an_export_can_record_the_side_its_networks_should_run_at(rm2s, tmp_path):
    """A model trained on small views is run at that scale by default; the user can still choose."""
    from dereflect.remover import Remover

    checkpoint, _ = rm2s
    manifest = export_onnx(checkpoint, tmp_path / "small", fp16=False, golden=False, max_side=224,
                           model_name="small-one")
    assert json.loads((tmp_path / "small" / "manifest.json").read_text())["max_side"] == 224
    assert load_manifest(manifest.directory).name == "small-one"
    assert Remover.load(manifest.directory).max_hw == (224, 224)
    assert Remover.load(manifest.directory, max_side=512).max_hw == (512, 512)
    assert Remover.load(manifest.directory, max_side=0).max_hw is None
    assert Remover.load(rm2s[1].directory).max_hw == (1024, 1024)  # none recorded: the runtime's default
    image = np.random.default_rng(0).uniform(0, 1, (300, 400, 3)).astype(np.float32)
    result = Remover.load(manifest.directory).remove_with_intermediates(image, colour_order="RGB")
    assert result.background.shape == image.shape and result.scale < 1
    # Refused before anything is written: the rule the manifest is read with (300.5 once made one it refused).
    for side in (300.5, 16, "big", True):
        with pytest.raises(InputError, match="max_side must be .*at least 32"):
            export_onnx(checkpoint, tmp_path / "tiny", fp16=False, golden=False, max_side=side)
        assert not (tmp_path / "tiny").exists()
    data = json.loads((tmp_path / "small" / "manifest.json").read_text())
    data["max_side"] = "big"
    (tmp_path / "small" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="max_side"):
        Remover.load(tmp_path / "small")


# --- a training checkpoint rebuilt from an export ---------------------------------------------------

def _outputs(checkpoint, name: str, x: torch.Tensor, train_mode: bool = False):
    net = checkpoint.build(name)
    net.train(train_mode)
    with torch.no_grad():
        out = PaddedModel(net)(x)
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


@pytest.mark.parametrize("fixture", ["rm2s", "crrn"])
def test_an_export_gives_back_a_checkpoint_that_computes_what_the_original_did(fixture, request, tmp_path,
                                                                              capsys):
    """Folded BatchNorms unfolded: the same function in eval mode, close to it in train mode, metadata kept."""
    from dereflect.cli import main

    checkpoint_path, manifest = request.getfixturevalue(fixture)
    out = tmp_path / "rebuilt.safetensors"
    assert main(["train", "from-export", str(manifest.directory), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    original, rebuilt = load_checkpoint(checkpoint_path), load_checkpoint(out)
    assert rebuilt.metadata["networks"] == original.metadata["networks"]
    assert rebuilt.metadata["kind"] == original.metadata["kind"] and rebuilt.step == original.step
    assert rebuilt.metadata.get("stage2") == original.metadata.get("stage2")
    assert rebuilt.metadata["training"]["from_export"]["name"] == manifest.name
    rng = np.random.default_rng(3)
    exported = [c.name for c in manifest.networks.values()]
    for contract_name in exported:
        stored = {"stage2": "generator"}.get(contract_name, contract_name)
        channels = manifest.networks[contract_name].inputs[0].channels
        x = torch.from_numpy(rng.uniform(0, 1, (2, channels, 40, 56)).astype(np.float32))
        for a, b in zip(_outputs(original, stored, x), _outputs(rebuilt, stored, x)):
            assert np.abs(a - b).max() < 1e-4
        # Train-mode BatchNorm (CRRN's GiN) uses batch statistics; rescaled to photo-like statistics, it
        # starts near the exported function instead of somewhere else entirely.
        natural = torch.from_numpy(natural_images(4, 64, 96, seed=2))
        if channels == 3:
            trained = _outputs(rebuilt, stored, natural, train_mode=True)[0]
            assert np.abs(trained - _outputs(original, stored, natural)[0]).mean() < 0.1
    assert "max_side" not in rebuilt.metadata  # the export records none: both run at the runtime's default
    if fixture == "rm2s":
        # The critic is not exported: a fresh one, said so.
        assert "started afresh: discriminator" in printed
        assert rebuilt.states["discriminator"].keys() == original.states["discriminator"].keys()
    assert main(["train", "from-export", str(manifest.directory), "-o", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_a_checkpoint_rebuilt_from_an_export_runs_and_exports_at_the_exports_side(rm2s, tmp_path):
    """The side an export runs its networks at is the rebuilt checkpoint's too, and its export's again."""
    from dereflect.cli import main
    from dereflect.models import open_model

    checkpoint, _ = rm2s
    export = export_onnx(checkpoint, tmp_path / "small", fp16=False, golden=False, max_side=224).directory
    rebuilt = tmp_path / "rebuilt.safetensors"
    with umask(0o022):
        assert main(["train", "from-export", str(export), "-o", str(rebuilt)]) == 0
    assert rebuilt.stat().st_mode & 0o777 == 0o644  # not safetensors' private 0600
    assert read_metadata(rebuilt)["max_side"] == 224
    from_export, from_checkpoint = open_model(export), open_model(rebuilt, device="cpu")
    assert from_export.max_hw == from_checkpoint.max_hw == (224, 224)
    image = natural_images(1, 300, 400, seed=4)[0].transpose(1, 2, 0).copy()
    difference = np.abs(from_export.remove(image, "RGB") - from_checkpoint.remove(image, "RGB")).max()
    assert difference < 1e-4
    assert cli_main(["export", "onnx", str(rebuilt), "-o", str(tmp_path / "again"), "--no-fp16",
                     "--no-golden"]) == 0
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["max_side"] == 224
    assert cli_main(["export", "onnx", str(rebuilt), "-o", str(tmp_path / "larger"), "--no-fp16", "--no-golden",
                     "--max-side", "320"]) == 0
    assert json.loads((tmp_path / "larger" / "manifest.json").read_text())["max_side"] == 320  # the option wins


def test_a_bundled_model_and_the_checkpoint_rebuilt_from_it_give_the_same_result(tmp_path):
    """crrn-lite runs its networks at 224 px; rebuilt as a checkpoint, at the same side (not the runtime's 1024)."""
    from dereflect.cli import main
    from dereflect.remover import Remover

    rebuilt = tmp_path / "crrn-lite.safetensors"
    assert main(["train", "from-export", "crrn-lite", "-o", str(rebuilt)]) == 0
    bundled, checkpoint = Remover.load("crrn-lite"), Remover.load(rebuilt, device="cpu")
    assert bundled.max_hw == checkpoint.max_hw == (224, 224)
    image = natural_images(1, 240, 320, seed=9)[0].transpose(1, 2, 0).copy()
    assert np.abs(bundled.remove(image, "RGB") - checkpoint.remove(image, "RGB")).max() < 1e-4


def test_export_onnx_of_a_model_that_is_exported_already_says_how_to_get_a_checkpoint(rm2s, tmp_path, capsys):
    from dereflect.cli import main

    _, manifest = rm2s
    out = tmp_path / "m4"
    for reference, command in (("crrn-lite", "dereflect train from-export crrn-lite -o crrn-lite.safetensors"),
                               (str(manifest.directory), f"dereflect train from-export {manifest.directory} -o "
                                                         f"{manifest.directory.name}.safetensors")):
        assert main(["export", "onnx", reference, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert "not a training checkpoint: export onnx takes a checkpoint (.safetensors)" in err
        assert err.strip().endswith(command) and not out.exists()


def test_from_export_refuses_what_it_cannot_rebuild(rm2s, tmp_path, capsys):
    from dereflect.cli import main

    checkpoint, manifest = rm2s
    assert main(["train", "from-export", str(checkpoint), "-o", str(tmp_path / "a.safetensors")]) == 2
    assert "training checkpoint already" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(manifest.directory, bare)
    data = json.loads((bare / "manifest.json").read_text())
    data["checkpoint"] = {}
    (bare / "manifest.json").write_text(json.dumps(data))
    assert main(["train", "from-export", str(bare), "-o", str(tmp_path / "b.safetensors")]) == 2
    assert "records no checkpoint metadata" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


def test_verify_names_and_skips_images_it_cannot_read_and_verifies_the_rest(tmp_path, capsys):
    from onnx_fixtures import make_crrn_export

    model = make_crrn_export(tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(photos / name), (rng.random((40, 56, 3)) * 255).astype(np.uint8))
    (photos / "b.png").write_bytes(b"not an image")
    (photos / "empty.jpg").write_bytes(b"")
    assert cli_main(["export", "verify", str(model), "--images", str(photos)]) == 1  # some items failed
    captured = capsys.readouterr()
    # One line per bad file, naming it and why (the reader's own words), as remove does.
    bad, empty = captured.err.splitlines()
    assert bad.startswith(f"dereflect: error: {photos / 'b.png'}: not a readable image") and bad.endswith("; skipped")
    assert empty.startswith(f"dereflect: error: {photos / 'empty.jpg'}: file is empty") and empty.endswith("; skipped")
    report = verify(model, images=photos)
    assert sorted({row.case for row in report.rows}) == ["a.png", "c.png"] and report.passed
    assert list(report.unread) == [str(photos / "b.png"), str(photos / "empty.jpg")]
    assert (f"not read: 2 image(s) ({photos / 'b.png'}, {photos / 'empty.jpg'}), left out of the comparison"
            in captured.out and "result: PASS (of what was read; 2 image(s) not read)" in captured.out)

    for name in ("a.png", "c.png"):
        (photos / name).unlink()
    assert cli_main(["export", "verify", str(model), "--images", str(photos)]) == 2  # nothing could be read
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 2 and "result: nothing compared" in captured.out


def test_verify_runs_your_images_at_the_side_remove_runs_them_at(tmp_path, capsys):
    """--images scales each photo as remove does: by default to the side the model records, not 1024."""
    from dereflect.remover import Remover, fit_size
    from onnx_fixtures import make_crrn_export

    model = make_crrn_export(tmp_path / "model")
    manifest_path = model / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "max_side": 48}))
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a.png"), (np.random.default_rng(4).random((120, 160, 3)) * 255).astype(np.uint8))

    def shapes(**options):
        report = verify(model, images=photos, **options)
        assert report.passed, report.format()
        return {row.shape for row in report.rows}

    runtime = fit_size(120, 160, Remover.load(model).max_hw)[:2]
    assert shapes() == {(1, 3) + runtime} == {(1, 3, 36, 48)}
    assert shapes(max_side=64) == {(1, 3, 48, 64)} and shapes(max_side=0) == {(1, 3, 120, 160)}
    assert cli_main(["export", "verify", str(model), "--images", str(photos)]) == 0
    assert "[1, 3, 36, 48]" in capsys.readouterr().out
    with pytest.raises(InputError, match="max_side must be a whole number of pixels"):
        verify(model, images=photos, max_side=20)
    # without --images there is nothing it would size: refused, not ignored
    with pytest.raises(InputError, match=r"--max-side sizes your photos \(--images DIR\)"):
        export_cli.run_verify(argparse.Namespace(model=str(model), max_side=64, images=None))

"""TensorRT version dispatch, profile shapes, engine sidecars, the engine builder against a fake TensorRT,
the folder engines go to, and ``export verify`` (goldens, no goldens, the user's images).

TensorRT cannot be installed here, so ``build_engines`` runs against a small fake ``tensorrt``
module (injected into ``sys.modules``) that records the calls made for 8.5, 10.3 and 11.0.
The export directory is made by hand from tiny ONNX graphs, so these tests need no torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from dereflect import trt_api
from dereflect.errors import InputError, MissingDependencyError, ModelError, install_line
from dereflect.export.verify import natural_images, verify
from dereflect.manifest import Manifest, NetworkSpec, TensorSpec, load_manifest, sha256_file
from dereflect.trt_api import (
    EngineInfo,
    check_engine_compatible,
    derive_profile,
    engine_paths,
    fp16_flag_available,
    needs_explicit_batch_flag,
    parse_shape,
    parse_version,
    read_engine_info,
    shape_in_profile,
    trt_version_tuple,
    use_strong_typing,
    write_engine_info,
)
from onnx import TensorProto, helper, numpy_helper

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


# --- version dispatch ---------------------------------------------------------------------------------

def test_parse_version_forms():
    assert parse_version("8.5.2.2") == (8, 5, 2)
    assert parse_version("10.3.0") == (10, 3, 0)
    assert parse_version("11.0") == (11, 0, 0)
    assert trt_version_tuple(types.SimpleNamespace(__version__="10.12.0.36")) == (10, 12, 0)
    with pytest.raises(InputError):
        parse_version("unknown")


@pytest.mark.parametrize(
    "version, explicit_batch, strong, fp16_flag",
    [("8.5.2.2", True, False, True), ("10.3.0", False, False, True), ("10.12.0", False, False, True),
     ("11.0.0", False, True, False), ("11.2.1", False, True, False)],
)
def test_version_dispatch(version, explicit_batch, strong, fp16_flag):
    ver = parse_version(version)
    assert needs_explicit_batch_flag(ver) is explicit_batch
    assert use_strong_typing(ver) is strong
    assert fp16_flag_available(ver) is fp16_flag


# --- profile shapes -----------------------------------------------------------------------------------

def test_parse_shape_forms():
    assert parse_shape("1x3x256x320", 3) == (1, 3, 256, 320)
    assert parse_shape("1x3x256x320", 9) == (1, 9, 256, 320)  # C=3 means "the image": stage 2 takes 9
    assert parse_shape("1x9x64x64", 9) == (1, 9, 64, 64)
    assert parse_shape("1x9x64x64", 3, model_channels=(3, 9)) == (1, 3, 64, 64)  # stage 2's C, for stage 1
    assert parse_shape("256x320", 3) == (1, 3, 256, 320)
    assert parse_shape("720p", 3) == (1, 3, 720, 1280)
    assert parse_shape(" 1080P ", 9) == (1, 9, 1080, 1920)
    assert parse_shape("4k", 3) == (1, 3, 2160, 3840)
    for bad in ("1x5x64x64", "64", "axb", "1x3x64", "", "1x3xax64"):
        with pytest.raises(InputError):
            parse_shape(bad, 3)


@pytest.mark.parametrize("channels, model_channels, shape, message", [
    # CRRN: one 3-channel input; the message names it once.
    (3, (3,), "1x9x128x128", r"^--min: shape '1x9x128x128' has 9 channels; this model's inputs take 3 \(or give HxW"),
    (3, (3, 9), "1x5x128x128", r"has 5 channels; this model's inputs take 3 or 9 \("),
    (3, (3,), "4x3x128x128", r"^--min: shape '4x3x128x128' has batch 4; the TensorRT runtime runs one frame at a "
                             r"time, so every profile shape has batch 1"),
    (3, (3,), "0x3x128x128", r"has batch 0"),
])
def test_profile_shapes_the_runtime_cannot_use_are_refused(channels, model_channels, shape, message):
    with pytest.raises(InputError, match=message):
        derive_profile(channels, shape, "720p", "1080p", model_channels)


@pytest.mark.parametrize("channels, max_shape, message", [
    (3, "100000x100000", r"^--max: 1x3x100000x100000 is 30000000000 elements; TensorRT takes tensors below 2\*\*31 "
                         r"elements: a 3-channel frame below 715827882 pixels$"),
    (9, "16384x16384", r"^--max: 1x9x16384x16384 is 2415919104 elements"),
    (3, "600000x8", r"^--max: batch 1 or height 600000 exceeds the fused middle-step kernel's grid"),
])
def test_a_max_beyond_the_runtime_is_refused(channels, max_shape, message):
    with pytest.raises(InputError, match=message):
        derive_profile(channels, "1x3x1x1", "1x3x1x1", max_shape)


def test_derive_profile_defaults_and_order():
    profile = derive_profile(3)
    assert profile == {"min": [1, 3, 128, 128], "opt": [1, 3, 720, 1280], "max": [1, 3, 1080, 1920]}
    assert derive_profile(9, "1x3x64x64", "256x256", "1x3x512x512")["max"] == [1, 9, 512, 512]
    assert derive_profile(3, max_shape="16384x16384")["max"] == [1, 3, 16384, 16384]
    with pytest.raises(InputError, match="min <= opt <= max"):
        derive_profile(3, "512x512", "256x256", "1080p")
    with pytest.raises(InputError, match="below 1"):
        derive_profile(3, "0x0", "256x256", "1080p")
    assert shape_in_profile((1, 3, 144, 256), profile)
    assert not shape_in_profile((1, 3, 100, 256), profile)
    assert not shape_in_profile((2, 3, 144, 256), profile)
    assert not shape_in_profile((1, 3, 144), profile)


# --- sidecars -----------------------------------------------------------------------------------------

def _info(**changes) -> EngineInfo:
    base = dict(network="stage1", engine="stage1.engine", onnx="stage1.onnx", onnx_sha256="a" * 64,
                tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16",
                profiles={"image": derive_profile(3)}, engine_sha256="b" * 64)
    base.update(changes)
    return EngineInfo(**base)


def test_sidecar_roundtrip_and_validation(tmp_path):
    path = write_engine_info(_info(), tmp_path / "stage1.engine.json")
    loaded = read_engine_info(path)
    assert loaded == _info(created=loaded.created)
    assert json.loads(path.read_text())["format"] == "dereflect-engine"
    with pytest.raises(ModelError, match="not found"):
        read_engine_info(tmp_path / "missing.engine.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a valid engine sidecar"):
        read_engine_info(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    del data["gpu_name"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="gpu_name"):
        read_engine_info(tmp_path / "short.json")
    data = {**json.loads(path.read_text()), "format": "other"}
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="not a dereflect engine sidecar"):
        read_engine_info(tmp_path / "other.json")


def test_a_sidecar_without_the_engines_hash_is_refused(tmp_path):
    """The project's builder always records the engine's SHA-256: a sidecar without it cannot vouch for the engine."""
    path = tmp_path / "stage1.engine.json"
    data = _info().to_dict()
    path.write_text(json.dumps({**data, "engine_sha256": ""}))
    with pytest.raises(ModelError, match=r"field 'engine_sha256' must be the engine's SHA-256 .*got ''; rebuild the "
                                         r"engine with: dereflect export engine DIR$"):
        read_engine_info(path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "engine_sha256"}))
    with pytest.raises(ModelError, match=r"lacks engine_sha256; rebuild the engine with: dereflect export engine"):
        read_engine_info(path)


def test_check_engine_compatible():
    info = _info()
    check_engine_compatible(info, "10.3.0.26", "Orin", "8.7", "a" * 64)
    check_engine_compatible(info, "10.3.0", "unknown", "unknown", "a" * 64)
    with pytest.raises(ModelError, match="TensorRT 10.3.0 but TensorRT 10.4.0"):
        check_engine_compatible(info, "10.4.0", "Orin", "8.7", "a" * 64)
    with pytest.raises(ModelError, match="compute capability 8.7"):
        check_engine_compatible(info, "10.3.0", "NVIDIA H100", "9.0", "a" * 64)
    with pytest.raises(ModelError, match="built on 'Orin'"):
        check_engine_compatible(info, "10.3.0", "Xavier", "8.7", "a" * 64)
    with pytest.raises(ModelError, match="another ONNX file"):
        check_engine_compatible(info, "10.3.0", "Orin", "8.7", "b" * 64)


def test_an_engine_built_on_another_orin_module_is_refused(tmp_path):
    """Every Orin module reports GPU 'Orin', 8.7: the board name the sidecar records tells them apart."""
    import dataclasses

    agx = dataclasses.replace(_info(), board="NVIDIA Jetson AGX Orin Developer Kit")
    check_engine_compatible(agx, "10.3.0", "Orin", "8.7", "a" * 64, "NVIDIA Jetson AGX Orin Developer Kit")
    with pytest.raises(ModelError, match="built on a 'NVIDIA Jetson AGX Orin Developer Kit' but this board is a "
                                         "'NVIDIA Jetson Orin Nano Developer Kit'"):
        check_engine_compatible(agx, "10.3.0", "Orin", "8.7", "a" * 64, "NVIDIA Jetson Orin Nano Developer Kit")
    # a board either side does not know (a sidecar from before boards were recorded, or not a Jetson): not compared
    check_engine_compatible(_info(), "10.3.0", "Orin", "8.7", "a" * 64, "NVIDIA Jetson Orin Nano Developer Kit")
    check_engine_compatible(agx, "10.3.0", "Orin", "8.7", "a" * 64, None)
    path = tmp_path / "stage1.engine.json"
    path.write_text(json.dumps(agx.to_dict()))
    assert read_engine_info(path).board == agx.board
    path.write_text(json.dumps({**agx.to_dict(), "board": 7}))
    with pytest.raises(ModelError, match="field 'board' must be a string or null"):
        read_engine_info(path)


def test_gpu_info_probe_order(monkeypatch):
    def broken():
        raise RuntimeError("driver missing")

    monkeypatch.setattr(trt_api, "_gpu_from_cuda_python", broken)
    monkeypatch.setattr(trt_api, "_gpu_from_pycuda", lambda: ("Orin", "8.7"))
    monkeypatch.setattr(trt_api, "_gpu_from_nvidia_smi", lambda: ("other", "9.0"))
    assert trt_api.gpu_info() == ("Orin", "8.7")
    monkeypatch.setattr(trt_api, "_gpu_from_pycuda", lambda: None)
    monkeypatch.setattr(trt_api, "_gpu_from_nvidia_smi", lambda: None)
    assert trt_api.gpu_info() == ("unknown", "unknown")


def test_trt_api_imports_nothing_heavy():
    code = ("import sys, dereflect.trt_api, dereflect.export.cli; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'onnx', 'pycuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- a hand-made export directory (no torch) ------------------------------------------------------------

def _tiny_network(path: Path, input_name: str, channels: int, dtype: int = TensorProto.FLOAT) -> None:
    rng = np.random.default_rng(channels)
    weight = (rng.standard_normal((3, channels, 1, 1)) * 0.3).astype(
        np.float16 if dtype == TensorProto.FLOAT16 else np.float32)
    nodes = [helper.make_node("Conv", [input_name, "w"], ["logits"], name="conv"),
             helper.make_node("Sigmoid", ["logits"], ["background"], name="sigmoid")]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(input_name, dtype, ["batch", channels, "height", "width"])],
        [helper.make_tensor_value_info("background", dtype, ["batch", 3, "height", "width"])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture()
def export_dir(tmp_path) -> Path:
    """An RM2S export directory with tiny 1x1-conv networks, FP16 files and goldens."""
    from dereflect.export.verify import write_goldens

    directory = tmp_path / "export"
    directory.mkdir()
    networks = {}
    for name, input_name, channels in (("stage1", "image", 3), ("stage2", "stage2_input", 9)):
        _tiny_network(directory / f"{name}.onnx", input_name, channels)
        _tiny_network(directory / f"{name}.fp16.onnx", input_name, channels, TensorProto.FLOAT16)
        networks[name] = NetworkSpec(
            name=name, onnx=f"{name}.onnx", sha256=sha256_file(directory / f"{name}.onnx"),
            inputs=[TensorSpec(input_name, channels)], outputs=[TensorSpec("background", 3)],
            onnx_fp16=f"{name}.fp16.onnx", sha256_fp16=sha256_file(directory / f"{name}.fp16.onnx"),
        )
    manifest = Manifest(method="rm2s", name="tiny", networks=networks, directory=directory)
    # As the exporter records it: the FP16 plan kept the output layers (here the sigmoid) in float32.
    kept = {"float32_nodes": ["sigmoid"]}
    manifest.records = {"golden": write_goldens(manifest), "fp16": {"networks": {"stage1": kept, "stage2": kept}}}
    manifest.save()
    return directory


# --- a fake TensorRT -------------------------------------------------------------------------------------

class _Flag(int):
    """Stands in for TensorRT's pybind enums (``int(flag)`` gives the bit index)."""


def make_fake_tensorrt(version: str, calls: list):
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            self.severity = severity

    creation = types.SimpleNamespace()
    if major < 11:
        creation.EXPLICIT_BATCH = _Flag(0)
    if major >= 10:
        creation.STRONGLY_TYPED = _Flag(5)

    class Tensor:
        def __init__(self, name, dtype="float32"):
            self.name = name
            self.dtype = dtype

    class Layer:
        """One layer per ONNX node, named like the parser names them (node name, then _1, _2 ...)."""

        def __init__(self, name, outputs):
            self.name = name
            self.precision = None
            self.outputs = outputs

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_output(self, index):
            return self.outputs[index]

        def set_output_type(self, index, dtype):
            calls.append(("set_output_type", self.name, index, dtype))

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = []
            self.layers = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, index):
            return self.layers[index]

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse(self, data):
            model = onnx.load_from_string(data)
            calls.append(("parse", model.graph.input[0].type.tensor_type.elem_type))
            self.network.inputs = [Tensor(i.name) for i in model.graph.input]
            self.network.layers = [Layer(n.name, [Tensor(o) for o in n.output]) for n in model.graph.node]
            # A shape-computing helper layer named after the sigmoid node, with an integer output.
            self.network.layers.append(Layer("sigmoid_1", [Tensor("shape", dtype="int32")]))
            return True

        def get_error(self, index):
            return "no error"

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls.append(("set_shape", name, list(low), list(opt), list(high)))

    class Config:
        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

        def add_optimization_profile(self, profile):
            calls.append(("add_profile",))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            return True

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            for hook in trt.during_build:
                hook()
            monitor = getattr(config, "progress_monitor", None)
            if monitor is not None:  # as TensorRT reports: a phase, a nested one, their steps
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactic selection", "Building engine", 3)
                steps = [monitor.step_complete("Tactic selection", i) for i in range(3)]
                monitor.phase_finish("Tactic selection")
                steps += [monitor.step_complete("Building engine", i) for i in range(2)]
                monitor.phase_finish("Building engine")
                calls.append(("steps", steps))
                if not all(steps):
                    return None  # cancelled, as TensorRT answers a monitor that asks
            return b"ENGINE-" + version.encode()

    builder_flags = types.SimpleNamespace(OBEY_PRECISION_CONSTRAINTS="OBEY")
    if major < 11:
        builder_flags.FP16 = "FP16"
    trt.float32, trt.float16 = "float32", "float16"
    trt.Logger = Logger
    trt.Builder = Builder
    trt.OnnxParser = Parser
    trt.NetworkDefinitionCreationFlag = creation
    trt.BuilderFlag = builder_flags
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.during_build = []  # callables a test runs inside each build
    if major >= 10:

        class IProgressMonitor:
            def __init__(self):
                calls.append(("monitor",))

        trt.IProgressMonitor = IProgressMonitor
    return trt


@pytest.fixture()
def fake_trt(monkeypatch):
    """``install(version)`` puts a fake tensorrt in sys.modules and returns the list of recorded calls."""
    monkeypatch.setattr(trt_api, "gpu_info", lambda: ("Orin", "8.7"))
    import dereflect.export.engine as engine_module

    monkeypatch.setattr(engine_module, "gpu_info", lambda: ("Orin", "8.7"))

    def install(version: str) -> list:
        calls: list = []
        monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(version, calls))
        return calls

    return install


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0", "11.0.0"])
def test_build_engines_api_per_version(export_dir, fake_trt, tmp_path, version, monkeypatch):
    from dereflect.export.engine import build_engines

    board = tmp_path / "model"
    board.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    monkeypatch.setattr(trt_api, "DEVICE_TREE_MODEL", (board,))
    calls = fake_trt(version)
    cache = tmp_path / "timing.cache"
    infos = build_engines(export_dir, fp16=True, min_shape="1x3x64x64", opt_shape="256x256",
                          max_shape="720p", timing_cache=cache, workspace=1 << 28)
    major = int(version.split(".")[0])
    flags = {c[1] for c in calls if c[0] == "create_network"}
    expected_flags = {1 << 0} if major == 8 else ({1 << 5} if major == 11 else {0})
    assert flags == expected_flags
    fp16_flag_set = [c for c in calls if c == ("set_flag", "FP16")]
    assert len(fp16_flag_set) == (0 if major == 11 else 2)
    # With the FP16 flag, the nodes the FP16 plan kept in float32 are pinned to float32 (not the shape layer).
    pinned = [c for c in calls if c[0] == "set_output_type"]
    assert pinned == ([] if major == 11 else [("set_output_type", "sigmoid", 0, "float32")] * 2)
    assert calls.count(("set_flag", "OBEY")) == (0 if major == 11 else 2)
    parsed = {c[1] for c in calls if c[0] == "parse"}
    assert parsed == ({TensorProto.FLOAT16} if major == 11 else {TensorProto.FLOAT})
    shapes = [c for c in calls if c[0] == "set_shape"]
    assert ("set_shape", "image", [1, 3, 64, 64], [1, 3, 256, 256], [1, 3, 720, 1280]) in shapes
    assert ("set_shape", "stage2_input", [1, 9, 64, 64], [1, 9, 256, 256], [1, 9, 720, 1280]) in shapes
    assert calls.count(("add_profile",)) == 2 and calls.count(("build",)) == 2
    assert ("workspace", "WORKSPACE", 1 << 28) in calls
    assert [c for c in calls if c[0] == "create_timing_cache"] == [("create_timing_cache", b"")]
    assert calls.count(("set_timing_cache", False)) == 2
    assert cache.read_bytes() == b"+"

    manifest = load_manifest(export_dir)
    for name, info in infos.items():
        engine, sidecar = engine_paths(export_dir, name)
        assert engine.read_bytes() == b"ENGINE-" + version.encode()
        assert read_engine_info(sidecar) == info
        spec = manifest.networks[name]
        assert info.onnx == (spec.onnx_fp16 if major == 11 else spec.onnx)
        assert info.onnx_sha256 == (spec.sha256_fp16 if major == 11 else spec.sha256)
        assert (info.tensorrt_version, info.gpu_name, info.compute_capability) == (version, "Orin", "8.7")
        assert info.precision == "fp16" and info.strongly_typed is (major == 11)
        assert info.float32_layers == (0 if major == 11 else 1)
        assert info.engine_sha256 == sha256_file(engine)
        assert info.board == "NVIDIA Jetson AGX Orin Developer Kit"  # what tells Orin modules apart

    calls2 = fake_trt(version)
    build_engines(export_dir, fp16=False, timing_cache=cache, networks=["stage1"])
    assert [c for c in calls2 if c[0] == "create_timing_cache"] == [("create_timing_cache", b"+")]
    assert not [c for c in calls2 if c[0] == "set_flag"]
    assert {c[1] for c in calls2 if c[0] == "parse"} == {TensorProto.FLOAT}
    assert read_engine_info(engine_paths(export_dir, "stage1")[1]).precision == "fp32"
    assert cache.read_bytes() == b"++"


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0", "11.0.0"])
def test_build_engines_shows_the_builders_phases_where_tensorrt_reports_them(export_dir, fake_trt, tmp_path,
                                                                             version, capsys, caplog):
    from dereflect.export.engine import build_engines

    calls = fake_trt(version)
    with caplog.at_level("INFO", logger="dereflect.export"):
        build_engines(export_dir, timing_cache=tmp_path / "cache", networks=["stage1"])
    err = capsys.readouterr().err
    logged = caplog.text
    assert "building stage1" in logged and "built stage1 in" in logged
    if version.startswith("8."):  # no IProgressMonitor before TensorRT 10: a line says it takes a while
        assert ("monitor",) not in calls and "this can take minutes" in logged and "Tactic" not in err
    else:
        assert calls.count(("monitor",)) == 1 and ("steps", [True] * 5) in calls
        # The top phase's bar stays, finished; a nested one is cleared when its phase ends.
        assert "stage1: Building engine: 100%" in err and "2/2" in err and "stage1: Tactic selection" in err
    calls = fake_trt(version)
    build_engines(export_dir, timing_cache=tmp_path / "cache", networks=["stage1"], progress=False)
    assert ("monitor",) not in calls and "Building engine" not in capsys.readouterr().err


def test_build_engines_11_needs_fp16_onnx(export_dir, fake_trt, tmp_path):
    from dereflect.export.engine import build_engines

    data = json.loads((export_dir / "manifest.json").read_text())
    for entry in data["networks"].values():
        entry.pop("onnx_fp16")
        entry.pop("sha256_fp16")
    (export_dir / "manifest.json").write_text(json.dumps(data))
    fake_trt("11.0.0")
    with pytest.raises(ModelError, match="strongly typed"):
        build_engines(export_dir, timing_cache=tmp_path / "cache")
    calls = fake_trt("10.3.0")
    build_engines(export_dir, timing_cache=tmp_path / "cache")
    assert calls.count(("build",)) == 2


def test_build_engines_without_tensorrt(export_dir, monkeypatch):
    from dereflect.export.engine import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"dereflect\[trt\]"):
        build_engines(export_dir)


def test_build_engines_checks_its_options_before_needing_tensorrt(export_dir, monkeypatch):
    from dereflect.export.engine import build_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(InputError, match="^--max: 1x3x100000x100000 is"):
        build_engines(export_dir, max_shape="100000x100000")
    with pytest.raises(InputError, match=r"unknown network\(s\) \['stage3'\]; this export has"):
        build_engines(export_dir, networks=["stage3"])
    with pytest.raises(InputError, match=r"workspace must be 0 \(TensorRT's default: up to the GPU's memory\) or a "
                                         r"positive size, got -1048576 bytes \(-1 MiB\)"):
        build_engines(export_dir, workspace=-1 << 20)


def test_build_engines_workspace(export_dir, fake_trt, tmp_path):
    from dereflect.export.engine import build_engines

    calls = fake_trt("10.3.0")
    build_engines(export_dir, timing_cache=tmp_path / "cache", workspace=0, networks=["stage1", "stage1"])
    assert not [c for c in calls if c[0] == "workspace"] and calls.count(("build",)) == 1  # 0: TensorRT's own
    calls = fake_trt("10.3.0")
    with pytest.raises(InputError, match="workspace"):
        build_engines(export_dir, timing_cache=tmp_path / "cache", workspace=-1)
    assert calls == []  # refused before TensorRT was used at all


def test_engine_profiles_take_any_input_channel_count_of_the_model(export_dir):
    from dereflect.export.engine import engine_profiles

    profiles = engine_profiles(load_manifest(export_dir), min_shape="1x9x64x64", opt_shape="256x256",
                               max_shape="1x3x512x512")
    assert profiles["stage1"] == {"image": {"min": [1, 3, 64, 64], "opt": [1, 3, 256, 256], "max": [1, 3, 512, 512]}}
    assert profiles["stage2"] == {"stage2_input": {"min": [1, 9, 64, 64], "opt": [1, 9, 256, 256],
                                                   "max": [1, 9, 512, 512]}}
    with pytest.raises(InputError, match="has 5 channels; this model's inputs take 3 or 9"):
        engine_profiles(load_manifest(export_dir), min_shape="1x5x64x64")


def test_the_default_profile_is_what_the_runtime_feeds_a_model_that_records_its_side(export_dir):
    import dataclasses

    from dereflect.export.engine import engine_profiles

    manifest = load_manifest(export_dir)
    bundled_like = dataclasses.replace(manifest, max_side=224)
    # remove scales a 720p frame to 126x224 and pads it to the profile's 128 minimum; nothing exceeds 224x224
    assert engine_profiles(bundled_like)["stage1"]["image"] == {"min": [1, 3, 128, 128], "opt": [1, 3, 128, 224],
                                                                 "max": [1, 3, 224, 224]}
    assert engine_profiles(bundled_like, min_shape="64x64")["stage2"]["stage2_input"]["opt"] == [1, 9, 126, 224]
    # one bound given by hand: the model's other one, made to hold it
    assert engine_profiles(bundled_like, max_shape="1080p")["stage1"]["image"]["opt"] == [1, 3, 128, 224]
    assert engine_profiles(bundled_like, max_shape="160x160")["stage1"]["image"]["opt"] == [1, 3, 160, 160]
    assert engine_profiles(bundled_like, opt_shape="720p")["stage1"]["image"]["max"] == [1, 3, 720, 1280]
    assert engine_profiles(bundled_like, opt_shape="200x200")["stage1"]["image"]["max"] == [1, 3, 224, 224]
    # a model without a side: the frame-size defaults
    assert engine_profiles(dataclasses.replace(manifest, max_side=None))["stage1"]["image"]["max"] == [1, 3, 1080,
                                                                                                    1920]


def test_one_install_line_for_tensorrt_at_build_and_run_time(monkeypatch):
    """Building engines and opening them on the runtime name the same install line (Jetson's included),
    and every registered backend, under any of its names, has one."""
    from dereflect.backends.base import ALIASES, BACKENDS, require_backend_module
    from dereflect.export.engine import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as built:
        require_tensorrt()
    with pytest.raises(MissingDependencyError) as opened:
        require_backend_module("tensorrt", "trt")
    line = install_line("trt")
    assert "pip install 'dereflect[trt]'" in line and "JetPack" in line
    assert line in str(built.value) and line in str(opened.value)
    for backend in list(BACKENDS) + list(ALIASES):
        with pytest.raises(MissingDependencyError, match="Install it with: pip install"):
            require_backend_module("tensorrt", backend)
    with pytest.raises(InputError, match="unknown backend"):
        require_backend_module("tensorrt", "tflite")


def test_engines_precision():
    assert trt_api.engines_precision([_info(precision="fp32"), _info(precision="fp16")]) == "fp16"
    assert trt_api.engines_precision([_info(precision="fp32")] * 2) == "fp32"


def test_a_replayed_cuda_graph_returns_what_rm2s_returns():
    """The device executor's replay of a captured frame (no TensorRT here: its buffers, stream and graph are
    stand-ins) copies the frame in, launches the graph and gives RM2S's own result of stage 2's output."""
    from dereflect.backends.tensorrt import _DeviceState
    from dereflect.methods.base import MonotonicTimer, get_method

    class Graph:
        launches = 0

        def launch(self, stream) -> None:
            Graph.launches += 1

    image = np.random.default_rng(3).random((4, 6, 3), dtype=np.float32)
    stage2_output = (2.0 * image - 0.5).transpose(2, 0, 1)[None].astype(np.float16)  # partly outside [0, 1]
    state = _DeviceState(None, None, _DeviceStream())
    state.shape, state.graph = (1, 4, 6), Graph()
    state.buffers = {"image": types.SimpleNamespace(array=np.zeros((1, 3, 4, 6), np.float32)),
                     "out": types.SimpleNamespace(array=stage2_output)}
    executor = _executor_standing_in(state)  # the engines and the kernel are not needed to replay
    method = get_method("rm2s")
    timer = MonotonicTimer()
    layers = executor.run(method, image, method.settings(), timer)
    assert Graph.launches == 1 and list(timer.read()) == ["graph", "total"]
    np.testing.assert_array_equal(state.buffers["image"].array[0].transpose(1, 2, 0), image)
    expected = method.layers(image, stage2_output[0].transpose(1, 2, 0).astype(np.float32))
    np.testing.assert_array_equal(layers.background, expected.background)
    np.testing.assert_array_equal(layers.reflection, expected.reflection)
    assert layers.background.min() == 0.0 and layers.background.max() == 1.0


class _StandInRunner:
    """What the device executor uses of a TensorRTRunner to replay, time and compile: its CUDA context."""

    def __init__(self) -> None:
        self.depth = 0

    @contextlib.contextmanager
    def pushed(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


class _DeviceStream:
    """A stream whose queued work finishes at ``done_ms`` on the device's clock (the host's never moves here)."""

    def __init__(self) -> None:
        self.done_ms = 0.0

    def synchronize(self) -> None:
        pass


def _executor_standing_in(state=None):
    """A TensorRTDeviceExecutor without engines or kernels, on stand-ins for its runner and stream."""
    import threading

    from dereflect.backends.tensorrt import TensorRTDeviceExecutor, _DeviceState

    executor = object.__new__(TensorRTDeviceExecutor)
    executor.stage1, executor._local = _StandInRunner(), threading.local()
    executor.use_graph, executor.graph_capture_error = True, None
    executor._local.state = state or _DeviceState(None, None, _DeviceStream())
    return executor


def test_the_device_executor_times_its_stages_with_cuda_events_on_its_stream():
    """Its primitives only enqueue: the host clock would give enqueue times and put the GPU's work into download.
    pycuda's events (record(stream), time_since, synchronize) are stood in for on a stream with its own clock."""
    from dereflect.backends.tensorrt import PycudaEventTimer

    executor = _executor_standing_in()
    stream = executor._local.state.stream
    runner = executor.stage1

    class Event:
        def record(self, on):
            assert on is stream and runner.depth > 0  # on the executor's stream, its CUDA context current
            self.at_ms = on.done_ms

        def synchronize(self):
            assert runner.depth > 0
            self.synchronized = True

        def time_since(self, earlier):
            return self.at_ms - earlier.at_ms

    executor._cuda = types.SimpleNamespace(Event=Event)
    timer = executor.timer()
    assert isinstance(timer, PycudaEventTimer) and runner.depth == 0
    for stage, device_ms in (("upload", 0.25), ("stage1", 4.0), ("middle", 0.5), ("stage2", 6.0), ("download", 0.25)):
        with timer.stage(stage):
            stream.done_ms += device_ms  # enqueued: done later on the device, no host time passes
    assert timer.read() == {"upload": 0.25, "stage1": 4.0, "middle": 0.5, "stage2": 6.0, "download": 0.25,
                            "total": 11.0}


def test_a_failed_graph_capture_warns_once_and_says_why():
    from dereflect.backends.tensorrt import _DeviceState

    class Stream(_DeviceStream):
        def begin_capture(self):
            raise RuntimeError("cuStreamBeginCapture failed: operation not supported\n(details)")

    class Method:
        runs = 0

        def run(self, executor, image, settings, timer=None, intermediates=False):
            Method.runs += 1
            return "layers"

    state = _DeviceState(None, None, Stream())
    state.shape = (1, 4, 6)
    executor = _executor_standing_in(state)
    image = np.zeros((4, 6, 3), np.float32)
    with pytest.warns(UserWarning) as warned:
        assert [executor.run(Method(), image, None) for _ in range(3)] == ["layers"] * 3
    assert len(warned) == 1 and Method.runs == 3  # one try, then every frame plainly
    assert executor.graph_capture_error == "RuntimeError: cuStreamBeginCapture failed: operation not supported"
    assert "capturing the TensorRT sequence as a CUDA graph failed (RuntimeError: cuStreamBeginCapture failed" \
        in str(warned[0].message)
    assert state.graph is None and executor.use_graph is False


def test_the_device_executor_reports_a_kernel_it_cannot_compile(monkeypatch, tmp_path):
    """Opening RM2S on TensorRT compiles the fused kernel with pycuda, which needs nvcc: without it, one line."""
    from dereflect.backends.tensorrt import TensorRTDeviceExecutor
    from dereflect.middle_step import cuda as kernel

    class Compiler:
        def SourceModule(self, source, no_extern_c=False, options=(), nvcc="nvcc"):
            raise OSError("error invoking 'nvcc --version': [Errno 2] No such file or directory")

    pycuda = types.ModuleType("pycuda")
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.compiler", Compiler())
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kernel, "TOOLKIT_NVCC", tmp_path / "missing")
    runner = _StandInRunner()
    runner.device_index, runner._cuda, runner.input_names = 0, None, ["image"]
    runner.dtype_of = lambda name: np.float32
    with pytest.raises(MissingDependencyError, match=r"neither on PATH nor at .*export PATH=/usr/local/cuda/bin"):
        TensorRTDeviceExecutor(runner, runner, settings=None)


def fake_engine_runtime(monkeypatch) -> list:
    """Engines that "run" with the FP32 ONNX file beside them, standing in for TensorRT's execution;
    the checks before it (sidecar, versions, GPU, hashes) are the runtime's own, for real.
    Returns the list of engine files opened."""
    import dereflect.backends.tensorrt as trt_backend
    from dereflect.backends.onnxruntime import OnnxRuntimeRunner

    opened = []

    def fake_runner(engine_path, device=0, name=None):
        opened.append(Path(engine_path).name)
        onnx_file = Path(engine_path).parent / Path(engine_path).name.replace(".engine", ".onnx")
        return OnnxRuntimeRunner(onnx_file, device="cpu", name=name)

    monkeypatch.setattr(trt_backend, "TensorRTRunner", fake_runner)
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = types.ModuleType("pycuda.driver")
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda.driver)
    return opened


def test_verify_tensorrt_refuses_mismatched_engines(export_dir, fake_trt, tmp_path, monkeypatch):
    from dereflect.export.engine import build_engines
    from dereflect.export.verify import verify

    fake_trt("10.3.0")
    build_engines(export_dir, timing_cache=tmp_path / "cache")
    opened = fake_engine_runtime(monkeypatch)
    report = verify(export_dir, backend="tensorrt")
    assert report.passed and report.precision == "fp16" and opened == ["stage1.engine", "stage2.engine"]
    assert "PASS" in report.format()

    fake_trt("10.4.0")
    with pytest.raises(ModelError, match="TensorRT 10.3.0 but TensorRT 10.4.0"):
        verify(export_dir, backend="tensorrt")

    fake_trt("10.3.0")
    sidecar = engine_paths(export_dir, "stage2")[1]
    original = sidecar.read_text()
    sidecar.write_text(original.replace('"8.7"', '"7.2"'))
    with pytest.raises(ModelError, match="compute capability 7.2"):
        verify(export_dir, backend="tensorrt")
    sidecar.write_text(original.replace(json.loads(original)["onnx_sha256"], "0" * 64))
    with pytest.raises(ModelError, match="another ONNX file"):
        verify(export_dir, backend="tensorrt")
    sidecar.write_text(original)
    engine_paths(export_dir, "stage2")[0].write_bytes(b"tampered")
    with pytest.raises(ModelError, match="does not match the SHA-256 in its sidecar"):
        verify(export_dir, backend="tensorrt")
    # An emptied hash does not let the changed engine through.
    sidecar.write_text(original.replace(json.loads(original)["engine_sha256"], ""))
    with pytest.raises(ModelError, match="engine_sha256"):
        verify(export_dir, backend="tensorrt")


# --- export engine: the folder the engines go to ---------------------------------------------------------

@pytest.fixture()
def bundled(export_dir, tmp_path, monkeypatch) -> Path:
    """The toy export installed as the bundled model "rm2s-lite" (in a stand-in package folder)."""
    import dereflect.models

    models = tmp_path / "package" / "models"
    shutil.copytree(export_dir, models / "rm2s-lite")
    monkeypatch.setattr(dereflect.models, "BUNDLED_MODELS_DIR", models)
    return models / "rm2s-lite"


def _without_goldens(directory: Path) -> Path:
    data = json.loads((directory / "manifest.json").read_text())
    del data["golden"]
    (directory / "manifest.json").write_text(json.dumps(data))
    shutil.rmtree(directory / "golden")
    return directory


def test_engine_copies_a_bundled_model_into_a_folder_of_its_own(bundled, fake_trt, tmp_path, monkeypatch, capsys):
    from dereflect.cli import main
    from dereflect.remover import Remover

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in bundled.rglob("*"))
    calls = fake_trt("10.3.0")
    assert main(["export", "engine", "rm2s-lite", "--timing-cache", str(tmp_path / "cache")]) == 0
    out = work / "rm2s-lite-engines"  # the default: ./<model>-engines
    assert f"dereflect export verify {out} --backend tensorrt" in capsys.readouterr().out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "golden", "golden/stage1.npz", "golden/stage2.npz", "manifest.json",
        "stage1.engine", "stage1.engine.json", "stage1.fp16.onnx", "stage1.onnx",
        "stage2.engine", "stage2.engine.json", "stage2.fp16.onnx", "stage2.onnx"]
    for name in ("stage1.onnx", "stage1.fp16.onnx", "golden/stage2.npz", "manifest.json"):
        assert (out / name).read_bytes() == (bundled / name).read_bytes()
    assert sorted(p.name for p in bundled.rglob("*")) == before  # nothing written into the package
    assert calls.count(("build",)) == 2
    assert [p.name for p in work.iterdir()] == ["rm2s-lite-engines"]  # no temporary folder left behind

    opened = fake_engine_runtime(monkeypatch)
    report = verify(out, backend="tensorrt")
    assert report.passed and report.reference == "the FP32 ONNX Runtime goldens", report.format()
    assert opened == ["stage1.engine", "stage2.engine"]
    with Remover.load(out, backend="tensorrt", device_middle_step=False) as remover:
        result = remover.remove(natural_images(1, 64, 96)[0].transpose(1, 2, 0))
    assert result.shape == (64, 96, 3) and opened[-2:] == ["stage1.engine", "stage2.engine"]

    # Again into the same folder: reused (the engines rebuilt), nothing else copied.
    engine_before = (out / "stage1.engine.json").read_text()
    calls = fake_trt("10.3.0")
    assert main(["export", "engine", "rm2s-lite", "-o", str(out), "--fp32",
                 "--timing-cache", str(tmp_path / "cache")]) == 0
    assert calls.count(("build",)) == 2 and (out / "stage1.engine.json").read_text() != engine_before
    assert read_engine_info(out / "stage1.engine.json").precision == "fp32"


@pytest.mark.parametrize("version, kept", [("8.5.2.2", ["stage1"]), ("10.3.0", [])])
def test_a_stop_signal_during_a_build_ends_the_command_cleanly_and_keeps_the_engines_built(
        bundled, fake_trt, tmp_path, capsys, version, kept):
    from dereflect.cli import main

    calls = fake_trt(version)

    def sigterm_once():
        # The command's own handler must be in place, or the signal would end the test run itself.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if calls.count(("build",)) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    sys.modules["tensorrt"].during_build.append(sigterm_once)
    out = tmp_path / "engines"
    assert main(["export", "engine", "rm2s-lite", "-o", str(out), "--timing-cache", str(tmp_path / "cache")]) == 143
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM with {len(kept)} engine(s) built" in err and "Traceback" not in err
    # 8.5 has no progress monitor: the build in progress finishes; 10 and later cancel it.
    assert calls.count(("build",)) == 1 and sorted(p.stem for p in out.glob("*.engine")) == kept
    assert ("steps", [False] * 5) in calls if not kept else ("monitor",) not in calls
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone again


def test_engine_writes_goldens_into_the_copy_of_a_model_without_them(bundled, fake_trt, tmp_path, monkeypatch):
    from dereflect.export.engine import build_engines, plan_engine_dir

    _without_goldens(bundled)
    manifest = plan_engine_dir("rm2s-lite", tmp_path / "engines").prepare()
    assert manifest.directory == tmp_path / "engines"
    assert set(manifest.records["golden"]) == {"stage1", "stage2"} and (manifest.directory / "golden").is_dir()
    assert not (bundled / "golden").exists() and "golden" not in json.loads((bundled / "manifest.json").read_text())
    fake_trt("11.0.0")
    build_engines(manifest.directory, timing_cache=tmp_path / "cache")
    fake_engine_runtime(monkeypatch)
    report = verify(manifest.directory, backend="tensorrt")
    assert report.passed and report.reference == "the FP32 ONNX Runtime goldens" and not report.notes


def test_engine_never_writes_into_the_package(bundled, fake_trt, tmp_path, monkeypatch):
    import dereflect
    from dereflect.export.engine import plan_engine_dir

    fake_trt("10.3.0")
    package = Path(dereflect.__file__).resolve().parent
    for target in (bundled, bundled.parent / "rm2s-lite-engines", package / "rm2s-lite-engines"):
        with pytest.raises(ModelError, match="inside the installed dereflect package"):
            plan_engine_dir("rm2s-lite", target).prepare()
        assert not target.with_name("rm2s-lite-engines").exists()
    monkeypatch.chdir(bundled.parent)  # the default ./rm2s-lite-engines would land in the package
    with pytest.raises(ModelError, match="inside the installed dereflect package"):
        plan_engine_dir("rm2s-lite").prepare()
    assert sorted(p.name for p in bundled.parent.iterdir()) == ["rm2s-lite"]


def test_engine_refuses_a_folder_holding_something_else(bundled, export_dir, tmp_path):
    from dereflect.export.engine import plan_engine_dir

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ModelError, match="not an export of tiny"):
        plan_engine_dir("rm2s-lite", photos).prepare()
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]
    other = tmp_path / "other"
    shutil.copytree(export_dir, other)
    data = json.loads((other / "manifest.json").read_text())
    data["name"] = "another"
    data["networks"]["stage2"]["onnx"] = "stage1.onnx"  # another network: another hash
    data["networks"]["stage2"]["sha256"] = sha256_file(other / "stage1.onnx")
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="holds another export"):
        plan_engine_dir("rm2s-lite", other).prepare()
    (tmp_path / "empty").mkdir()
    assert plan_engine_dir("rm2s-lite", tmp_path / "empty").prepare().directory == tmp_path / "empty"
    assert plan_engine_dir(export_dir, export_dir).prepare().directory == export_dir  # in place


def test_export_engine_checks_what_needs_no_tensorrt_first_and_copies_nothing_until_then(bundled, tmp_path,
                                                                                         monkeypatch, fake_trt):
    """The model, the shapes, the networks, the workspace and the folder are refused for what they are, on a machine
    without TensorRT; and on the device, before anything is copied."""
    from dereflect.export.engine import plan_engine_dir

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "engines"
    refused = [
        (dict(model="nosuch"), ModelError, "model not found"),
        (dict(min_shape="0x0"), InputError, "--min shape .* has a dimension below 1"),
        (dict(min_shape="4x3x128x128", opt_shape="4x3x720x1280", max_shape="4x3x1080x1920"), InputError, "batch 4"),
        (dict(max_shape="100000x100000"), InputError, "TensorRT takes tensors below 2\\*\\*31 elements"),
        (dict(networks=["stage3"]), InputError, "unknown network"),
        (dict(workspace=-1 << 20), InputError, "workspace must be 0"),
    ]
    for options, error, message in refused:
        options = {"model": "rm2s-lite", **options}
        with pytest.raises(error, match=message):
            plan_engine_dir(options.pop("model"), out, **options)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ModelError, match="not an export of tiny"):
        plan_engine_dir("rm2s-lite", tmp_path / "photos")
    plan = plan_engine_dir("rm2s-lite", out, networks=["stage1"], max_shape="720p", workspace=1 << 20)
    assert plan.directory == out and not out.exists()  # checked, nothing written yet
    fake_trt("10.3.0")
    manifest = plan.prepare()
    assert manifest.directory == out and (out / "manifest.json").is_file()
    assert plan_engine_dir("rm2s-lite", out).prepare().directory == out  # the copy is reused


@pytest.mark.parametrize("argv, message", [
    (["nosuch"], "model not found"),
    (["rm2s-lite", "--min", "0x0"], "--min shape [1, 3, 0, 0] has a dimension below 1"),
    (["rm2s-lite", "--min", "4x3x128x128", "--opt", "4x3x720x1280", "--max", "4x3x1080x1920"], "has batch 4"),
    (["rm2s-lite", "--max", "100000x100000"], "TensorRT takes tensors below 2**31 elements"),
    (["rm2s-lite", "--network", "stage3"], "unknown network(s) ['stage3']"),
    (["rm2s-lite", "--workspace", "-1"], "got -1048576 bytes (-1 MiB)"),
])
@pytest.mark.parametrize("tensorrt", [False, True])
def test_export_engine_names_the_real_problem_and_leaves_no_folder(bundled, fake_trt, tmp_path, monkeypatch, capsys,
                                                                    argv, message, tensorrt):
    """Without TensorRT, a bad model or option is named rather than the missing TensorRT; with it, it is refused
    before the export is copied."""
    from dereflect.cli import main

    if tensorrt:
        calls = fake_trt("10.3.0")
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "engines"
    assert main(["export", "engine", *argv, "-o", str(out), "--timing-cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dereflect: error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists() and (not tensorrt or calls == [])


def test_timing_cache_lives_in_dereflect_cache(monkeypatch, tmp_path):
    from dereflect.export.engine import default_timing_cache

    monkeypatch.setenv("DEREFLECT_CACHE", str(tmp_path / "cache"))
    assert default_timing_cache("10.3.0.26", "Orin (nvgpu)") == tmp_path / "cache" / "timing-10.3.0.26-Orin-nvgpu.cache"
    monkeypatch.delenv("DEREFLECT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_timing_cache("10.3.0", "Orin").parent == tmp_path / "home" / ".cache" / "dereflect"


# --- export verify: goldens, missing goldens, the user's images -------------------------------------------

def test_verify_a_bundled_model_without_goldens_says_what_is_missing(bundled, capsys):
    from dereflect.cli import main

    with_goldens = verify("rm2s-lite", fp16=True)
    assert with_goldens.reference == "the FP32 ONNX Runtime goldens" and not with_goldens.notes
    _without_goldens(bundled)
    report = verify("rm2s-lite", fp16=True)
    assert report.passed and report.reference.startswith("ONNX Runtime FP32 run here")
    assert [r.case for r in report.rows if r.network == "stage1"] == ["generated 0", "generated 1"]
    # The same cases as the goldens: the same inputs, the same figures.
    assert [r.psnr_db for r in report.rows] == pytest.approx([r.psnr_db for r in with_goldens.rows])
    assert main(["export", "verify", "rm2s-lite", "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "the bundled rm2s-lite" in out and "ships without golden files (nothing is wrong" in out
    assert "dereflect export engine rm2s-lite -o DIR" in out


def test_verify_an_export_without_goldens(export_dir):
    report = verify(_without_goldens(export_dir))
    assert report.passed
    assert any("lists no golden files (exported with --no-golden)" in n for n in report.notes)
    assert any("compared with itself checks that the files load and run" in n for n in report.notes)


@pytest.fixture()
def photos(tmp_path) -> Path:
    from conftest import write_photo_folder

    return write_photo_folder(tmp_path / "photos", 2, height=72, width=100)


def test_verify_on_the_users_images_per_output_figures(export_dir, photos):
    import onnxruntime as ort
    from dereflect.imageio import read_image
    from dereflect.tools.metrics import psnr

    report = verify(export_dir, fp16=True, images=photos)
    names = sorted(p.name for p in photos.iterdir())
    assert [(r.network, r.case) for r in report.rows] == [(n, c) for n in ("stage1", "stage2") for c in names]
    assert report.reference == f"ONNX Runtime FP32 on the images in {photos}"
    # stage 1's figure, computed on its own: the FP16 file against the FP32 file on the photo.
    image = np.ascontiguousarray(read_image(photos / names[0])[0].transpose(2, 0, 1)[None])
    fp32 = ort.InferenceSession(str(export_dir / "stage1.onnx")).run(None, {"image": image})[0]
    fp16 = ort.InferenceSession(str(export_dir / "stage1.fp16.onnx")).run(
        None, {"image": image.astype(np.float16)})[0].astype(np.float32)
    assert report.rows[0].psnr_db == pytest.approx(psnr(fp32, fp16), abs=1e-6)
    assert 40 < report.rows[0].psnr_db < 120
    assert report.min_psnr_db == 45 and report.limit_source == "the default for onnxruntime fp16"
    text = report.format()
    assert "pass limit: PSNR >= 45 dB; the default for onnxruntime fp16" in text
    worst = min(r.psnr_db for r in report.rows if r.network == "stage2")
    assert f"worst stage2/background: {worst:.2f} dB" in text


def test_verify_pass_limit_from_the_command_line(export_dir, photos, capsys):
    from dereflect.cli import main

    worst = min(r.psnr_db for r in verify(export_dir, fp16=True, images=photos).rows)
    argv = ["export", "verify", str(export_dir), "--fp16", "--images", str(photos), "--min-psnr"]
    assert main(argv + [f"{worst - 1:.2f}"]) == 0
    out = capsys.readouterr().out
    assert f"PSNR >= {worst - 1:.2f} dB; given with --min-psnr" in out and "result: PASS" in out
    assert main(argv + [f"{worst + 1:.2f}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and f"PSNR >= {worst + 1:.2f} dB; given with --min-psnr" in out
    with pytest.raises(InputError, match="not a folder"):
        verify(export_dir, images=photos.parent / "missing")
    (photos.parent / "empty").mkdir()
    assert main(argv[:-1] + ["--images", str(photos.parent / "empty")]) == 2
    assert "no images in it" in capsys.readouterr().err


def test_verify_with_nothing_compared_exits_2(export_dir, fake_trt, tmp_path, monkeypatch, capsys):
    from dereflect.cli import main
    from dereflect.export.engine import build_engines

    fake_trt("10.3.0")
    build_engines(export_dir, min_shape="256x256", opt_shape="256x256", max_shape="512x512",
                  timing_cache=tmp_path / "cache")
    fake_engine_runtime(monkeypatch)
    assert main(["export", "verify", str(export_dir), "--backend", "tensorrt"]) == 2
    out = capsys.readouterr().out
    assert "skipped: input shape outside the engine's profile" in out and "result: nothing compared" in out


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed")
def test_real_tensorrt_build_and_verify(export_dir, tmp_path):
    from dereflect.export.engine import build_engines
    from dereflect.export.verify import verify

    infos = build_engines(export_dir, fp16=True, min_shape="1x3x64x64", opt_shape="256x256",
                          max_shape="512x512", timing_cache=tmp_path / "timing.cache")
    assert set(infos) == {"stage1", "stage2"} and (tmp_path / "timing.cache").is_file()
    report = verify(export_dir, backend="tensorrt")
    assert report.passed, report.format()

"""Tiny hand-built ONNX exports (no torch) for the runtime, evaluation and benchmark tests.

The toy RM2S squares the image in stage 1 and mixes the 9-channel input in stage 2; the toy
CRRN returns 0.7 I as the background, 0.3 I as the reflection and the channel mean as gradient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from dereflect.manifest import Manifest, NetworkSpec, TensorSpec, sha256_file
from onnx import TensorProto, helper, numpy_helper


def _value(name, channels):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, "H", "W"])


def _save(nodes, name, inputs, outputs, path, initializers=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _spec(directory, name, inputs, outputs):
    return NetworkSpec(name, f"{name}.onnx", sha256_file(directory / f"{name}.onnx"),
                       [TensorSpec(n, c) for n, c in inputs], [TensorSpec(n, c) for n, c in outputs])


def make_rm2s_export(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _save([helper.make_node("Mul", ["image", "image"], ["background"])], "stage1",
          [_value("image", 3)], [_value("background", 3)], directory / "stage1.onnx")
    weight = np.zeros((3, 9, 1, 1), np.float32)
    for c in range(3):
        weight[c, c], weight[c, 3 + c], weight[c, 6 + c] = 0.5, 0.25, 0.25
    _save([helper.make_node("Conv", ["stage2_input", "w"], ["background"])], "stage2",
          [_value("stage2_input", 9)], [_value("background", 3)], directory / "stage2.onnx",
          [numpy_helper.from_array(weight, "w")])
    networks = {
        "stage1": _spec(directory, "stage1", [("image", 3)], [("background", 3)]),
        "stage2": _spec(directory, "stage2", [("stage2_input", 9)], [("background", 3)]),
    }
    Manifest(method="rm2s", name="toy-rm2s", networks=networks, directory=directory).save()
    return directory


def make_crrn_export(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("Mul", ["image", "k_b"], ["background"]),
        helper.make_node("Mul", ["image", "k_r"], ["reflection"]),
        helper.make_node("ReduceMean", ["image"], ["gradient"], axes=[1], keepdims=1),
    ]
    inits = [numpy_helper.from_array(np.array(0.7, np.float32), "k_b"),
             numpy_helper.from_array(np.array(0.3, np.float32), "k_r")]
    _save(nodes, "crrn", [_value("image", 3)],
          [_value("background", 3), _value("reflection", 3), _value("gradient", 1)],
          directory / "crrn.onnx", inits)
    networks = {"crrn": _spec(directory, "crrn", [("image", 3)],
                              [("background", 3), ("reflection", 3), ("gradient", 1)])}
    Manifest(method="crrn", name="toy-crrn", networks=networks, directory=directory).save()
    return directory

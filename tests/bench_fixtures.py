"""Tiny hand-built ONNX graphs with FLOP counts worked out by hand, and a toy RM2S export directory.

Kept apart from the tests so the counts are in one place:

* :func:`conv_model`: Conv 3->4 (3x3, pad 1, bias) -> Relu -> ConvTranspose 4->2 (4x4, stride 2,
  pad 1, no bias); at H x W the Conv does ``4*H*W * 3*3*3`` MACs plus ``4*H*W`` bias adds, the
  Relu ``4*H*W`` operations and the ConvTranspose ``4*H*W * 2*4*4`` MACs (see conv_model_flops);
* :func:`padded_model`: the export's pad-to-stride pattern (Shape -> Gather -> Add/Div/Mul ->
  Sub -> Concat -> Pad, then Slice back) around a 1x1 Conv 3->2, so a size that is not a
  multiple of the stride is counted at the padded size;
* :func:`make_bench_export`: an RM2S export directory whose stage 1 is a 1x1 Conv + Sigmoid and
  stage 2 a 1x1 Conv 9->3, optionally with a manifest ``max_side`` (the side its networks run at).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from dereflect.manifest import Manifest, NetworkSpec, TensorSpec, sha256_file
from onnx import TensorProto, helper, numpy_helper

STRIDE = 8


def _value(name: str, channels: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, "H", "W"])


def _model(nodes, name, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weight(name: str, shape, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.normal(0.0, 0.1, shape).astype(np.float32), name)


def _int64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def conv_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "w2"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                         kernel_shape=[4, 4]),
    ]
    inits = [_weight("w1", (4, 3, 3, 3)), _weight("b1", (4,), 1), _weight("w2", (4, 2, 4, 4), 2)]
    return _model(nodes, "conv", [_value("x", 3)], [_value("y", 2)], inits)


def conv_model_flops(height: int, width: int) -> int:
    pixels = height * width
    conv = 2 * (4 * pixels) * (3 * 3 * 3) + 4 * pixels
    relu = 4 * pixels
    transpose = 2 * (4 * pixels) * (2 * 4 * 4)
    return conv + relu + transpose


CONV_MODEL_WEIGHTS = 4 * 3 * 3 * 3 + 4 + 4 * 2 * 4 * 4


def padded_model() -> onnx.ModelProto:
    """1x1 Conv 3->2 at the input padded (bottom/right) to a multiple of STRIDE, cropped back."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "hw_index"], ["hw"], axis=0),
        helper.make_node("Add", ["hw", "stride_minus_one"], ["hw_up"]),
        helper.make_node("Div", ["hw_up", "stride"], ["blocks"]),
        helper.make_node("Mul", ["blocks", "stride"], ["hw_padded"]),
        helper.make_node("Sub", ["hw_padded", "hw"], ["hw_extra"]),
        helper.make_node("Concat", ["zeros6", "hw_extra"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["x_padded"], mode="edge"),
        helper.make_node("Conv", ["x_padded", "w"], ["conv"], kernel_shape=[1, 1]),
        helper.make_node("Slice", ["conv", "starts", "hw", "axes"], ["y"]),
    ]
    inits = [
        _int64("hw_index", [2, 3]), _int64("stride_minus_one", [STRIDE - 1]), _int64("stride", [STRIDE]),
        _int64("zeros6", [0] * 6), _int64("starts", [0, 0]), _int64("axes", [2, 3]),
        _weight("w", (2, 3, 1, 1)),
    ]
    return _model(nodes, "padded", [_value("x", 3)], [_value("y", 2)], inits)


def padded_model_flops(height: int, width: int) -> int:
    padded = (-(-height // STRIDE) * STRIDE) * (-(-width // STRIDE) * STRIDE)
    return 2 * (2 * padded) * 3


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def _spec(directory: Path, name: str, inputs, outputs) -> NetworkSpec:
    return NetworkSpec(name, f"{name}.onnx", sha256_file(directory / f"{name}.onnx"),
                       [TensorSpec(n, c) for n, c in inputs], [TensorSpec(n, c) for n, c in outputs])


#: FLOPs per pixel of the toy export: stage 1 = 1x1 Conv 3->3 with bias + Sigmoid, stage 2 = 1x1 Conv 9->3.
TOY_STAGE1_FLOPS_PER_PIXEL = 2 * 3 * 3 + 3 + 3
TOY_STAGE2_FLOPS_PER_PIXEL = 2 * 3 * 9


def make_bench_export(directory: Path, max_side: Optional[int] = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stage1 = _model(
        [helper.make_node("Conv", ["image", "w", "b"], ["z"], kernel_shape=[1, 1]),
         helper.make_node("Sigmoid", ["z"], ["background"])],
        "stage1", [_value("image", 3)], [_value("background", 3)],
        [_weight("w", (3, 3, 1, 1)), _weight("b", (3,), 1)],
    )
    weight = np.zeros((3, 9, 1, 1), np.float32)
    for c in range(3):
        weight[c, c], weight[c, 3 + c], weight[c, 6 + c] = 0.5, 0.25, 0.25
    stage2 = _model([helper.make_node("Conv", ["stage2_input", "w"], ["background"], kernel_shape=[1, 1])],
                    "stage2", [_value("stage2_input", 9)], [_value("background", 3)],
                    [numpy_helper.from_array(weight, "w")])
    _save(stage1, directory / "stage1.onnx")
    _save(stage2, directory / "stage2.onnx")
    networks = {
        "stage1": _spec(directory, "stage1", [("image", 3)], [("background", 3)]),
        "stage2": _spec(directory, "stage2", [("stage2_input", 9)], [("background", 3)]),
    }
    Manifest(method="rm2s", name="toy-bench", networks=networks, directory=directory, max_side=max_side).save()
    return directory

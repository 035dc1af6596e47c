"""FP32 ONNX -> FP16 ONNX that keeps float32 where float16 would overflow or lose precision.

TensorRT 11 builds strongly typed networks, so the precision of every layer comes from the
ONNX types; this module writes those types. It is a graph rewrite done with the ``onnx``
package only (no onnxconverter-common):

* The graph's inputs and outputs stay **float32**: the first float16 consumer of an input
  casts it, and an output produced in float16 gets a final Cast. The runtime therefore feeds
  and reads the same dtypes for FP32 and FP16 files, and the manifest's I/O ``dtype`` stays
  ``float32`` (the file's compute precision is recorded separately).
* Only the *data path* is converted: tensors that depend on a graph input through values,
  not through ``Shape``/``Size``. Shape arithmetic (padding amounts, crop sizes) is left as
  exported, so sizes above 2048 stay exact.
* Float32 is kept for: normalisation and reduction ops and ops whose result can overflow
  or underflow (:data:`FP32_OPS`); the last layers before each output (from the last
  Conv/ConvTranspose to the output: the head conv, sigmoid/clip and crop) when
  ``keep_output_layers``; nodes whose weights exceed float16's range; and, given
  calibration inputs, nodes whose inputs or outputs on them exceed ``overflow_limit`` in magnitude
  (float16's maximum is 65504; the default limit leaves a factor of 16 of headroom).
* Casts are inserted wherever a float16 tensor meets a float32 node or the reverse; weights
  of float16 nodes are stored as float16 initializers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import onnx
from dereflect.errors import ModelError
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
FP16_MAX = 65504.0
DEFAULT_OVERFLOW_LIMIT = 4096.0

#: Ops computed in float32: statistics over many values, exp/log/pow/div/sqrt (overflow and
#: underflow), and ops whose output type is not tied to their float inputs.
FP32_OPS = frozenset({
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "MeanVarianceNormalization", "LpNormalization", "LRN", "RMSNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "CumSum", "Softmax", "LogSoftmax", "Einsum",
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Div", "Erf",
    "Range", "ConstantOfShape", "EyeLike", "CastLike", "RandomNormalLike", "RandomUniformLike",
    "If", "Loop", "Scan",
})
#: Ops that take any input type and fix their output type themselves: never rewritten.
PASS_THROUGH_OPS = frozenset({"Shape", "Size", "Cast"})
#: Float inputs that must stay float32 whatever the data type (Resize's roi and scales).
FLOAT32_ONLY_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
#: Layers that end the "output layers" walk back from a graph output.
LAST_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass
class Fp16Plan:
    """What the conversion did: nodes kept in float32 (with the reason) and counts."""

    kept_fp32: Dict[str, str] = field(default_factory=dict)
    converted: int = 0
    casts_added: int = 0
    activation_max: Dict[str, float] = field(default_factory=dict)

    def summary(self) -> Dict[str, object]:
        reasons: Dict[str, int] = {}
        for reason in self.kept_fp32.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {
            "io_dtype": "float32",
            "nodes_float16": self.converted,
            "nodes_float32": len(self.kept_fp32),
            "float32_reasons": reasons,
            "casts_added": self.casts_added,
        }


def _tensor_types(model: onnx.ModelProto) -> Dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types: Dict[str, int] = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def data_path_tensors(graph: onnx.GraphProto) -> Set[str]:
    """Tensors whose values depend on a graph input (through anything but Shape/Size)."""
    initializers = {init.name for init in graph.initializer}
    found = {inp.name for inp in graph.input if inp.name not in initializers}
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in found for name in node.input):
            found.update(node.output)
    return found


def output_layer_nodes(graph: onnx.GraphProto) -> Set[int]:
    """Indices of the nodes from the last Conv-like layer on each path to a graph output."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    data = data_path_tensors(graph)
    keep: Set[int] = set()
    stack = [producer[o.name] for o in graph.output if o.name in producer]
    while stack:
        index = stack.pop()
        if index in keep:
            continue
        keep.add(index)
        node = graph.node[index]
        if node.op_type in LAST_LAYER_OPS:
            continue
        stack.extend(producer[name] for name in node.input if name in data and name in producer)
    return keep


def activation_ranges(model: onnx.ModelProto, feeds: Sequence[Dict[str, np.ndarray]]) -> Dict[str, float]:
    """Largest |value| of every float data-path tensor of ``model`` over the calibration ``feeds``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = _tensor_types(probe)
    data = data_path_tensors(probe.graph)
    existing = {o.name for o in probe.graph.output}
    names = [n for node in probe.graph.node for n in node.output
             if n in data and types.get(n) == FLOAT and n not in existing]
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
    runner = _runner(probe)
    ranges: Dict[str, float] = {}
    for feed in feeds:
        for name, value in runner.infer(feed).items():
            magnitude = float(np.max(np.abs(value))) if value.size else 0.0
            if not np.isfinite(magnitude):
                magnitude = float("inf")
            ranges[name] = max(ranges.get(name, 0.0), magnitude)
    return ranges


class _Rewriter:
    """Builds the new node list, inserting casts and float16 weights on demand."""

    def __init__(self, graph: onnx.GraphProto, types: Dict[str, int]):
        self.types = dict(types)
        # Constant nodes' values count as weights: a float16 consumer gets a float16 copy, not a Cast.
        self.constants: Dict[str, onnx.TensorProto] = {init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
        self.nodes: List[onnx.NodeProto] = []
        self.cast_cache: Dict[Tuple[str, int], str] = {}
        self.new_initializers: List[onnx.TensorProto] = []
        self.casts_added = 0

    def as_type(self, name: str, dtype: int) -> str:
        key = (name, dtype)
        if key in self.cast_cache:
            return self.cast_cache[key]
        suffix = "fp16" if dtype == FLOAT16 else "fp32"
        new_name = f"{name}__{suffix}"
        if name in self.constants:
            array = numpy_helper.to_array(self.constants[name]).astype(np.float16 if dtype == FLOAT16 else np.float32)
            self.new_initializers.append(numpy_helper.from_array(array, new_name))
        else:
            self.nodes.append(helper.make_node("Cast", [name], [new_name], to=dtype, name=f"{new_name}_cast"))
            self.casts_added += 1
        self.types[new_name] = dtype
        self.cast_cache[key] = new_name
        return new_name

    def add(self, node: onnx.NodeProto, dtype: Optional[int]) -> None:
        """Append a copy of ``node`` computing in ``dtype`` (FLOAT16, FLOAT, or None: untouched)."""
        node = _copy(node)
        if dtype is not None:
            other = FLOAT if dtype == FLOAT16 else FLOAT16
            fixed = FLOAT32_ONLY_INPUTS.get(node.op_type, ())
            for index, name in enumerate(node.input):
                if name and index not in fixed and self.types.get(name) == other:
                    node.input[index] = self.as_type(name, dtype)
            for name in node.output:
                if self.types.get(name) in (FLOAT, FLOAT16):
                    self.types[name] = dtype
        self.nodes.append(node)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _weights_exceed_fp16(node: onnx.NodeProto, initializers: Dict[str, onnx.TensorProto]) -> bool:
    for name in node.input:
        init = initializers.get(name)
        if init is not None and init.data_type == FLOAT:
            array = numpy_helper.to_array(init)
            if array.size and float(np.max(np.abs(array))) > FP16_MAX:
                return True
    return False


def _float_io(node: onnx.NodeProto, types: Dict[str, int]) -> bool:
    return any(types.get(name) == FLOAT for name in list(node.input) + list(node.output) if name)


def convert_to_fp16(
    model: onnx.ModelProto,
    calibration: Optional[Sequence[Dict[str, np.ndarray]]] = None,
    keep_output_layers: bool = True,
    overflow_limit: float = DEFAULT_OVERFLOW_LIMIT,
    keep_ops: Iterable[str] = FP32_OPS,
) -> Tuple[onnx.ModelProto, Fp16Plan]:
    """Return the float16 version of a float32 ONNX ``model`` and the plan that was applied.

    ``calibration``: input feeds (name -> array) run through the FP32 model with ONNX Runtime
    to find activations that would overflow float16. The result passes ``onnx.checker`` and
    strict shape inference, so every Cast and type is consistent.
    """
    source = onnx.ModelProto()
    source.CopyFrom(model)
    graph = source.graph
    types = _tensor_types(source)
    data = data_path_tensors(graph)
    tail = output_layer_nodes(graph) if keep_output_layers else set()
    keep_ops = frozenset(keep_ops)
    plan = Fp16Plan()
    if calibration:
        plan.activation_max = activation_ranges(source, calibration)
    initializers = {init.name: init for init in graph.initializer}
    rewriter = _Rewriter(graph, types)

    for index, node in enumerate(graph.node):
        label = node.name or f"{node.op_type}_{index}"
        on_data_path = any(name in data for name in node.input)
        if not on_data_path or node.op_type in PASS_THROUGH_OPS or not _float_io(node, types):
            rewriter.add(node, None)
            continue
        reason = ""
        if node.domain not in ("", "ai.onnx"):
            reason = "custom domain"
        elif node.op_type in keep_ops:
            reason = "float32 op"
        elif index in tail:
            reason = "output layers"
        elif _weights_exceed_fp16(node, initializers):
            reason = "weights beyond float16 range"
        elif any(plan.activation_max.get(name, 0.0) > overflow_limit for name in [*node.input, *node.output]):
            # Inputs count too: a float16 node would have to cast a large float32 input down.
            reason = "large activations"
        if reason:
            plan.kept_fp32[label] = reason
            rewriter.add(node, FLOAT)
        else:
            plan.converted += 1
            rewriter.add(node, FLOAT16)

    outputs_fp16 = [o.name for o in graph.output if rewriter.types.get(o.name) == FLOAT16]
    for name in outputs_fp16:
        inner = f"{name}__fp16"
        for node in rewriter.nodes:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        rewriter.nodes.append(helper.make_node("Cast", [inner], [name], to=FLOAT, name=f"{name}_cast_out"))
        rewriter.casts_added += 1
    plan.casts_added = rewriter.casts_added

    used = {name for node in rewriter.nodes for name in node.input}
    outputs = {o.name for o in graph.output}
    rewriter.nodes = [n for n in rewriter.nodes
                      if n.op_type != "Constant" or any(o in used or o in outputs for o in n.output)]
    kept_inits = [init for init in graph.initializer if init.name in used]
    kept_inits += [init for init in rewriter.new_initializers if init.name in used]
    del graph.node[:]
    graph.node.extend(rewriter.nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]
    try:
        onnx.checker.check_model(source)
        onnx.shape_inference.infer_shapes(source, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"FP16 conversion produced an invalid graph: {exc}") from exc
    return source, plan


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 model that rounds every float16 tensor of ``model`` to float16, for measuring on a CPU.

    ONNX Runtime's CPU provider has float16 kernels for few ops: it runs the others in float32
    and removes the casts between consecutive such nodes, so running the FP16 file there rounds
    little more than the weights. This copy computes every node in float32 but stores each
    float16 weight and each float16 node output rounded to float16 (explicit Cast pairs, which
    ONNX Runtime keeps): overflow to inf and the rounding of every intermediate tensor are
    reproduced; arithmetic inside a node (a convolution's sums) stays float32.
    """
    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    graph = emulated.graph
    types = _tensor_types(emulated)
    for init in graph.initializer:
        if init.data_type == FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes: List[onnx.NodeProto] = []
    for node in graph.node:
        node = _copy(node)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            value = node.attribute[0].t
            if value.data_type == FLOAT16:
                node.attribute[0].t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(value).astype(np.float32), value.name))
            nodes.append(node)
            continue
        if node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == FLOAT16:
            rounded = f"{node.output[0]}__rounded"
            nodes.append(helper.make_node("Cast", [node.input[0]], [rounded], to=FLOAT16))
            nodes.append(helper.make_node("Cast", [rounded], [node.output[0]], to=FLOAT))
            continue
        tails = []
        for index, name in enumerate(node.output):
            if types.get(name) == FLOAT16:
                exact = f"{name}__exact"
                node.output[index] = exact
                tails.append(helper.make_node("Cast", [exact], [f"{name}__rounded"], to=FLOAT16))
                tails.append(helper.make_node("Cast", [f"{name}__rounded"], [name], to=FLOAT))
        nodes.append(node)
        nodes.extend(tails)
    del graph.node[:]
    graph.node.extend(nodes)
    for info in list(graph.input) + list(graph.output):
        if info.type.tensor_type.elem_type == FLOAT16:
            info.type.tensor_type.elem_type = FLOAT
    del graph.value_info[:]
    return emulated


def _runner(model: Union[str, onnx.ModelProto]) -> Any:
    """An activated ONNX Runtime runner (CPU) for a file or an in-memory model."""
    from dereflect.backends.onnxruntime import OnnxRuntimeRunner

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return OnnxRuntimeRunner(source, device="cpu").activate()


def compare_models(
    reference: Union[str, onnx.ModelProto],
    test: Union[str, onnx.ModelProto],
    feeds: Sequence[Dict[str, np.ndarray]],
    data_ranges: Dict[str, float],
) -> Dict[str, Dict[str, float]]:
    """Run two ONNX models with ONNX Runtime (CPU) on ``feeds``; per output: worst PSNR and max abs error.

    Non-finite outputs count as -inf dB. To measure an FP16 file faithfully on a CPU, pass
    ``emulate_fp16(model)`` as ``test`` (see there).
    """
    from dereflect.tools.compare import Comparison, compare_outputs

    ref_runner, test_runner = _runner(reference), _runner(test)
    comparison = Comparison()
    for feed in feeds:
        comparison.add(compare_outputs(ref_runner.infer(feed), test_runner.infer(feed), data_ranges))
    return comparison.to_dict()

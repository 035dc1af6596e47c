"""FLOPs and minimum bytes of each network and of the middle step, and the floor they set on a device.

**Networks** are counted from the ONNX graph for one input size. The input's H and W are fixed,
the shape arithmetic the export adds for padding to the stride (``Shape``, ``Gather``, ``Div``,
``Mul``, ``Max``, ``Concat`` ... feeding ``Pad`` and the final ``Slice``) is folded to constants
for that size, and ``onnx.shape_inference`` then gives every tensor's shape. Counting:

* ``Conv``: ``2 * out_elements * (C_in / groups) * kernel_area`` (MACs x 2), plus one add per
  output element for a bias; ``ConvTranspose``: ``2 * in_elements * (C_out / groups) * kernel_area``
  (every input pixel is scattered through the whole kernel) plus the bias; ``Gemm`` and ``MatMul``:
  ``2 * M * N * K`` (plus ``M * N`` for Gemm's C);
* elementwise operations (activations, arithmetic, comparisons): one FLOP per output element;
  normalisations two (BatchNormalization) or five (Instance/Layer/Group) per element; pooling
  and reductions one per element read;
* data movement (``Pad``, ``Slice``, ``Concat``, ``Reshape``, ``Cast``, ...): no FLOPs. Any other
  operator is listed in ``uncounted`` and counted as zero, so the floor stays a lower bound.

**Minimum bytes** of a network = every weight read once + the graph's inputs read once + its
outputs written once: what an ideal implementation that keeps every activation on chip must
move. ``activation_bytes`` (each intermediate tensor once) is reported beside it: a
layer-by-layer implementation writes and reads each of those, so at high resolution it, not
the floor, decides the time. ``element_bytes`` counts every float tensor at that size (2 for an
FP16 engine); by default each tensor counts at its ONNX dtype.

**The middle step** is counted analytically (:func:`middle_step_cost`, breakdown in
``MIDDLE_STEP_FLOPS_PER_PIXEL``). The 2-means threshold is a statistic of the whole frame, so
no mask is known before every confidence value is: any implementation makes two passes. The
byte minimum is the cheaper of (a) pass 1 reads I and B1 and writes C, pass 2 reads C and I,
and (b) pass 2 reads I and B1 again and recomputes C; both end by writing the 9-channel
stage-2 input. The image I is float32 (the kernel's input), B1 and the output at their
engine precision.

**Floor** = ``max(FLOPs / rate, bytes / bandwidth)`` per network and for the middle step, the
FP16 tensor-core rate for networks and the FP32 CUDA-core rate for the middle step (which does
no matrix arithmetic). Host-device copies are not part of it. A measured time is reported as a
multiple of its floor; a multiple of 1 is unreachable in practice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from dereflect.errors import InputError, ModelError, require


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of one device: dense FP16 tensor FLOP/s, memory bandwidth, FP32 CUDA-core FLOP/s.

    ``memory_gb``: a Jetson module's memory, which tells modules of one board name apart (an AGX Orin
    32GB from a 64GB, an Orin NX 8GB from a 16GB); None for a discrete GPU.
    """

    key: str
    name: str
    fp16_tflops: float
    bandwidth_gbps: float
    fp32_tflops: Optional[float] = None
    source: str = ""
    memory_gb: Optional[float] = None

    @property
    def scalar_tflops(self) -> float:
        """Rate for non-matrix work; FP16's when unknown (a higher rate keeps the floor a lower bound)."""
        return self.fp32_tflops if self.fp32_tflops else self.fp16_tflops

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "name": self.name, "fp16_tflops": self.fp16_tflops,
                "bandwidth_gbps": self.bandwidth_gbps, "fp32_tflops": self.fp32_tflops, "source": self.source}


_FP32_NOTE = "FP32 = CUDA cores x boost clock x 2"
# Orin's GPU does 2048 dense FP16 tensor FLOP per SM and clock: the datasheets' figures for the AGX Orin
# 64GB (16 SMs at 1.3 GHz: 42) and the Orin Nano (8 SMs at 625 MHz: 10) both follow it, and so do the
# modules whose datasheets give only the whole module's sparse INT8 TOPS (GPU and DLAs together).
_ORIN_NOTE = "dense FP16 = SMs x max GPU clock x 2048 (the rate of the 64GB AGX Orin's and the Orin Nano's datasheets)"
DEVICE_TABLE: Dict[str, DeviceSpec] = {
    "h100": DeviceSpec("h100", "NVIDIA H100 SXM", 990.0, 3350.0, 67.0,
                       "NVIDIA datasheet (a bf16 GEMM measured about 790 TFLOP/s, a copy about 3.0 TB/s)"),
    "h200": DeviceSpec("h200", "NVIDIA H200 SXM", 989.0, 4800.0, 67.0,
                       "NVIDIA datasheet (same compute as H100 SXM, HBM3e)"),
    "agx-orin": DeviceSpec("agx-orin", "Jetson AGX Orin 64GB", 42.0, 204.8, 5.3,
                           f"Jetson datasheet (dense FP16 derived); {_FP32_NOTE} (2048 x 1.3 GHz)", 64),
    "agx-orin-32gb": DeviceSpec("agx-orin-32gb", "Jetson AGX Orin 32GB", 26.7, 204.8, 3.33,
                                f"{_ORIN_NOTE} (14 x 930 MHz); {_FP32_NOTE} (1792 x 930 MHz)", 32),
    "orin-nx-16gb": DeviceSpec("orin-nx-16gb", "Jetson Orin NX 16GB", 15.0, 102.4, 1.88,
                               f"{_ORIN_NOTE} (8 x 918 MHz); {_FP32_NOTE} (1024 x 918 MHz)", 16),
    "orin-nx-8gb": DeviceSpec("orin-nx-8gb", "Jetson Orin NX 8GB", 12.5, 102.4, 1.57,
                              f"{_ORIN_NOTE} (8 x 765 MHz); {_FP32_NOTE} (1024 x 765 MHz)", 8),
    "orin-nano": DeviceSpec("orin-nano", "Jetson Orin Nano 8GB", 10.0, 68.0, 1.28,
                            f"Jetson datasheet (dense FP16 derived); {_FP32_NOTE} (1024 x 625 MHz)", 8),
    "orin-nano-super": DeviceSpec("orin-nano-super", "Jetson Orin Nano 8GB Super", 16.7, 102.0, 2.09,
                                  f"Jetson datasheet (dense FP16 derived); {_FP32_NOTE} (1024 x 1020 MHz)", 8),
}
#: The table's keys, as help texts and errors list them.
DEVICE_NAMES = ", ".join(DEVICE_TABLE)
#: GPU-name fragments (lower case) -> table key, for picking the table entry of the running GPU.
GPU_NAME_KEYS = (("h200", "h200"), ("h100", "h100"), ("agx orin", "agx-orin"), ("orin nano", "orin-nano"))


def device_spec(text: str) -> DeviceSpec:
    """A table entry by key (``h100``, ``agx-orin``, ...) or ``custom:TFLOPS,GBPS[,FP32_TFLOPS]``."""
    text = str(text).strip().lower()
    if text in DEVICE_TABLE:
        return DEVICE_TABLE[text]
    if text.startswith("custom:"):
        parts = text[len("custom:"):].split(",")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) in (2, 3) and all(n > 0 for n in numbers):
            return DeviceSpec("custom", "custom device", numbers[0], numbers[1],
                              numbers[2] if len(numbers) == 3 else None, "given on the command line")
    raise InputError(
        f"unknown device table {text!r}: use one of {DEVICE_NAMES} or "
        "custom:TFLOPS,GBPS[,FP32_TFLOPS] (dense FP16 TFLOP/s, memory GB/s, optional FP32 TFLOP/s), "
        "e.g. custom:42,204.8"
    )


def device_for_gpu(name: str) -> Optional[DeviceSpec]:
    """The table entry whose name matches a GPU name such as 'NVIDIA H100 80GB HBM3', or None."""
    lowered = str(name).lower()
    for fragment, key in GPU_NAME_KEYS:
        if fragment in lowered:
            return DEVICE_TABLE[key]
    return None


#: Jetson board names (the device tree's model string, lower case) -> the table entries the board may be.
#: Every Orin module's GPU calls itself "Orin": only the board name tells an AGX from an NX or a Nano, the
#: module's memory a 32GB AGX from a 64GB, and nothing tells a Nano from the same Nano in its Super mode.
JETSON_MODEL_KEYS = (("agx orin", ("agx-orin", "agx-orin-32gb")), ("orin nx", ("orin-nx-16gb", "orin-nx-8gb")),
                     ("orin nano", ("orin-nano", "orin-nano-super")))


def table_keys_for(gpu_name: str, board: Optional[str] = None, memory_gib: Optional[float] = None) -> Set[str]:
    """The table entries the device in use may be: from its GPU name and, on a Jetson, its board name and
    memory (``memory_gib``: the memory the system reports, a little below the module's, as /proc/meminfo's
    MemTotal is; None: unknown, every module of the board)."""
    keys = set()
    spec = device_for_gpu(gpu_name)
    if spec is not None:
        keys.add(spec.key)
    lowered = str(board or "").lower()
    for fragment, names in JETSON_MODEL_KEYS:
        if fragment in lowered:
            keys.update(name for name in names if _module_memory_fits(DEVICE_TABLE[name], memory_gib))
    return keys


def _module_memory_fits(spec: DeviceSpec, memory_gib: Optional[float]) -> bool:
    # The system reserves some of a module's memory (carve-outs, the kernel): an 8GB Orin reports
    # about 7.4 GiB, a 64GB one about 61 GiB. Within 20 % below the module's size is that module.
    if memory_gib is None or spec.memory_gb is None:
        return True
    return 0.8 * spec.memory_gb <= memory_gib <= spec.memory_gb


@dataclass
class Cost:
    """FLOPs and bytes of one network or step at one size; ``kind`` picks the rate ("tensor" or "scalar")."""

    name: str
    flops: float
    min_bytes: float
    kind: str = "tensor"
    activation_bytes: float = 0.0
    flops_by_op: Dict[str, float] = field(default_factory=dict)
    uncounted: List[str] = field(default_factory=list)

    def floor_ms(self, device: DeviceSpec) -> float:
        rate = device.fp16_tflops if self.kind == "tensor" else device.scalar_tflops
        return max(self.flops / (rate * 1e12), self.min_bytes / (device.bandwidth_gbps * 1e9)) * 1e3

    def bound(self, device: DeviceSpec) -> str:
        rate = device.fp16_tflops if self.kind == "tensor" else device.scalar_tflops
        compute = self.flops / (rate * 1e12)
        return "compute" if compute >= self.min_bytes / (device.bandwidth_gbps * 1e9) else "memory"

    def to_dict(self, device: Optional[DeviceSpec] = None) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "name": self.name, "gflop": self.flops / 1e9, "min_mbytes": self.min_bytes / 1e6,
            "activation_mbytes": self.activation_bytes / 1e6, "rate": self.kind,
            "gflop_by_op": {op: value / 1e9 for op, value in sorted(self.flops_by_op.items())},
            "uncounted": list(self.uncounted),
        }
        if device is not None:
            data["floor_ms"] = self.floor_ms(device)
            data["bound"] = self.bound(device)
        return data


# -- folding the shape arithmetic -----------------------------------------------------------

#: Tensors up to this many elements are folded; the shape arithmetic is a handful of integers.
FOLD_MAX_ELEMENTS = 64


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        # ONNX integer Div truncates toward zero (C semantics), unlike NumPy's floor division.
        quotient = np.abs(a) // np.abs(b)
        return (np.sign(a) * np.sign(b) * quotient).astype(np.result_type(a, b))
    return a / b


_BINARY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _int_div,
    "Equal": np.equal, "Less": np.less, "Greater": np.greater, "Mod": np.mod,
}
_UNARY = {"Neg": np.negative, "Abs": np.abs, "Floor": np.floor, "Ceil": np.ceil, "Not": np.logical_not,
          "Identity": lambda x: x}


def _attrs(node: Any, onnx: Any) -> Dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _slice(data: np.ndarray, starts: np.ndarray, ends: np.ndarray, axes: Optional[np.ndarray],
           steps: Optional[np.ndarray]) -> np.ndarray:
    axes = list(range(len(starts))) if axes is None else [int(a) % data.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index = [slice(None)] * data.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps):
        # INT64_MAX/MIN as "to the end" work directly as Python slice bounds.
        index[axis] = slice(int(start), int(end), step)
    return data[tuple(index)]


def _evaluate(node: Any, known: Dict[str, np.ndarray], shapes: Dict[str, Tuple[Optional[int], ...]],
              onnx: Any) -> Optional[List[np.ndarray]]:
    """Outputs of ``node`` when they follow from known constants and shapes, else None."""
    op = node.op_type
    attrs = _attrs(node, onnx)
    if op == "Constant":
        if "value" in attrs:
            return [onnx.numpy_helper.to_array(attrs["value"])]
        for key, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32),
                           ("value_floats", np.float32)):
            if key in attrs:
                return [np.array(attrs[key], dtype=dtype)]
        return None
    if op in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if shape is None or any(d is None for d in shape):
            return None
        full = np.array(shape, dtype=np.int64)
        if op == "Size":
            return [np.array(int(np.prod(full)), dtype=np.int64)]
        return [full[attrs.get("start", 0):attrs.get("end", len(full))]]
    inputs = [known.get(name) if name else None for name in node.input]
    required = [x for name, x in zip(node.input, inputs) if name]
    if any(x is None for x in required):
        return None
    if op in _BINARY:
        return [_BINARY[op](inputs[0], inputs[1])]
    if op in _UNARY:
        return [_UNARY[op](inputs[0])]
    if op in ("Max", "Min"):
        reduce = np.maximum if op == "Max" else np.minimum
        out = inputs[0]
        for x in inputs[1:]:
            out = reduce(out, x)
        return [out]
    if op == "Cast":
        return [inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))]
    if op == "Gather":
        return [np.take(inputs[0], inputs[1], axis=attrs.get("axis", 0))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
        data = inputs[0]
        if op == "Squeeze":
            return [np.squeeze(data, axis=None if axes is None else tuple(int(a) for a in axes))]
        rank = data.ndim + len(axes)
        for axis in sorted(int(a) % rank for a in axes):
            data = np.expand_dims(data, axis)
        return [data]
    if op == "Concat":
        return [np.concatenate([np.atleast_1d(x) for x in inputs], axis=attrs.get("axis", 0))]
    if op == "Reshape":
        target = [int(d) for d in inputs[1]]
        if not attrs.get("allowzero", 0):
            target = [inputs[0].shape[i] if d == 0 else d for i, d in enumerate(target)]
        return [inputs[0].reshape(target)]
    if op == "Transpose":
        return [np.transpose(inputs[0], attrs.get("perm"))]
    if op == "Slice":
        extra = inputs[3:] + [None] * (5 - len(inputs))
        return [_slice(inputs[0], inputs[1], inputs[2], extra[0], extra[1])]
    if op == "ConstantOfShape":
        value = attrs.get("value")
        fill = onnx.numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
        shape = tuple(int(d) for d in inputs[0])
        if int(np.prod(shape)) > FOLD_MAX_ELEMENTS:
            return None
        return [np.full(shape, fill.reshape(-1)[0], dtype=fill.dtype)]
    if op == "Range":
        return [np.arange(inputs[0], inputs[1], inputs[2])]
    if op == "Where":
        return [np.where(inputs[0], inputs[1], inputs[2])]
    if op == "Expand":
        return [inputs[0] * np.ones(tuple(int(d) for d in inputs[1]), dtype=inputs[0].dtype)]
    return None


def _shape_map(model: Any) -> Dict[str, Tuple[Optional[int], ...]]:
    graph = model.graph
    shapes: Dict[str, Tuple[Optional[int], ...]] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                      for d in tensor_type.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _elem_types(model: Any) -> Dict[str, int]:
    graph = model.graph
    types = {info.name: info.type.tensor_type.elem_type
             for info in list(graph.input) + list(graph.value_info) + list(graph.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def fix_input_shapes(model: Any, height: int, width: int, batch: int = 1) -> None:
    """Set every NCHW graph input to ``batch x C x height x width`` (C must be fixed in the graph)."""
    initializers = {init.name for init in model.graph.initializer}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        dims = info.type.tensor_type.shape.dim
        if len(dims) != 4 or not dims[1].HasField("dim_value"):
            raise ModelError(f"input {info.name!r} is not N x C x H x W with a fixed C; cannot count it")
        for dim, value in zip(dims, (batch, dims[1].dim_value, height, width)):
            dim.Clear()
            dim.dim_value = int(value)
    for info in model.graph.output:
        # Declared symbolic output shapes would only conflict with the inferred ones.
        info.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]


def _weights_as_inputs(model: Any, onnx: Any) -> Set[str]:
    """Turn the large initializers into graph inputs of the same type and shape; return their names.

    Shape inference serialises the whole model on every round; without the weights' data a
    paper-size U-Net (hundreds of MB) costs milliseconds instead of seconds, and only their
    shapes matter here.
    """
    graph = model.graph
    large = [init for init in graph.initializer if int(np.prod(init.dims)) > FOLD_MAX_ELEMENTS]
    names = {init.name for init in large}
    existing = {info.name for info in graph.input}
    for init in large:
        if init.name not in existing:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    keep = [init for init in graph.initializer if init.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return names


def infer_static_shapes(model: Any, onnx: Any) -> Any:
    """Fold the shape arithmetic to constants and infer every shape; returns the inferred model."""
    graph = model.graph
    known: Dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if int(np.prod(init.dims)) <= FOLD_MAX_ELEMENTS:
            known[init.name] = onnx.numpy_helper.to_array(init)
    # Each round folds everything the current shapes allow; a Pad folded in one round gives the
    # next round the shapes behind it. The node count bounds the rounds.
    for _ in range(len(graph.node) + 1):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        shapes = _shape_map(inferred)
        folded = []
        for node in graph.node:
            values = _evaluate(node, known, shapes, onnx)
            if values is None or any(np.asarray(v).size > FOLD_MAX_ELEMENTS for v in values):
                continue
            for name, value in zip(node.output, values):
                known[name] = np.asarray(value)
            folded.append(node)
        if not folded:
            return inferred
        folded_ids = {id(node) for node in folded}
        keep = [node for node in graph.node if id(node) not in folded_ids]
        used = {name for node in keep for name in node.input} | {o.name for o in graph.output}
        del graph.node[:]
        graph.node.extend(keep)
        for node in folded:
            for name in node.output:
                if name in used:
                    graph.initializer.append(onnx.numpy_helper.from_array(known[name], name))
    return onnx.shape_inference.infer_shapes(model, strict_mode=False)


# -- counting ---------------------------------------------------------------------------------

ELEMENTWISE = frozenset((
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Abs", "Neg", "Reciprocal", "Erf",
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "HardSigmoid",
    "HardSwish", "Clip", "Max", "Min", "Where", "Greater", "Less", "Equal", "Not", "Floor", "Ceil",
    "Round", "Sign", "Mod", "GreaterOrEqual", "LessOrEqual", "Mish", "Gelu",
))
PER_ELEMENT = {"BatchNormalization": 2, "InstanceNormalization": 5, "LayerNormalization": 5,
               "GroupNormalization": 5, "Softmax": 3}
REDUCTIONS = frozenset(("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "GlobalAveragePool",
                        "GlobalMaxPool"))
DATA_MOVEMENT = frozenset((
    "Pad", "Slice", "Concat", "Reshape", "Transpose", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast",
    "Identity", "Constant", "ConstantOfShape", "Flatten", "Expand", "Split", "Tile", "DepthToSpace",
    "SpaceToDepth", "Size", "Range",
))
_FLOAT_TYPES = {1: 4, 10: 2, 11: 8, 16: 2}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 -> bytes


def _count(shape: Optional[Tuple[Optional[int], ...]]) -> Optional[int]:
    if shape is None or any(d is None for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _node_flops(node: Any, shapes: Dict[str, Tuple[Optional[int], ...]], onnx: Any) -> Optional[float]:
    """FLOPs of one node, 0 for data movement, None when its shapes or operator are unknown."""
    op = node.op_type
    if op in DATA_MOVEMENT:
        return 0.0
    out = _count(shapes.get(node.output[0]))
    if out is None:
        return None
    attrs = _attrs(node, onnx)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if op in ("Conv", "ConvTranspose"):
        weight = shapes.get(node.input[1])
        data = _count(shapes.get(node.input[0]))
        if weight is None or any(d is None for d in weight) or data is None:
            return None
        # weight[1] is C_in / groups (Conv) or C_out / groups (ConvTranspose): groups are built in.
        kernel = int(np.prod(weight[2:]))
        macs = (out if op == "Conv" else data) * weight[1] * kernel
        return 2.0 * macs + (out if has_bias else 0)
    if op == "Gemm":
        a = shapes.get(node.input[0])
        if a is None or a[0] is None or a[1] is None:
            return None
        k = a[0] if attrs.get("transA", 0) else a[1]
        return 2.0 * out * k + (out if has_bias else 0)
    if op == "MatMul":
        a = shapes.get(node.input[0])
        if a is None or a[-1] is None:
            return None
        return 2.0 * out * a[-1]
    if op in ELEMENTWISE:
        return float(out)
    if op in PER_ELEMENT:
        return float(PER_ELEMENT[op] * out)
    if op in REDUCTIONS:
        read = _count(shapes.get(node.input[0]))
        return None if read is None else float(read)
    if op in ("AveragePool", "MaxPool"):
        return float(out * int(np.prod(attrs.get("kernel_shape", [1]))))
    return None


def _load(model: Union[str, os.PathLike, Any], onnx: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        try:
            return onnx.load(str(model))
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ValueError
            raise ModelError(f"cannot read ONNX file {model}: {exc}") from exc
    copy = type(model)()
    copy.CopyFrom(model)
    return copy


def network_cost(
    model: Union[str, os.PathLike, Any],
    height: int,
    width: int,
    batch: int = 1,
    element_bytes: Optional[int] = None,
    name: Optional[str] = None,
) -> Cost:
    """FLOPs and minimum bytes of an ONNX network (path or ModelProto) for a ``height x width`` input."""
    onnx = require("onnx", "export", "counting FLOPs from ONNX graphs")
    if int(height) < 1 or int(width) < 1 or int(batch) < 1:
        raise InputError(f"size must be positive, got {batch}x{height}x{width}")
    proto = _load(model, onnx)
    fix_input_shapes(proto, int(height), int(width), int(batch))
    weight_names = _weights_as_inputs(proto, onnx)
    inferred = infer_static_shapes(proto, onnx)
    shapes = _shape_map(inferred)
    types = _elem_types(inferred)

    def nbytes(tensor: str) -> float:
        count = _count(shapes.get(tensor))
        dtype = types.get(tensor, 1)
        size = _FLOAT_TYPES.get(dtype)
        if size is None:
            # Integer shape tensors and the like: their own size, never the float override.
            size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).itemsize if dtype else 4
        elif element_bytes:
            size = element_bytes
        return float(count or 0) * size

    graph = inferred.graph
    flops = 0.0
    by_op: Dict[str, float] = {}
    uncounted: List[str] = []
    for node in graph.node:
        value = _node_flops(node, shapes, onnx)
        if value is None:
            uncounted.append(f"{node.op_type} {node.name or node.output[0]}")
            continue
        flops += value
        if value:
            by_op[node.op_type] = by_op.get(node.op_type, 0.0) + value
    initializers = {init.name for init in graph.initializer} | weight_names
    weights = sum(nbytes(name) for name in initializers if types.get(name) in _FLOAT_TYPES)
    inputs = [i.name for i in graph.input if i.name not in initializers]
    io_bytes = sum(nbytes(t) for t in inputs) + sum(nbytes(o.name) for o in graph.output)
    boundary = set(inputs) | {o.name for o in graph.output} | initializers
    activations = sum(nbytes(info.name) for info in graph.value_info
                      if info.name not in boundary and types.get(info.name) in _FLOAT_TYPES)
    label = name or (os.path.basename(str(model)) if isinstance(model, (str, os.PathLike)) else graph.name)
    return Cost(label, flops, weights + io_bytes, "tensor", activations, by_op, uncounted)


#: Middle-step FLOPs per pixel, as the fused kernel and the CPU path compute it.
MIDDLE_STEP_FLOPS_PER_PIXEL = {
    "grey I and B1 (3 mul + 2 add each)": 10,
    "grey difference": 1,
    "three 5x5 separable Sobel magnitudes (2 x (smooth 5 + derivative 4) + 4 for the magnitude)": 66,
    "confidence (compare, add eps, divide, log1p)": 4,
    "histogram (max, bin index, count and sum)": 5,
    "edge masks (three compares)": 3,
    "stage-2 input (six multiplies)": 6,
}


def middle_step_cost(height: int, width: int, batch: int = 1, b1_bytes: int = 4, out_bytes: int = 4) -> Cost:
    """FLOPs and minimum bytes of the middle step (see the module docstring for the model).

    ``b1_bytes``: bytes per element of the stage-1 output read; ``out_bytes``: of the 9-channel
    stage-2 input written (2 for FP16 engines). The image is read as float32.
    """
    pixels = float(batch) * int(height) * int(width)
    if pixels <= 0:
        raise InputError(f"size must be positive, got {batch}x{height}x{width}")
    image, stage1, confidence = 3 * 4, 3 * int(b1_bytes), 4
    store_confidence = image + stage1 + confidence + confidence + image
    recompute = 2 * (image + stage1)
    per_pixel = min(store_confidence, recompute) + 9 * int(out_bytes)
    flops = pixels * sum(MIDDLE_STEP_FLOPS_PER_PIXEL.values())
    return Cost("middle step", flops, pixels * per_pixel, "scalar", pixels * confidence,
                {"middle step": flops})


def pipeline_costs(
    network_files: Sequence[Tuple[str, Union[str, os.PathLike]]],
    height: int,
    width: int,
    stages: Sequence[str],
    element_bytes: Optional[int] = None,
) -> Dict[str, Cost]:
    """Costs of each stage of a method (its ``stages``, e.g. RM2S's stage1, middle, stage2) that costs
    anything: the networks (name, ONNX path) and the middle step."""
    files = dict(network_files)
    size = element_bytes or 4
    costs: Dict[str, Cost] = {}
    for stage in stages:
        if stage in files:
            costs[stage] = network_cost(files[stage], height, width, element_bytes=element_bytes, name=stage)
        elif stage == "middle":
            costs["middle"] = middle_step_cost(height, width, b1_bytes=size, out_bytes=size)
    return costs

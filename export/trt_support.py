"""Static check of an ONNX graph against what TensorRT's ONNX parser accepts (8.5, 10.x, 11.x).

Nothing here needs TensorRT: the facts live in ``trt_ops.json`` (package data), a table
written for this project from onnx-tensorrt's ``docs/operators.md`` per release branch (its
``description`` field says which and what is assumed). The check covers the opset range,
custom domains, tensor data types, the operators and the attribute/input restrictions the
parser documents (pad and resize modes, constant axes, pooling rank, ...). It is run on every
exported file and by ``dereflect export check DIR``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import onnx
from dereflect.errors import InputError, ModelError
from dereflect.trt_api import MIN_TENSORRT
from onnx import helper

TABLE_FILE = Path(__file__).with_name("trt_ops.json")
DEFAULT_VERSIONS = ("8.5", "10", "11")


@lru_cache(maxsize=1)
def load_table() -> Dict[str, Any]:
    """The support table (``trt_ops.json``)."""
    return json.loads(TABLE_FILE.read_text())


def table_version(version: str) -> str:
    """The table entry for a TensorRT version: ``"8.5.2"`` -> ``"8.5"``, ``"8.6"`` -> ``"8.5"`` (8.x from 8.5
    on is checked against 8.5's table), ``"10.3"`` -> ``"10"``. InputError for text that is not a version, a
    version dereflect does not support (below :data:`~dereflect.trt_api.MIN_TENSORRT`) and one without a table."""
    text = str(version).strip()
    match = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:\.\d+)*", text)
    if not match:
        raise InputError(f"not a TensorRT version: {version!r} (e.g. 8.5, 10, 11)")
    major, minor = int(match.group(1)), match.group(2)
    if major == MIN_TENSORRT[0] and minor is None:
        raise InputError(f"TensorRT {text}: give the minor version too ({MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or later)")
    if (major, int(minor or 0)) < MIN_TENSORRT[:2]:
        raise InputError(f"TensorRT {text} is not supported: dereflect needs {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or "
                         "later (name-based I/O; JetPack 5 ships 8.5)")
    key = {8: "8.5", 10: "10", 11: "11"}.get(major)
    if key is None:
        raise InputError(f"no compatibility table for TensorRT {text} (known: 8.5 and later 8.x, 10.x, 11.x)")
    return key


def parse_versions(text: str) -> Tuple[str, ...]:
    """``--versions``: comma-separated TensorRT versions, each checked by :func:`table_version`; at least one."""
    versions = tuple(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))
    if not versions:
        raise InputError(f"--versions needs at least one TensorRT version, e.g. {','.join(DEFAULT_VERSIONS)}")
    for version in versions:
        table_version(version)
    return versions


def version_label(version: str) -> str:
    """How a report names a version: itself, and the table it was checked with where that is another's."""
    key = table_version(version)
    return version if version == key else f"{version} ({key}'s table)"


@dataclass
class Issue:
    version: str
    node: str
    op: str
    message: str


@dataclass
class CompatReport:
    """Problems per TensorRT version for one ONNX file; ``ok(version)`` and ``passed`` summarise.

    ``versions`` are the versions asked for; issues are recorded per table entry (:func:`table_version`)."""

    path: str
    opset: int
    versions: Tuple[str, ...]
    op_counts: Dict[str, int] = field(default_factory=dict)
    issues: List[Issue] = field(default_factory=list)

    def ok(self, version: str) -> bool:
        key = table_version(version)
        return not any(i.version == key for i in self.issues)

    @property
    def passed(self) -> bool:
        return not self.issues

    def summary(self) -> Dict[str, bool]:
        return {v: self.ok(v) for v in self.versions}

    def format(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.op_counts.items()))
        lines = [f"TensorRT compatibility of {self.path} (opset {self.opset}; {ops})"]
        for version in self.versions:
            found = [i for i in self.issues if i.version == table_version(version)]
            if not found:
                lines.append(f"  TensorRT {version_label(version)}: OK")
                continue
            lines.append(f"  TensorRT {version_label(version)}: {len(found)} problem(s)")
            lines.extend(f"    - {i.node} ({i.op}): {i.message}" for i in found)
        return "\n".join(lines)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph: onnx.GraphProto) -> Iterator[Tuple[onnx.NodeProto, onnx.GraphProto]]:
    for node in graph.node:
        yield node, graph
        for sub in _subgraphs(node):
            yield from _walk(sub)


class _GraphFacts:
    """What the constraint checks need to know about tensors: constness, rank, consumers, types."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except onnx.shape_inference.InferenceError:
            inferred = model
        self.constants: Set[str] = set()
        self.consumed: Set[str] = set()
        self.ranks: Dict[str, int] = {}
        self.types: Dict[str, int] = {}
        graphs = [inferred.graph] + [g for node, _ in _walk(inferred.graph) for g in _subgraphs(node)]
        for graph in graphs:
            for init in graph.initializer:
                self.constants.add(init.name)
                self.ranks[init.name] = len(init.dims)
                self.types[init.name] = init.data_type
            for info in list(graph.value_info) + list(graph.input) + list(graph.output):
                tensor = info.type.tensor_type
                if info.type.HasField("tensor_type"):
                    self.types[info.name] = tensor.elem_type
                    if tensor.HasField("shape"):
                        self.ranks[info.name] = len(tensor.shape.dim)
            self.consumed.update(o.name for o in graph.output)
            for node in graph.node:
                self.consumed.update(node.input)
                if node.op_type == "Constant":
                    self.constants.update(node.output)
                if node.op_type == "Cast":
                    self.types[f"Cast.to:{node.name or node.output[0]}"] = int(_attr(node, "to", 0))


def _spatial_rank(node: onnx.NodeProto, facts: _GraphFacts) -> Optional[int]:
    for name in node.input[:2]:
        if name in facts.ranks and facts.ranks[name] >= 3:
            return facts.ranks[name] - 2
    return None


def _constraint_message(rule: Dict[str, Any], node: onnx.NodeProto, facts: _GraphFacts) -> Optional[str]:
    kind = rule["kind"]
    if kind == "attr_in":
        value = _attr(node, rule["attr"], rule.get("default"))
        if value not in rule["allowed"]:
            return f"{rule['attr']}={value!r} is not supported ({rule['text']})"
    elif kind == "attr_equals":
        value = _attr(node, rule["attr"], rule.get("default"))
        if value != rule["value"]:
            return f"{rule['attr']}={value!r} is not supported ({rule['text']})"
    elif kind == "attr_all_ones":
        value = _attr(node, rule["attr"], [])
        if any(v != 1 for v in value):
            return f"{rule['attr']}={list(value)} is not supported ({rule['text']})"
    elif kind == "constant_input":
        index = rule["index"]
        if index < len(node.input) and node.input[index] and node.input[index] not in facts.constants:
            return f"input {index} ({node.input[index]}) is computed at run time ({rule['text']})"
    elif kind == "spatial_rank":
        rank = _spatial_rank(node, facts)
        if rank is not None and rank not in rule["allowed"]:
            return f"{rank}-D spatial input is not supported ({rule['text']})"
    elif kind == "output_unused":
        index = rule["index"]
        if index < len(node.output) and node.output[index] and node.output[index] in facts.consumed:
            return f"output {index} ({node.output[index]}) is used ({rule['text']})"
    else:
        raise ModelError(f"trt_ops.json: unknown constraint kind {kind!r}")
    return None


def check_trt_compat(
    onnx_model: Union[str, os.PathLike, onnx.ModelProto],
    versions: Sequence[str] = DEFAULT_VERSIONS,
) -> CompatReport:
    """Check an ONNX file (or loaded model) against each TensorRT version's parser support."""
    if isinstance(onnx_model, onnx.ModelProto):
        model, path = onnx_model, "<model>"
    else:
        path = str(onnx_model)
        try:
            model = onnx.load(path)
        except Exception as exc:  # onnx.load raises OSError, protobuf's DecodeError and others
            raise ModelError(f"cannot read ONNX file {path}: {exc}") from exc
    table = load_table()
    keys = tuple(dict.fromkeys(table_version(v) for v in versions))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    facts = _GraphFacts(model)
    report = CompatReport(path=path, opset=opset, versions=tuple(dict.fromkeys(versions)))
    nodes = list(_walk(model.graph))
    report.op_counts = dict(Counter(node.op_type for node, _ in nodes))
    dtype_names = {value: name for name, value in onnx.TensorProto.DataType.items()}
    used_types = {dtype_names.get(t, str(t)) for t in facts.types.values() if t}
    for key in keys:
        spec = table["versions"][key]
        if not spec["opset_min"] <= opset <= spec["opset_max"]:
            report.issues.append(Issue(key, "model", "opset", f"opset {opset} is outside the supported range "
                                                               f"{spec['opset_min']}-{spec['opset_max']}"))
        for dtype in sorted(used_types - set(spec["dtypes"])):
            report.issues.append(Issue(key, "model", "dtype", f"tensor type {dtype} is not supported"))
        for node, _ in nodes:
            label = node.name or node.output[0]
            if node.domain not in ("", "ai.onnx"):
                report.issues.append(Issue(key, label, node.op_type,
                                           f"custom domain {node.domain!r} needs a TensorRT plugin"))
                continue
            if key not in table["operators"].get(node.op_type, []):
                report.issues.append(Issue(key, label, node.op_type,
                                           f"operator not supported by the TensorRT {key} ONNX parser"))
                continue
            for rule in table["constraints"].get(node.op_type, []):
                if key in rule["versions"]:
                    message = _constraint_message(rule, node, facts)
                    if message:
                        report.issues.append(Issue(key, label, node.op_type, message))
    return report

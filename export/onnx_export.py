"""``dereflect export onnx``: a checkpoint to an export directory (ONNX, FP16 ONNX, goldens, manifest).

Each network of the checkpoint's method is wrapped in ``PaddedModel`` (edge padding to the
network's stride and minimum size, and the crop back, happen inside the graph) and exported
with ``torch.onnx.export(..., dynamo=False, opset_version=17)`` with dynamic batch, height
and width. Exporting in eval mode folds BatchNorm into the preceding Conv; this module also
folds the BatchNorm after a ConvTranspose (the exporter leaves those) and removes the
Identity nodes the exporter inserts for de-duplicated weights, so the graph TensorRT parses
is plain Conv/ConvTranspose/activation layers.

Then, in a temporary directory next to the target: parity with PyTorch (ONNX Runtime CPU),
the FP16 file (checked against the FP32 one on natural-looking images), golden files, the
static TensorRT compatibility check, and ``manifest.json``. Only when all of that succeeded is
the directory moved into place. An existing non-empty target is refused unless ``force``,
and even then only if it is an earlier export (never an arbitrary directory).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shlex
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from dereflect import __version__
from dereflect.errors import InputError, ModelError, require
from dereflect.imageio import is_free_folder, staged_folder
from dereflect.manifest import MANIFEST_NAME, Manifest, check_max_side, sha256_file

if TYPE_CHECKING:
    from dereflect.train.checkpoint import Checkpoint
    from onnx import GraphProto, ModelProto
    from torch import nn

log = logging.getLogger("dereflect.export")

#: Lowest FP16-vs-FP32 PSNR (dB) accepted on natural-looking images.
FP16_MIN_PSNR = 45.0
SUPPORTED_OPSETS = range(13, 21)
#: (N, H, W) of the natural-looking images for FP16 calibration and measurement (different seeds).
CALIBRATION_SHAPE = (2, 128, 192)
MEASURE_SHAPE = (2, 160, 224)


def _method(checkpoint: Checkpoint) -> Any:
    """The method the checkpoint deploys as; ModelError when it cannot be exported."""
    from dereflect.methods.base import method_for_checkpoint

    method = method_for_checkpoint(checkpoint.metadata)
    if not method.exportable:
        raise ModelError(
            f"{checkpoint.path} is an RM2S stage-1 checkpoint; RM2S runs two networks, so export needs "
            "the stage-2 checkpoint (it contains stage 1 too). Train stage 2 first "
            "(dereflect train rm2s-stage2 --stage1 CKPT ...), then export its checkpoint"
        )
    return method


def _is_export_dir(path: Path) -> bool:
    manifest = path / MANIFEST_NAME
    try:
        return manifest.is_file() and '"dereflect-export"' in manifest.read_text()
    except (OSError, UnicodeDecodeError):
        return False


def _refuse_an_export(reference: os.PathLike) -> None:
    """InputError for an export directory (or its manifest) or a bundled model's name, where the other
    commands take any model: it names the command that makes the training checkpoint export needs."""
    from dereflect.models import resolve_model

    path = resolve_model(reference)  # the route every command takes: a bundled model's name is its export
    folder = path.parent if path.name == MANIFEST_NAME else path
    if not _is_export_dir(folder):
        return  # a checkpoint, or what load_checkpoint explains
    if path != Path(reference):
        what, name = "a bundled model", str(reference)
    else:
        what = "an export's manifest" if folder != path else "an export directory"
        name = folder.resolve().name
    raise InputError(f"{reference} is {what}, not a training checkpoint: export onnx takes a checkpoint "
                     f"(.safetensors); make one of it with: dereflect train from-export "
                     f"{shlex.quote(str(reference))} -o {shlex.quote(name + '.safetensors')}")


def _check_target(out_dir: Path, force: bool) -> None:
    if is_free_folder(out_dir):
        return
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir} exists and is not a directory")
    if not force:
        raise ModelError(f"{out_dir} is not empty; choose a new directory or pass --force to replace an "
                         "earlier export")
    if not _is_export_dir(out_dir):
        raise ModelError(
            f"{out_dir} is not empty and is not a dereflect export directory; refusing to replace it even "
            "with --force"
        )


# --- graph clean-up ---------------------------------------------------------------------------------

def _fold_identities(graph: GraphProto) -> int:
    """Point consumers of ``Identity(initializer)`` at the initializer itself and drop the Identity."""
    initializers = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    for node in keep:
        node.input[:] = [alias.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


def _fold_batchnorm(graph: GraphProto) -> int:
    """Fold ``BatchNormalization`` into a preceding Conv/ConvTranspose (group 1) used only by it.

    BN(y) = s * (y - mean) + beta with s = gamma / sqrt(var + eps), so the layer's weights are
    scaled per output channel by s and its bias becomes s * (bias - mean) + beta.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    removed = set()
    folded = 0
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        layer = producers.get(bn.input[0])
        params = bn.input[1:5]
        if (layer is None or layer.op_type not in ("Conv", "ConvTranspose") or consumers.get(bn.input[0]) != 1
                or bn.input[0] in outputs or not all(p in initializers for p in params)
                or layer.input[1] not in initializers
                or (len(layer.input) > 2 and layer.input[2] and layer.input[2] not in initializers)):
            continue
        group = next((helper.get_attribute_value(a) for a in layer.attribute if a.name == "group"), 1)
        if group != 1:
            continue
        epsilon = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(initializers[p]).astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + epsilon)
        weight = numpy_helper.to_array(initializers[layer.input[1]]).astype(np.float64)
        has_bias = len(layer.input) > 2 and bool(layer.input[2])
        bias = numpy_helper.to_array(initializers[layer.input[2]]).astype(np.float64) if has_bias else 0.0
        channel_axis = 1 if layer.op_type == "ConvTranspose" else 0
        shape = [1] * weight.ndim
        shape[channel_axis] = -1
        base = layer.name or layer.output[0]
        weight_name, bias_name = f"{base}.folded_weight", f"{base}.folded_bias"
        graph.initializer.extend([
            numpy_helper.from_array((weight * scale.reshape(shape)).astype(np.float32), weight_name),
            numpy_helper.from_array(((bias - mean) * scale + beta).astype(np.float32), bias_name),
        ])
        layer.input[:] = [layer.input[0], weight_name, bias_name]
        layer.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    keep = [node for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _drop_unused_initializers(graph: GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def clean_graph(model: ModelProto) -> Dict[str, int]:
    """Fold Identity-of-weights and BatchNorm-after-(Transposed)Conv in place; returns the counts."""
    import onnx

    graph = model.graph
    counts = {"identities": _fold_identities(graph), "batchnorms": _fold_batchnorm(graph)}
    _drop_unused_initializers(graph)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return counts


# --- export -------------------------------------------------------------------------------------------

def _trace_size(stride: int, min_size: int) -> Tuple[int, int]:
    # Any size works (padding is in the graph); one that needs padding exercises that path.
    base = max(stride, min_size) + stride // 2 + 1
    return base, base + stride


def export_network(torch: ModuleType, module: nn.Module, path: Path, input_name: str, channels: int,
                   output_names: Sequence[str], opset: int, stride: int, min_size: int) -> Dict[str, int]:
    """``module`` (a PaddedModel in eval mode) to ``path`` as every export writes it; returns the cleanup counts."""
    import onnx

    height, width = _trace_size(stride, min_size)
    dummy = torch.rand(1, channels, height, width)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # Tracer and deprecation warnings are about the exporter, not about anything the user can fix.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), str(path), input_names=[input_name], output_names=list(output_names),
            dynamic_axes={name: axes for name in [input_name, *output_names]},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    model = onnx.load(str(path))
    counts = clean_graph(model)
    onnx.save(model, str(path))
    return counts


def export_onnx(
    checkpoint_path: os.PathLike,
    out_dir: os.PathLike,
    fp16: bool = True,
    opset: int = 17,
    golden: bool = True,
    force: bool = False,
    model_name: Optional[str] = None,
    max_side: Optional[int] = None,
) -> Manifest:
    """Export ``checkpoint_path`` into ``out_dir`` and return the written manifest.

    ``model_name`` is the model's name in the manifest (default: the checkpoint's recorded name, else
    its file name). ``max_side`` records the longest side the networks are meant to run at (the
    scale the model was trained to see; the runtime scales larger frames down and guides the result
    back up); None takes the side the checkpoint records (its training's, or that of the export it
    was rebuilt from), else leaves the runtime's default.

    The manifest is the one the checkpoint implies (:func:`dereflect.models.checkpoint_manifest`, what
    the runtime runs a checkpoint with) completed by the export: the files and their hashes, the
    channels the networks were found to take and give, and the records of the checks below.

    Raises InputError for a bundled model or an export directory (not a checkpoint) and for a bad
    ``max_side`` or ``opset``, and ModelError when the checkpoint is incomplete, the target is not
    replaceable, parity with PyTorch fails, or the FP16 file is below :data:`FP16_MIN_PSNR` against
    the FP32 one.
    """
    torch = require("torch", "export", "exporting checkpoints")
    onnx = require("onnx", "export", "exporting checkpoints")
    from dereflect.models import checkpoint_manifest
    from dereflect.train.checkpoint import load_checkpoint

    from .verify import natural_images, network_feeds, ort_backend, write_goldens

    if max_side is not None:
        max_side = check_max_side(max_side)
    if opset not in SUPPORTED_OPSETS:
        raise InputError(f"opset {opset} is not supported; use 13-20 (17 keeps TensorRT 8.5 reachable)")
    _refuse_an_export(checkpoint_path)
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    method = _method(checkpoint)
    manifest = checkpoint_manifest(checkpoint_path, checkpoint.metadata, method)
    manifest.name = str(model_name or manifest.name)
    if max_side is not None:
        manifest.max_side = max_side
    manifest.checkpoint["sha256"] = sha256_file(checkpoint_path)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_target(out_dir, force)
    # _check_target allowed replacing out_dir (an empty folder, or an earlier export with force).
    with staged_folder(out_dir, replace=True) as tmp:
        manifest.directory = tmp
        modules, cleaned = _export_networks(torch, checkpoint, method, manifest, opset)
        records: Dict[str, Any] = {
            "dereflect_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "export": {"opset": opset, "torch": torch.__version__, "onnx": onnx.__version__,
                       "graph_cleanup": cleaned},
        }
        fp32 = ort_backend(manifest)
        try:
            natural = network_feeds(fp32, natural_images(*MEASURE_SHAPE, seed=7))
            records["parity"] = _check_parity(manifest, modules, natural)
            if fp16:
                calibration = network_feeds(fp32, natural_images(*CALIBRATION_SHAPE, seed=11))
                records["fp16"] = _write_fp16(onnx, manifest, calibration, natural)
        finally:
            fp32.close()
        if golden:
            records["golden"] = write_goldens(manifest)
        records["tensorrt_check"] = _check_tensorrt(manifest)
        manifest.records = records
        manifest.save()
    manifest.directory = out_dir
    return manifest


def _export_networks(torch: ModuleType, checkpoint: Checkpoint, method: Any, manifest: Manifest,
                     opset: int) -> Tuple[Dict[str, nn.Module], Dict[str, Dict[str, int]]]:
    """Each of the method's networks from ``checkpoint`` to ``<name>.onnx`` in ``manifest.directory``.

    Completes each network's entry in ``manifest``: its file and hash, stride and minimum size, and
    the channels it takes (its recorded config) and gives (found by running it once). Returns the
    exported PyTorch modules (parity compares with them) and each graph's clean-up counts.
    """
    from dereflect.train.models.common import PaddedModel

    available = set(checkpoint.metadata["networks"])
    modules: Dict[str, nn.Module] = {}
    cleaned: Dict[str, Dict[str, int]] = {}
    for contract in method.networks:
        name, spec = contract.name, manifest.networks[contract.name]
        output_names = [t.name for t in spec.outputs]
        source = method.checkpoint_network(contract, available)
        net = checkpoint.build(source)
        stride, min_size = int(getattr(net, "stride", 1)), int(getattr(net, "min_size", 0))
        module = PaddedModel(net).eval()
        channels = int(checkpoint.network_spec(source)["config"].get("in_channels", 3))
        with torch.no_grad():
            probe = module(torch.rand(1, channels, *_trace_size(stride, min_size)))
        probe = probe if isinstance(probe, (tuple, list)) else (probe,)
        if len(probe) != len(output_names):
            raise ModelError(f"{name}: the network returns {len(probe)} outputs, expected {output_names}")
        path = manifest.directory / f"{name}.onnx"
        cleaned[name] = export_network(torch, module, path, spec.inputs[0].name, channels, output_names, opset,
                                       stride, min_size)
        modules[name] = module
        spec.onnx, spec.sha256 = path.name, sha256_file(path)
        spec.stride, spec.min_size = stride, min_size
        spec.inputs[0].channels = channels
        for tensor, output in zip(spec.outputs, probe):
            tensor.channels = int(output.shape[1])
    return modules, cleaned


def _check_parity(manifest: Manifest, modules: Dict[str, nn.Module],
                  natural: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, Any]:
    """ONNX Runtime against PyTorch: random inputs at several sizes, plus ``natural`` (natural-looking
    images along the method's sequence). Returns the record; ModelError beyond the tolerance."""
    from . import parity as parity_mod
    from .verify import output_ranges

    report = None
    for name, spec in manifest.networks.items():
        cases = parity_mod.random_cases(spec.inputs[0].name, spec.inputs[0].channels)
        cases.append(("natural", natural[name]))
        report = parity_mod.check_parity(name, modules[name], str(manifest.directory / spec.onnx), cases,
                                         output_ranges(spec), report=report)
    if not report.passed:
        raise ModelError("ONNX Runtime and PyTorch disagree beyond the tolerance:\n" + report.format())
    log.info("%s", report.format())
    return report.to_dict()


def _write_fp16(onnx: ModuleType, manifest: Manifest, calibration: Dict[str, Dict[str, np.ndarray]],
                natural: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, Any]:
    """The FP16 file of each network (``<name>.fp16.onnx``, named in ``manifest``), calibrated on
    ``calibration`` and measured against the FP32 file on ``natural``. Returns the record; ModelError
    for a network below :data:`FP16_MIN_PSNR`."""
    from .fp16 import compare_models, convert_to_fp16, emulate_fp16
    from .verify import output_ranges

    record: Dict[str, Any] = {
        "io_dtype": "float32",
        "measured": "worst PSNR per output against the FP32 file on natural-looking images "
                    f"{list(MEASURE_SHAPE)} (N, H, W), ONNX Runtime CPU. 'outputs': the FP16 graph "
                    "emulated with every float16 weight and tensor rounded to float16 (arithmetic "
                    "inside each node in float32); 'outputs_onnxruntime': the FP16 file as ONNX "
                    "Runtime's CPU provider runs it (mostly float32 between casts it removes)",
        "min_psnr_db": FP16_MIN_PSNR,
        "networks": {},
    }
    for name, spec in manifest.networks.items():
        reference = str(manifest.directory / spec.onnx)
        converted, plan = convert_to_fp16(onnx.load(reference), calibration=[calibration[name]])
        path16 = manifest.directory / f"{name}.fp16.onnx"
        onnx.save(converted, str(path16))
        spec.onnx_fp16, spec.sha256_fp16 = path16.name, sha256_file(path16)
        ranges = output_ranges(spec)
        measured = compare_models(reference, emulate_fp16(converted), [natural[name]], ranges)
        direct = compare_models(reference, str(path16), [natural[name]], ranges)
        record["networks"][name] = {**plan.summary(), "outputs": measured, "outputs_onnxruntime": direct,
                                    "float32_nodes": sorted(plan.kept_fp32)}
        worst = min(m["psnr_db"] for m in measured.values())
        if not worst >= FP16_MIN_PSNR:
            raise ModelError(
                f"{name}: the FP16 ONNX reaches only {worst:.1f} dB PSNR against FP32 (needs "
                f">= {FP16_MIN_PSNR:g}); export with --no-fp16 and build FP32 engines"
            )
    return record


def _check_tensorrt(manifest: Manifest) -> Dict[str, Dict[str, bool]]:
    """The static TensorRT parser check of every ONNX file (FP32 and FP16), by file; a file that fails
    for some version is logged as a warning (the export stays usable on ONNX Runtime)."""
    from .trt_support import check_trt_compat

    checks: Dict[str, Dict[str, bool]] = {}
    for spec in manifest.networks.values():
        for filename in filter(None, (spec.onnx, spec.onnx_fp16)):
            compat = check_trt_compat(manifest.directory / filename)
            checks[filename] = compat.summary()
            if not compat.passed:
                log.warning("%s", compat.format())
    return checks


def export_summary(manifest: Manifest) -> List[str]:
    """Human-readable lines describing an export (for the command line)."""
    lines = [f"exported {manifest.method} ({manifest.name}) to {manifest.directory}"
             + (f"; networks run at up to {manifest.max_side} px" if manifest.max_side else "")]
    for name, spec in manifest.networks.items():
        files = spec.onnx + (f", {spec.onnx_fp16}" if spec.onnx_fp16 else "")
        ins = ", ".join(f"{t.name}[{t.channels}]" for t in spec.inputs)
        outs = ", ".join(f"{t.name}[{t.channels}]" for t in spec.outputs)
        lines.append(f"  {name}: {files}  ({ins} -> {outs})")
    parity = manifest.records.get("parity") or {}
    if parity:
        lines.append(f"  parity vs PyTorch: worst max |diff| {parity['worst_max_abs']:.2e} "
                     f"(tolerance {parity['tolerance']:g}) over {parity['cases']} cases")
    for name, record in ((manifest.records.get("fp16") or {}).get("networks") or {}).items():
        psnrs = ", ".join(f"{o} {m['psnr_db']:.1f} dB" for o, m in record["outputs"].items())
        lines.append(f"  FP16 vs FP32 {name}: {psnrs}; {record['nodes_float32']} nodes kept float32")
    for filename, result in (manifest.records.get("tensorrt_check") or {}).items():
        verdict = ", ".join(f"{v} {'ok' if ok else 'UNSUPPORTED'}" for v, ok in result.items())
        lines.append(f"  TensorRT parser check {filename}: {verdict}")
    return lines

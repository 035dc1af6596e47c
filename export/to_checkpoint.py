"""A training checkpoint rebuilt from an export, to fine-tune a shipped model without its run folder.

An export keeps each network's weights in its ONNX file, but renamed and with every BatchNorm
folded into the convolution before it (by the exporter and by ``clean_graph``). To map them back,
a probe copy of each network, with distinct values in every parameter and BatchNorms that fold to
their shift alone, goes through the same exporter: each ONNX initializer then names, by its values,
the parameter it came from. The export's folded weights go into those convolutions and each
BatchNorm becomes the identity plus the folded shift, rescaled to the statistics its input shows on
photo-like images. Eval mode then computes exactly the export's function, and a BatchNorm that
trains on batch statistics (CRRN's GiN) starts close to it. A network the export does not hold
(RM2S's GAN critic) starts afresh. Parity with ONNX Runtime is checked before the file is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from dereflect.errors import InputError, ModelError
from dereflect.train.checkpoint import OWN_KEYS, save_checkpoint
from dereflect.train.models import build_model
from torch import nn

#: Photo-like images (N, H, W) whose statistics each BatchNorm is rescaled to; the parity check runs on
#: them too (with random inputs of several sizes).
CALIBRATION_SHAPE = (8, 160, 224)

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _batchnorms_after_convs(net: nn.Module) -> Dict[str, str]:
    """BatchNorm name -> the convolution before it (the one the export folded it into)."""
    pairs, last_conv = {}, None
    for name, module in net.named_modules():
        if isinstance(module, _CONVS):
            last_conv = name
        elif isinstance(module, nn.BatchNorm2d):
            if last_conv is None:
                raise ModelError(f"{name}: a BatchNorm with no convolution before it cannot be unfolded")
            pairs[name] = last_conv
    return pairs


def _probe_state(net: nn.Module, bn_convs: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Distinct values in every parameter; BatchNorm scale 1 on unit statistics, so it folds to its shift."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        for name in bn_convs:
            bn = net.get_submodule(name)
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    return {key: value.clone() for key, value in net.state_dict().items()}


def _initializers(path: Path) -> Dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


def _match(probe: Dict[str, np.ndarray], state: Dict[str, torch.Tensor],
           bn_convs: Dict[str, str], network: str) -> Dict[str, str]:
    """ONNX initializer -> the state key whose probe values it holds (a folded bias maps to its BatchNorm's)."""
    sources = {key: value for key, value in state.items() if value.dtype.is_floating_point
               and not key.endswith(("running_mean", "running_var"))}
    for bn, conv in bn_convs.items():
        conv_bias = state.get(f"{conv}.bias")
        sources[f"{bn}.bias"] = state[f"{bn}.bias"] + (conv_bias if conv_bias is not None else 0.0)
    mapping = {}
    for name, value in probe.items():
        hits = [key for key, source in sources.items()
                if tuple(source.shape) == value.shape and np.allclose(source.numpy(), value, rtol=1e-5, atol=0)]
        if len(hits) != 1:
            found = ", ".join(hits) if hits else "nothing"
            raise ModelError(f"{network}: cannot tell which parameter the export's {name!r} {value.shape} holds "
                             f"(matches {found}); this export's graph is not one this version writes")
        mapping[name] = hits[0]
    return mapping


def _unfold(net: nn.Module, onnx_path: Path, input_name: str, output_names: List[str], channels: int,
            network: str) -> Dict[str, str]:
    """Load the export's weights for ``net`` (in place): folded convolutions, identity BatchNorms.

    Returns the BatchNorm -> convolution pairs it unfolded."""
    from dereflect.train.models.common import PaddedModel

    from .onnx_export import export_network

    bn_convs = _batchnorms_after_convs(net)
    state = _probe_state(net, bn_convs)
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = Path(tmp) / "probe.onnx"
        export_network(torch, PaddedModel(net).eval(), probe_path, input_name, channels, output_names, 17,
                       int(getattr(net, "stride", 1)), int(getattr(net, "min_size", 0)))
        probe = _initializers(probe_path)
    shipped = _initializers(onnx_path)
    if set(probe) != set(shipped) or any(probe[k].shape != shipped[k].shape for k in probe):
        raise ModelError(f"{onnx_path}: its weights do not fit the architecture its manifest records for "
                         f"{network!r} (exported by another version, or edited)")
    mapping = _match(probe, state, bn_convs, network)
    set_here = set(mapping.values()) | {f"{conv}.bias" for conv in bn_convs.values()} | {
        f"{bn}.{key}" for bn in bn_convs for key in ("weight", "running_mean", "running_var")}
    left = [key for key, value in state.items() if value.dtype.is_floating_point and key not in set_here]
    if left:
        raise ModelError(f"{onnx_path}: holds no values for {network!r}'s {', '.join(left[:5])}")
    with torch.no_grad():
        for name, key in mapping.items():
            state[key] = torch.from_numpy(np.array(shipped[name], dtype=np.float32)).reshape(state[key].shape)
        for bn, conv in bn_convs.items():
            if f"{conv}.bias" in state:
                state[f"{conv}.bias"] = torch.zeros_like(state[f"{conv}.bias"])  # folded into the BatchNorm's shift
            module = net.get_submodule(bn)
            state[f"{bn}.weight"] = torch.ones_like(state[f"{bn}.weight"])
            state[f"{bn}.running_mean"] = torch.zeros_like(state[f"{bn}.running_mean"])
            state[f"{bn}.running_var"] = torch.full_like(state[f"{bn}.running_var"], 1.0 - module.eps)
    net.load_state_dict(state)
    net.eval()
    return bn_convs


def _calibrate(net: nn.Module, bn_convs: Dict[str, str], feed: np.ndarray) -> None:
    """Rescale each BatchNorm to its input's mean and spread on ``feed``, keeping its function.

    With the identity BatchNorm y = x + b, setting mean m, variance s^2 - eps, scale s and shift
    b + m gives the same y in eval mode, and in train mode the batch statistics are near m and s.
    """
    from dereflect.train.models.common import PaddedModel

    sums: Dict[str, list] = {}  # name -> [batches, sum of channel means, sum of channel mean squares]

    def record(name: str):
        def hook(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().double()
            entry = sums.setdefault(name, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] = entry[1] + x.mean((0, 2, 3))
            entry[2] = entry[2] + (x * x).mean((0, 2, 3))
        return hook

    handles = [net.get_submodule(name).register_forward_hook(record(name)) for name in bn_convs]
    try:
        with torch.no_grad():
            wrapped = PaddedModel(net).eval()
            for image in feed:
                wrapped(torch.from_numpy(np.ascontiguousarray(image[None])))
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for name, (count, total, total_sq) in sums.items():
            module = net.get_submodule(name)
            mean = total / count
            var = (total_sq / count - mean * mean).clamp_min(1e-4)
            module.running_mean.copy_(mean.float())
            module.running_var.copy_((var - module.eps).clamp_min(1e-6).float())
            module.weight.copy_(torch.sqrt(module.running_var + module.eps))
            module.bias.add_(mean.float())


def checkpoint_from_export(model: Any, out: os.PathLike) -> Tuple[Path, Dict[str, Any]]:
    """Write ``out``, a training checkpoint with ``model``'s weights (a bundled name or an export folder)
    and the side its networks run at (the export's ``max_side``).

    Returns the path and a summary (method, step, networks recovered and started afresh, the worst
    parity difference). Raises InputError for a checkpoint (nothing to rebuild) and ModelError for an
    export that records no checkpoint metadata or whose files do not fit it.
    """
    from dereflect.models import open_source
    from dereflect.train.models.common import PaddedModel

    from .parity import check_parity, random_cases
    from .verify import natural_images, network_feeds, ort_backend

    source = open_source(model)
    if source.kind != "export":
        raise InputError(f"{source.path} is a training checkpoint already; --resume or --init takes it as it is")
    manifest, method = source.manifest, source.method
    metadata = (manifest.checkpoint or {}).get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("networks"), dict):
        raise ModelError(f"{manifest.directory}: the manifest records no checkpoint metadata (architectures), "
                         "so its networks cannot be rebuilt; export the checkpoint again with this version")
    available = metadata["networks"]
    backend = ort_backend(manifest)
    feeds = network_feeds(backend, natural_images(*CALIBRATION_SHAPE, seed=11))
    networks, report = {}, None
    for contract in method.networks:
        stored = method.checkpoint_network(contract, available)
        spec = available[stored]
        net = build_model(spec["arch"], spec["config"])
        onnx_path = manifest.path_of(contract.name)
        input_name = contract.input.name
        bn_convs = _unfold(net, onnx_path, input_name, [t.name for t in contract.outputs], contract.input.channels,
                           stored)
        _calibrate(net, bn_convs, feeds[contract.name][input_name])
        cases = random_cases(input_name, contract.input.channels)
        cases.append(("natural", feeds[contract.name]))
        report = check_parity(contract.name, PaddedModel(net).eval(), str(onnx_path), cases, report=report)
        networks[stored] = (spec["arch"], spec["config"], net)
    if not report.passed:
        raise ModelError("the rebuilt networks do not reproduce the export:\n" + report.format())
    fresh = [name for name in available if name not in networks]
    for name in fresh:  # not exported (a GAN critic): a new one
        spec = available[name]
        networks[name] = (spec["arch"], spec["config"], build_model(spec["arch"], spec["config"]))
    training = dict(metadata.get("training") or {})
    training["from_export"] = {"model": source.bundled or str(manifest.directory), "name": manifest.name,
                               "networks": {n: manifest.networks[n].sha256 for n in manifest.networks},
                               "fresh": fresh}
    # The export's side, not the one its checkpoint recorded (export onnx --max-side may have changed it):
    # the rebuilt checkpoint runs as the export does.
    path = save_checkpoint(out, method=metadata["method"], kind=metadata["kind"], networks=networks,
                           step=int(metadata.get("step", 0)), data_recipe=metadata.get("data_recipe"),
                           training=training, max_side=manifest.max_side,
                           extra={k: v for k, v in metadata.items() if k not in OWN_KEYS})
    worst = max(row.max_abs for row in report.rows)
    return path, {"method": metadata["method"], "kind": metadata["kind"], "step": int(metadata.get("step", 0)),
                  "networks": sorted(n for n in networks if n not in fresh), "fresh": fresh, "max_abs": worst}

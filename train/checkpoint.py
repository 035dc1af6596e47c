"""Checkpoints: safetensors files with JSON metadata; loading never unpickles.

Layout of a checkpoint file:

* tensors ``<network>/<parameter or buffer>`` for each network (``stage1/...``, ``generator/...``),
  and ``optim/<name>/<index>/<key>`` for optimiser state when the checkpoint is resumable;
* safetensors metadata key ``dereflect`` holding JSON: ``format``, ``format_version``,
  ``method``, ``kind``, ``networks`` (each with ``arch`` and ``config``), ``step``,
  ``data_recipe``, ``training``, ``package_version``, ``git_commit``, ``created``, and the
  non-tensor part of the optimiser states.

``load_checkpoint`` checks the metadata and that every network's tensors match the shapes
its architecture expects before anything is used.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from dereflect import __version__
from dereflect.errors import ModelError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "dereflect-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "dereflect"


@dataclass
class Checkpoint:
    """A loaded checkpoint: metadata plus per-network state dicts and optimiser states."""

    metadata: Dict[str, Any]
    states: Dict[str, Dict[str, torch.Tensor]]
    optimizer_states: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))

    def network_spec(self, name: str) -> Dict[str, Any]:
        try:
            return self.metadata["networks"][name]
        except KeyError:
            have = ", ".join(sorted(self.metadata.get("networks", {}))) or "none"
            raise ModelError(
                f"checkpoint {self.path or ''} has no network {name!r} (it has: {have})"
            ) from None

    def build(self, name: str) -> torch.nn.Module:
        """Build network ``name`` from its recorded architecture and load its weights (eval mode)."""
        from .models import build_model

        spec = self.network_spec(name)
        model = build_model(spec["arch"], spec["config"])
        load_state_strict(model, self.states[name], f"{self.path or 'checkpoint'}:{name}")
        return model.eval()


def git_commit() -> str:
    """The commit of the source tree this package runs from, or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _flatten_optimizer(name: str, state: Dict[str, Any]):
    tensors: Dict[str, torch.Tensor] = {}
    plain_state: Dict[str, Dict[str, Any]] = {}
    for index, values in state["state"].items():
        plain_state[str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim/{name}/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state[str(index)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _unflatten_optimizer(name: str, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]):
    state: Dict[int, Dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    prefix = f"optim/{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field_name = key[len(prefix):].split("/", 1)
            state.setdefault(int(index), {})[field_name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: os.PathLike,
    *,
    method: str,
    kind: str,
    networks: Dict[str, tuple],
    step: int = 0,
    data_recipe: Optional[Dict[str, Any]] = None,
    training: Optional[Dict[str, Any]] = None,
    optimizers: Optional[Dict[str, torch.optim.Optimizer]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a checkpoint atomically.

    ``networks`` maps a network name to ``(arch, config_dict, module)``. The file is written
    to a temporary name and renamed, so an interrupted save never destroys the previous one.
    """
    path = Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    network_meta = {}
    for name, (arch, config, module) in networks.items():
        network_meta[name] = {"arch": arch, "config": config}
        for key, value in module.state_dict().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    optim_meta = {}
    for name, optimizer in (optimizers or {}).items():
        flat, plain = _flatten_optimizer(name, optimizer.state_dict())
        tensors.update(flat)
        optim_meta[name] = plain
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "kind": kind,
        "networks": network_meta,
        "step": int(step),
        "data_recipe": data_recipe or {},
        "training": training or {},
        "optimizers": optim_meta,
        "package_version": __version__,
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
    os.replace(tmp, path)
    return path


def read_metadata(path: os.PathLike) -> Dict[str, Any]:
    """Read and validate only the JSON metadata of a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    if raw is None:
        raise ModelError(f"{path} is a safetensors file but not a dereflect checkpoint (no metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: checkpoint metadata is not valid JSON: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise ModelError(f"{path}: not a dereflect checkpoint (format {metadata.get('format')!r})")
    if int(metadata.get("format_version", -1)) > FORMAT_VERSION:
        raise ModelError(
            f"{path}: checkpoint format {metadata['format_version']} is newer than this dereflect "
            f"({__version__}) reads; upgrade dereflect"
        )
    for key in ("method", "kind", "networks"):
        if key not in metadata:
            raise ModelError(f"{path}: checkpoint metadata lacks {key!r}")
    return metadata


def load_checkpoint(path: os.PathLike) -> Checkpoint:
    """Load a checkpoint's metadata and tensors (CPU); no code is executed from the file."""
    path = Path(path)
    metadata = read_metadata(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    states: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in metadata["networks"]}
    optim_tensors: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        if head == "optim":
            optim_tensors[key] = value
        elif head in states:
            states[head][rest] = value
        else:
            raise ModelError(f"{path}: tensor {key!r} belongs to no network listed in the metadata")
    for name, state in states.items():
        if not state:
            raise ModelError(f"{path}: network {name!r} is listed in the metadata but has no tensors")
    optimizer_states = {
        name: _unflatten_optimizer(name, meta, optim_tensors)
        for name, meta in metadata.get("optimizers", {}).items()
    }
    return Checkpoint(metadata=metadata, states=states, optimizer_states=optimizer_states, path=path)


def load_state_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``module``, naming every missing, unexpected or mis-shaped tensor."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "wrong shape "
                + ", ".join(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong[:5])
            )
        raise ModelError(f"{where}: weights do not match the recorded architecture: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


#: Metadata keys ``save_checkpoint`` writes itself; the others (loss, schedule, ...) are the task's.
_OWN_KEYS = {"format", "format_version", "method", "kind", "networks", "step", "data_recipe", "training",
             "optimizers", "package_version", "git_commit", "created"}


def average_checkpoints(paths: Sequence[os.PathLike], out: os.PathLike) -> Path:
    """Write the mean of several checkpoints of one model (weight averaging of a run's late steps).

    Floating-point parameters and buffers (batch-norm statistics included) are averaged; integer
    buffers and all metadata come from the last checkpoint given, plus ``averaged_steps``. The
    optimiser state is dropped: an average is for evaluation and export, not for resuming.
    Checkpoints of different methods, kinds, architectures or configurations are refused.
    """
    if len(paths) < 2:
        raise ModelError(f"averaging needs two or more checkpoints, got {len(paths)}")
    out = Path(out)
    if out.exists():
        raise ModelError(f"{out} exists; choose a new file name (nothing was written)")
    checkpoints = [load_checkpoint(p) for p in paths]
    last = checkpoints[-1]
    for other in checkpoints[:-1]:
        for key in ("method", "kind", "networks"):
            if other.metadata[key] != last.metadata[key]:
                raise ModelError(
                    f"{other.path} and {last.path} differ in {key!r}; only checkpoints of one model average"
                )
    from .models import build_model

    networks = {}
    for name, spec in last.metadata["networks"].items():
        module = build_model(spec["arch"], spec["config"])
        state = {
            key: (torch.stack([c.states[name][key].float() for c in checkpoints]).mean(0).to(value.dtype)
                  if value.is_floating_point() else value)
            for key, value in last.states[name].items()
        }
        load_state_strict(module, state, f"average:{name}")
        networks[name] = (spec["arch"], spec["config"], module)
    meta = last.metadata
    extra = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    extra["averaged_steps"] = [c.step for c in checkpoints]
    return save_checkpoint(out, method=meta["method"], kind=meta["kind"], networks=networks, step=last.step,
                           data_recipe=meta.get("data_recipe"), training=meta.get("training"), extra=extra)


def transplant_state(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """Initialise ``module`` from another network's weights where names match; returns what was left.

    Tensors of equal shape are copied. A tensor with more input channels (dimension 1) than the
    source's, equal otherwise, gets the source in its leading channels and zeros after: a stage-2
    U-Net whose first conv takes [I, masked I...] then starts out as the stage-1 network, and so
    does a CRRN whose decoder takes GiN's features beside its own. Any other mismatch raises.
    """
    own = module.state_dict()
    untouched = []
    with torch.no_grad():
        for key, target in own.items():
            source = state.get(key)
            if source is None:
                untouched.append(key)
                continue
            if source.shape == target.shape:
                target.copy_(source)
            elif (source.dim() == target.dim() >= 2 and source.shape[0] == target.shape[0]
                  and source.shape[2:] == target.shape[2:] and source.shape[1] < target.shape[1]):
                target.zero_()
                target[:, : source.shape[1]] = source
            else:
                raise ModelError(f"cannot initialise {key}: {tuple(target.shape)} from {tuple(source.shape)}")
    return untouched

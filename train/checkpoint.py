"""Checkpoints: safetensors files with JSON metadata; loading never unpickles.

Layout of a checkpoint file:

* tensors ``<network>/<parameter or buffer>`` for each network (``stage1/...``, ``generator/...``),
  and ``optim/<name>/<index>/<key>`` for optimiser state when the checkpoint is resumable;
* safetensors metadata key ``dereflect`` holding JSON: ``format``, ``format_version``,
  ``method``, ``kind``, ``networks`` (each with ``arch`` and ``config``), ``step``,
  ``data_recipe``, ``training``, ``package_version``, ``git_commit``, ``created``, the
  non-tensor part of the optimiser states, and, when known, ``max_side``: the longest side the
  networks are meant to run at (as in an export's manifest; the runtime and ``export onnx``
  take it from there).

Reading validates the file against a schema before anything is used, and every problem is a
``ModelError`` naming it: the metadata's types and required keys, each network's architecture
and config, then (``load_checkpoint``, from the safetensors header, before any tensor is read)
that every network holds exactly the tensors its architecture has, with their dtypes and
shapes, and that the optimiser state is numeric, no larger than a parameter and listed in the
metadata. Nothing else may be in the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from dereflect import __version__
from dereflect.errors import InputError, ModelError
from dereflect.imageio import staged_file
from dereflect.manifest import check_max_side, is_int, show_value
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "dereflect-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "dereflect"

#: Bounds on what a checkpoint's metadata may hold. A real one is tens of kilobytes, nests six
#: levels (optimiser param groups) and lists at most three networks (RM2S stage 2); a file far
#: past these is not one of ours, and refusing it early keeps parsing and validation cheap.
MAX_METADATA_CHARS = 16 * 1024 * 1024
MAX_METADATA_DEPTH = 64
MAX_NETWORKS = 16
MAX_CONFIG_ITEMS = 64

#: safetensors' dtype codes of the torch dtypes a network's state may hold.
_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: The dtypes optimiser state may have: numeric ones that every supported torch reads (no bool, no complex).
_NUMERIC_CODES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8"}

#: (dtype code, shape) of one tensor, as the safetensors header declares it.
TensorSpec = Tuple[str, Tuple[int, ...]]


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


@contextlib.contextmanager
def staged_safetensors(path: os.PathLike) -> Iterator[Path]:
    """:func:`~dereflect.imageio.staged_file` for a file that safetensors' ``save_file`` writes.

    safetensors (0.8) writes through a temporary file of its own, created private (0600), and renames
    it over the name given, so its files would be unreadable to anyone else where every other output
    follows the umask. The staged file is created here first, to learn the mode the umask gives a new
    file (reading the umask means setting it, for the whole process), and gets that mode back once
    written.
    """
    with staged_file(Path(path)) as staged:
        staged.touch()
        mode = stat.S_IMODE(staged.stat().st_mode)
        yield staged
        os.chmod(staged, mode)


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
    max_side: Optional[int] = None,
) -> Path:
    """Write a checkpoint atomically.

    ``networks`` maps a network name to ``(arch, config_dict, module)``. ``max_side``: the longest
    side the networks are meant to run at (None: not recorded; the runtime then uses its default).
    The file is written to a temporary name and renamed, so an interrupted save never destroys the
    previous one.
    """
    if max_side is not None:
        max_side = check_max_side(max_side)  # a plain int: the metadata is JSON
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
    if max_side is not None:
        metadata["max_side"] = max_side
    metadata.update(extra or {})
    with staged_safetensors(path) as staged:
        save_file(tensors, str(staged), metadata={METADATA_KEY: json.dumps(metadata)})
    return path


def _is_number(value: Any) -> bool:
    # JSON allows NaN and Infinity through Python's parser; a config number must be finite.
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return _cut(lines[0], 200) if lines else type(exc).__name__


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests more than ``limit`` levels (iterative: deep input cannot exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


#: Config field annotation (the config dataclasses' own, as strings) -> (check, what it must be).
#: A field with another annotation is left to the config class and the build.
_CONFIG_FIELD_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "int": (is_int, "a whole number"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "Tuple[int, ...]": (lambda v: isinstance(v, list) and len(v) <= MAX_CONFIG_ITEMS and all(map(is_int, v)),
                        f"a list of at most {MAX_CONFIG_ITEMS} whole numbers"),
}


def _check_network_spec(path: Path, name: Any, spec: Any) -> None:
    from .models import ARCHS, config_class

    if not isinstance(name, str) or not name or "/" in name or name == "optim":
        raise ModelError(f"{path}: network name {show_value(name)} is not usable (empty, holds '/' or is 'optim')")
    if not isinstance(spec, dict):
        raise ModelError(f"{path}: network {show_value(name)} must be an object with 'arch' and 'config'")
    arch = spec.get("arch")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ModelError(f"{path}: network {show_value(name)} has unknown architecture {show_value(arch)}; "
                         f"known: {', '.join(ARCHS)}")
    config = spec.get("config")
    if not isinstance(config, dict):
        raise ModelError(f"{path}: network {show_value(name)} ({arch}): 'config' must be an object, "
                         f"got {show_value(config)}")
    config_cls = config_class(arch)
    for config_field in dataclasses.fields(config_cls):
        rule = _CONFIG_FIELD_RULES.get(str(config_field.type))
        if rule and config_field.name in config and not rule[0](config[config_field.name]):
            raise ModelError(f"{path}: network {show_value(name)} ({arch}): config {config_field.name} must be "
                             f"{rule[1]}, got {show_value(config[config_field.name])}")
    try:
        config_cls.from_dict(config)
    except (InputError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: network {show_value(name)} ({arch}): config not accepted: "
                         f"{_first_line(exc)}") from exc


def _check_optimizer_spec(path: Path, name: Any, spec: Any) -> None:
    where = f"{path}: optimiser {show_value(name)}"
    if not isinstance(name, str) or not name or "/" in name:
        raise ModelError(f"{where}: name is not usable (empty or holds '/')")
    if not isinstance(spec, dict) or not isinstance(spec.get("state"), dict) \
            or not isinstance(spec.get("param_groups"), list):
        raise ModelError(f"{where} must be an object with 'state' (object) and 'param_groups' (list)")
    for index, values in spec["state"].items():
        if not (index.isascii() and index.isdigit()) or not isinstance(values, dict):
            raise ModelError(f"{where}: state entry {show_value(index)} must be a parameter index holding an object")
    for group in spec["param_groups"]:
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(is_int(p) and p >= 0 for p in params):
            raise ModelError(f"{where}: each param group must be an object whose 'params' lists parameter indices")


def _check_metadata(path: Path, metadata: Any) -> None:
    """The schema of a checkpoint's metadata; the first problem found is raised as a ModelError."""
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: checkpoint metadata must be a JSON object, got {type(metadata).__name__}")
    if metadata.get("format") != FORMAT:
        raise ModelError(f"{path}: not a dereflect checkpoint (format {show_value(metadata.get('format'))})")
    for key in ("format_version", "method", "kind", "networks", "step"):
        if key not in metadata:
            raise ModelError(f"{path}: checkpoint metadata lacks {key!r}")
    version = metadata["format_version"]
    if not is_int(version) or version < 1:
        raise ModelError(f"{path}: checkpoint format_version must be a whole number >= 1, got {show_value(version)}")
    if version > FORMAT_VERSION:
        raise ModelError(
            f"{path}: checkpoint format {version} is newer than this dereflect ({__version__}) reads; upgrade dereflect"
        )
    # The kind's spelling is the method's business (method_for_checkpoint); here it only has to be text.
    for key in ("method", "kind"):
        if not isinstance(metadata[key], str) or not metadata[key]:
            raise ModelError(f"{path}: checkpoint {key} must be a non-empty string, got {show_value(metadata[key])}")
    if not is_int(metadata["step"]) or metadata["step"] < 0:
        raise ModelError(f"{path}: checkpoint step must be a whole number >= 0, got {show_value(metadata['step'])}")
    if "max_side" in metadata:
        check_max_side(metadata["max_side"], f"{path}: checkpoint max_side", ModelError)
    for key, kind, label in (("data_recipe", dict, "an object"), ("training", dict, "an object"),
                             ("optimizers", dict, "an object"), ("package_version", str, "a string"),
                             ("git_commit", str, "a string"), ("created", str, "a string")):
        if key in metadata and not isinstance(metadata[key], kind):
            raise ModelError(f"{path}: checkpoint {key} must be {label}, got {show_value(metadata[key])}")
    networks = metadata["networks"]
    if not isinstance(networks, dict) or not networks or len(networks) > MAX_NETWORKS:
        raise ModelError(f"{path}: checkpoint networks must be an object naming 1 to {MAX_NETWORKS} networks, "
                         f"got {show_value(networks)}")
    for name, spec in networks.items():
        _check_network_spec(path, name, spec)
    for name, spec in metadata.get("optimizers", {}).items():
        _check_optimizer_spec(path, name, spec)


def _open(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable safetensors checkpoint: {_first_line(exc)}") from exc


def _read_metadata(path: Path, handle: Any) -> Dict[str, Any]:
    raw = (handle.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ModelError(f"{path} is a safetensors file but not a dereflect checkpoint (no metadata)")
    if len(raw) > MAX_METADATA_CHARS:
        raise ModelError(f"{path}: checkpoint metadata is {len(raw)} characters, more than the "
                         f"{MAX_METADATA_CHARS} a checkpoint's may take")
    too_deep = ModelError(f"{path}: checkpoint metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: checkpoint metadata is not valid JSON: {exc}") from exc
    except RecursionError:
        raise too_deep from None
    if _nests_deeper(metadata, MAX_METADATA_DEPTH):
        raise too_deep
    _check_metadata(path, metadata)
    return metadata


def read_metadata(path: os.PathLike) -> Dict[str, Any]:
    """Read and validate only the JSON metadata of a checkpoint (no tensor is read)."""
    path = Path(path)
    with _open(path) as handle:
        return _read_metadata(path, handle)


def _specs(state: Dict[str, torch.Tensor]) -> Dict[str, TensorSpec]:
    return {key: (_DTYPE_CODES.get(value.dtype, str(value.dtype)), tuple(value.shape)) for key, value in state.items()}


def _expected_tensors(path: Path, name: str, spec: Dict[str, Any]) -> Dict[str, TensorSpec]:
    """The state (dtype code and shape per tensor) the network's architecture has, built on the meta
    device: no memory and no initialisation, even for a paper-sized network."""
    from .models import build_model

    try:
        with torch.device("meta"):
            module = build_model(spec["arch"], spec["config"])
    except Exception as exc:  # the config came from the file: whatever stops the build is the file's problem
        raise ModelError(f"{path}: network {show_value(name)} ({spec['arch']}) cannot be built from its recorded "
                         f"config: {_first_line(exc)}") from exc
    return _specs(module.state_dict())


def _listed(keys: List[str]) -> str:
    # The list's repr quotes each name, so a name from the file cannot break the line.
    return f"{[_cut(k, 80) for k in keys[:3]]}{f' (+{len(keys) - 3} more)' if len(keys) > 3 else ''}"


def _tensor_mismatches(expected: Dict[str, TensorSpec], found: Dict[str, TensorSpec]) -> List[str]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    common = sorted(set(expected) & set(found))
    wrong_dtype = [k for k in common if found[k][0] != expected[k][0]]
    wrong_shape = [k for k in common if found[k][1] != expected[k][1]]
    parts = []
    if missing:
        parts.append(f"missing {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected {_listed(unexpected)}")
    if wrong_dtype:
        parts.append("wrong dtype " + ", ".join(f"{k} {found[k][0]} != {expected[k][0]}" for k in wrong_dtype[:3])
                     + (f" (+{len(wrong_dtype) - 3} more)" if len(wrong_dtype) > 3 else ""))
    if wrong_shape:
        parts.append("wrong shape " + ", ".join(f"{k} {found[k][1]} != {expected[k][1]}" for k in wrong_shape[:3])
                     + (f" (+{len(wrong_shape) - 3} more)" if len(wrong_shape) > 3 else ""))
    return parts


def _check_tensors(path: Path, metadata: Dict[str, Any], header: Dict[str, TensorSpec]) -> None:
    """Every tensor the header declares against what the metadata says the file holds."""
    networks = metadata["networks"]
    found: Dict[str, Dict[str, TensorSpec]] = {name: {} for name in networks}
    optim: Dict[str, TensorSpec] = {}
    for key, entry in header.items():
        head, _, rest = key.partition("/")
        if head == "optim":
            optim[key] = entry
        elif head in found:
            found[head][rest] = entry
        else:
            raise ModelError(f"{path}: tensor {show_value(key)} belongs to no network listed in the metadata")
    largest = 0
    for name, spec in networks.items():
        if not found[name]:
            raise ModelError(f"{path}: network {show_value(name)} is listed in the metadata but has no tensors")
        expected = _expected_tensors(path, name, spec)
        problems = _tensor_mismatches(expected, found[name])
        if problems:
            raise ModelError(f"{path}: network {show_value(name)} ({spec['arch']}): weights do not match the recorded "
                             "architecture: " + "; ".join(problems))
        largest = max([largest, *(math.prod(shape) for _, shape in expected.values())])
    optimizers = metadata.get("optimizers", {})
    for key, (dtype, shape) in optim.items():
        parts = key.split("/", 3)
        if len(parts) != 4 or parts[1] not in optimizers or parts[2] not in optimizers[parts[1]]["state"] \
                or not parts[3]:
            raise ModelError(f"{path}: tensor {show_value(key)} is not the state of an optimiser listed in the "
                             "metadata")
        if dtype not in _NUMERIC_CODES:
            raise ModelError(f"{path}: optimiser tensor {show_value(key)} has dtype {dtype}; optimiser state is "
                             f"numeric ({', '.join(sorted(_NUMERIC_CODES))})")
        # Optimiser state is per parameter (moments) or a scalar (step): never larger than a parameter.
        if math.prod(shape) > largest:
            raise ModelError(f"{path}: optimiser tensor {show_value(key)} has {math.prod(shape)} elements, more than "
                             f"the largest network tensor ({largest})")


def load_checkpoint(path: os.PathLike) -> Checkpoint:
    """Load a checkpoint's metadata and tensors (CPU) after validating both; no code is executed from the file."""
    path = Path(path)
    with _open(path) as handle:
        metadata = _read_metadata(path, handle)
        header = {}
        for key in handle.keys():
            view = handle.get_slice(key)
            header[key] = (view.get_dtype(), tuple(view.get_shape()))
        _check_tensors(path, metadata, header)
        tensors = {key: handle.get_tensor(key) for key in header}
    states: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in metadata["networks"]}
    optim_tensors: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        if head == "optim":
            optim_tensors[key] = value
        else:
            states[head][rest] = value
    optimizer_states = {
        name: _unflatten_optimizer(name, meta, optim_tensors)
        for name, meta in metadata.get("optimizers", {}).items()
    }
    return Checkpoint(metadata=metadata, states=states, optimizer_states=optimizer_states, path=path)


def load_state_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``module``, naming every missing, unexpected or mismatched tensor (in the words
    the checkpoint loader uses)."""
    problems = _tensor_mismatches(_specs(module.state_dict()), _specs(state))
    if problems:
        raise ModelError(f"{where}: weights do not match the recorded architecture: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def same_network(spec: Dict[str, Any], arch: str, config: Any) -> bool:
    """Whether a recorded network (``{"arch", "config"}``) is ``arch`` with ``config``, its config read as
    Trainer.resume reads it (a key added since the checkpoint was written takes its default)."""
    from .models import config_class

    return spec["arch"] == arch and config_class(arch).from_dict(spec["config"]).to_dict() == config.to_dict()


def load_same_network(module: torch.nn.Module, checkpoint: Checkpoint, name: str, arch: str, config: Any) -> None:
    """Load ``checkpoint``'s network ``name`` into ``module`` (an --init), which must be that very network
    (:func:`same_network`); else InputError naming the options that choose it."""
    spec = checkpoint.network_spec(name)
    if not same_network(spec, arch, config):
        raise InputError(f"--init {checkpoint.path}: its {name} network ({spec['arch']}) is not this run's network "
                         f"({arch}, the same config); choose the --config and --encoder that build it")
    load_state_strict(module, checkpoint.states[name], f"{checkpoint.path}:{name}")


#: Metadata keys ``save_checkpoint`` writes itself; the others (loss, schedule, ...) are the task's.
OWN_KEYS = {"format", "format_version", "method", "kind", "networks", "step", "data_recipe", "training",
            "optimizers", "package_version", "git_commit", "created", "max_side"}


def _write_weights(source: Checkpoint, states: Dict[str, Dict[str, torch.Tensor]], out: Path,
                   extra: Dict[str, Any]) -> Path:
    """Write ``states`` as a checkpoint of ``source``'s model, its metadata, no optimiser state."""
    from .models import build_model

    networks = {}
    for name, spec in source.metadata["networks"].items():
        module = build_model(spec["arch"], spec["config"])
        load_state_strict(module, states[name], f"{out}:{name}")
        networks[name] = (spec["arch"], spec["config"], module)
    meta = source.metadata
    kept = {k: v for k, v in meta.items() if k not in OWN_KEYS}
    kept.update(extra)
    return save_checkpoint(out, method=meta["method"], kind=meta["kind"], networks=networks, step=source.step,
                           data_recipe=meta.get("data_recipe"), training=meta.get("training"), extra=kept,
                           max_side=meta.get("max_side"))


def _new_file(out: os.PathLike) -> Path:
    out = Path(out)
    if out.exists():
        raise ModelError(f"{out} exists; choose a new file name (nothing was written)")
    return out


def average_checkpoints(paths: Sequence[os.PathLike], out: os.PathLike) -> Path:
    """Write the mean of several checkpoints of one model (weight averaging of a run's late steps).

    Floating-point parameters and buffers (batch-norm statistics included) are averaged; integer
    buffers and all metadata come from the last checkpoint given, plus ``averaged_steps``. The
    optimiser state is dropped: an average is for evaluation and export, not for resuming.
    Checkpoints of different methods, kinds, architectures or configurations are refused.
    """
    if len(paths) < 2:
        raise ModelError(f"averaging needs two or more checkpoints, got {len(paths)}")
    out = _new_file(out)
    checkpoints = [load_checkpoint(p) for p in paths]
    last = checkpoints[-1]
    for other in checkpoints[:-1]:
        for key in ("method", "kind", "networks"):
            if other.metadata[key] != last.metadata[key]:
                raise ModelError(
                    f"{other.path} and {last.path} differ in {key!r}; only checkpoints of one model average"
                )
    states = {
        name: {key: (torch.stack([c.states[name][key].float() for c in checkpoints]).mean(0).to(value.dtype)
                     if value.is_floating_point() else value)
               for key, value in state.items()}
        for name, state in last.states.items()
    }
    return _write_weights(last, states, out, {"averaged_steps": [c.step for c in checkpoints]})


def weights_only(path: os.PathLike, out: os.PathLike) -> Path:
    """Write checkpoint ``path`` without its optimiser state: about a third of the size of a
    training checkpoint, for carrying a run's result off a machine. ``--resume`` from it starts
    the optimiser afresh; evaluation and export read it as they read any checkpoint."""
    out = _new_file(out)
    source = load_checkpoint(path)
    return _write_weights(source, source.states, out, {})


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

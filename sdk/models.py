"""The one route from a model reference to a running model, for every command and the API.

A *model reference* is a bundled model's name (:data:`BUNDLED_MODELS`; ``None`` is the default,
the first), an export directory (or its ``manifest.json``), or a training checkpoint
(``.safetensors``, extra ``train``). :func:`open_source` says what it is, with the manifest
and method it runs; :func:`open_model` opens it as a :class:`~dereflect.remover.Remover`:

    remover = open_model("crrn-lite")                          # bundled, ONNX Runtime
    remover = open_model("exports/mine", backend="tensorrt")   # an export directory's engines
    remover = open_model("runs/s2/final.safetensors")          # a checkpoint, on torch

A checkpoint's manifest is made in memory by its method (networks, tensors, and the settings
its training recorded), so a stage-2 checkpoint and its export run with the same settings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from dereflect.errors import InputError, ModelError, require
from dereflect.manifest import MANIFEST_NAME, Manifest, NetworkSpec, TensorSpec, load_manifest
from dereflect.methods.base import Method, get_method, method_for_checkpoint

if TYPE_CHECKING:
    from dereflect.remover import Remover

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "models"
#: The bundled models, by name; the first is the default.
BUNDLED_MODELS = ("crrn-lite", "rm2s-lite")
ModelRef = Union[str, os.PathLike, None]


@dataclass
class ModelSource:
    """What a model reference names: ``kind`` "export" or "checkpoint", its path, manifest and method."""

    kind: str
    path: Path
    manifest: Manifest
    method: Method
    bundled: Optional[str] = None


def bundled_model_dir(name: str) -> Path:
    """The export directory of the bundled model ``name``; ModelError if unknown or not installed."""
    if name not in BUNDLED_MODELS:
        raise ModelError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)} "
                         "(or give an export directory or a checkpoint)")
    directory = BUNDLED_MODELS_DIR / name
    if not (directory / MANIFEST_NAME).is_file():
        raise ModelError(
            f"this installation lacks the bundled model {name!r} (expected {directory / MANIFEST_NAME}); "
            "pass an export directory instead, made with: dereflect export onnx CHECKPOINT -o DIR"
        )
    return directory


def resolve_model(model: ModelRef) -> Path:
    """The path a model reference names (a bundled model's export directory for its name)."""
    if model is None:
        return bundled_model_dir(BUNDLED_MODELS[0])
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"a model is a bundled model's name ({', '.join(BUNDLED_MODELS)}), an export directory "
                         f"or a checkpoint path, not {type(model).__name__} {model!r}")
    # A folder of that name that is not an export (say, a training run's) does not hide the bundled model.
    if str(model) in BUNDLED_MODELS and not (Path(model) / MANIFEST_NAME).is_file():
        return bundled_model_dir(str(model))
    return Path(model)


#: The stems of the files a training run writes (final, last, best, stepNNNNNNN): they name the moment of
#: a run, not the run, so a checkpoint named so is called after its run folder too.
RUN_CHECKPOINT_STEM = re.compile(r"^(?:final|last|best|step\d+)$")


def checkpoint_name(path: Union[str, os.PathLike]) -> str:
    """The name of the checkpoint file ``path`` when its metadata records none: its stem, or, for a stem a run
    writes (:data:`RUN_CHECKPOINT_STEM`), ``<run folder>/<stem>`` ("ft-crrn/final"), so that two runs'
    final.safetensors can be told apart in reports and exports.

    The name may hold that one "/": a caller that makes a file or folder name of it must replace it
    (``dereflect export engine``'s default folder does).
    """
    path = Path(path)
    stem = path.stem
    if RUN_CHECKPOINT_STEM.match(stem):
        # resolve(): "final.safetensors" run from inside the run folder still has that folder's name.
        run = path.resolve().parent.name
        if run:
            return f"{run}/{stem}"
    return stem


def checkpoint_manifest(path: Path, metadata: dict, method: Method) -> Manifest:
    """An in-memory manifest for a training checkpoint: its method's networks, its recorded settings and
    the side its networks are meant to run at (none recorded: the runtime's default). Its export starts
    from this one (:func:`dereflect.export.onnx_export.export_onnx` adds the files, their hashes and what
    the networks were found to take and give), so a checkpoint and its export run alike."""
    networks = {
        contract.name: NetworkSpec(
            name=contract.name, onnx="", sha256="",
            inputs=[TensorSpec(contract.input.name, contract.input.channels)],
            outputs=[TensorSpec(t.name, t.channels, value_range=t.value_range) for t in contract.outputs])
        for contract in method.networks
    }
    return Manifest(method=method.name, name=str(metadata.get("name") or checkpoint_name(path)), networks=networks,
                    directory=path.parent, settings=method.settings_from_checkpoint(metadata),
                    max_side=metadata.get("max_side"),
                    checkpoint={"file": path.name, "metadata": {k: v for k, v in metadata.items()
                                                                if k != "optimizers"}})


def open_source(model: ModelRef, check_hashes: bool = True) -> ModelSource:
    """What ``model`` names, with its manifest and method; ModelError when it is not a model."""
    path = resolve_model(model)
    bundled = str(model) if model is None or str(model) in BUNDLED_MODELS else None
    if model is None:
        bundled = BUNDLED_MODELS[0]
    if path.is_dir() or path.name == MANIFEST_NAME:
        manifest = load_manifest(path, check_hashes=check_hashes)
        return ModelSource("export", manifest.directory, manifest, get_method(manifest.method), bundled)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        require("safetensors", "train", "opening a training checkpoint")
        require("torch", "train", "opening a training checkpoint")
        from dereflect.train.checkpoint import read_metadata

        metadata = read_metadata(path)
        method = method_for_checkpoint(metadata)
        return ModelSource("checkpoint", path, checkpoint_manifest(path, metadata, method), method)
    if not path.exists():
        raise ModelError(f"model not found: {path} (give a bundled model name: {', '.join(BUNDLED_MODELS)}, "
                         f"an export directory or a training checkpoint)")
    raise ModelError(
        f"{path}: not a model; pass a bundled model name ({', '.join(BUNDLED_MODELS)}), an export directory "
        f"(with {MANIFEST_NAME}) or a training checkpoint (.safetensors)"
    )


def open_model(model: ModelRef = None, backend: Optional[str] = None, **options: Any) -> Remover:
    """``model`` as a :class:`~dereflect.remover.Remover` on ``backend``.

    Exports run on ONNX Runtime by default (TensorRT: their engines; torch: pass the training
    checkpoint the export was made from as ``checkpoint=``). Checkpoints run on torch.
    ``options`` are the Remover's and the backend's (checked: an unknown one raises InputError).
    """
    from dereflect.backends.base import backend_name
    from dereflect.remover import Remover

    source = open_source(model)
    if source.kind == "checkpoint":
        chosen = backend_name(backend or "torch")
        if chosen != "torch":
            raise InputError(f"{source.path} is a training checkpoint: it runs on the torch backend, not {backend!r}; "
                             "export it (dereflect export onnx) for the other backends")
        # The model is the checkpoint itself; these options are for running an export directory on torch.
        taken = [name for name in ("checkpoint", "verify_checkpoint") if name in options]
        if taken:
            raise InputError(f"{source.path} is a training checkpoint, opened as the model itself: leave out "
                             f"{' and '.join(taken)} (--checkpoint names the checkpoint an export directory was "
                             "made from, to run that export on torch)")
        return Remover(source.manifest, backend="torch", checkpoint=source.path, verify_checkpoint=False, **options)
    return Remover(source.manifest, backend=backend_name(backend or "onnxruntime"), **options)

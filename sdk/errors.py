"""Exceptions raised by dereflect.

Every error a user can cause (bad image, wrong model directory, missing extra) is a
``DereflectError``: the command line prints its message without a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict


class DereflectError(Exception):
    """Base class of the errors a user can cause and fix."""


class InputError(DereflectError, ValueError):
    """An image, array, file or option that cannot be used as given."""


class ModelError(DereflectError):
    """A checkpoint, export directory or engine that is missing, corrupt or mismatched."""


class MissingDependencyError(DereflectError, ImportError):
    """An optional dependency (an extra) is not installed."""


#: The install lines that say more than ``pip install 'dereflect[EXTRA]'``, by extra. "onnxruntime"
#: is no extra but a dependency of every install, which the CUDA build replaces (so it can go missing).
INSTALL_LINES: Dict[str, str] = {
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)",
    "train": "pip install 'dereflect[train]' (PyTorch; a CUDA build of it for GPU speed)",
    "trt": "pip install 'dereflect[trt]' (on a Jetson, TensorRT comes with JetPack (python3-libnvinfer), not "
           "from PyPI: use a virtual environment made with --system-site-packages, and build pycuda there with "
           "CUDA's bin folder on PATH: export PATH=/usr/local/cuda/bin:$PATH && pip install pycuda)",
}


def install_line(extra: str) -> str:
    """How to install the extra ``extra`` (see :data:`INSTALL_LINES`)."""
    return INSTALL_LINES.get(extra, f"pip install 'dereflect[{extra}]'")


def require(module: str, extra: str, what: str = "") -> ModuleType:
    """Import ``module`` or raise a MissingDependencyError with the line that installs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        purpose = f" for {what}" if what else ""
        raise MissingDependencyError(
            f"'{module}' is needed{purpose} but is not installed ({exc}). Install it with: {install_line(extra)}"
        ) from exc

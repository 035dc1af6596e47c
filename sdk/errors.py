"""Exceptions raised by dereflect.

Every error a user can cause (bad image, wrong model directory, missing extra) is a
``DereflectError``: the command line prints its message without a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class DereflectError(Exception):
    """Base class of the errors a user can cause and fix."""


class InputError(DereflectError, ValueError):
    """An image, array, file or option that cannot be used as given."""


class ModelError(DereflectError):
    """A checkpoint, export directory or engine that is missing, corrupt or mismatched."""


class MissingDependencyError(DereflectError, ImportError):
    """An optional dependency (an extra) is not installed."""


def require(module: str, extra: str, what: str = "") -> ModuleType:
    """Import ``module`` or raise a MissingDependencyError naming the pip line that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        purpose = f" for {what}" if what else ""
        raise MissingDependencyError(
            f"'{module}' is needed{purpose} but is not installed ({exc}). "
            f"Install it with: pip install 'dereflect[{extra}]'"
        ) from exc

"""dereflect: remove glass reflections from photos and video frames.

The runtime imports no torch: ``import dereflect`` needs only numpy, OpenCV and ONNX Runtime.
Training lives in ``dereflect.train`` and export in ``dereflect.export`` (extras ``train``
and ``export``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any
from typing import List as _List

from .errors import DereflectError, InputError, MissingDependencyError, ModelError

if _TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ loads these on first use
    from dereflect.models import open_model
    from dereflect.remover import Remover
    from dereflect.temporal import VideoSession

__version__ = "0.1.0"

__all__ = [
    "DereflectError",
    "InputError",
    "MissingDependencyError",
    "ModelError",
    "Remover",
    "VideoSession",
    "__version__",
    "open_model",
]


def __getattr__(name: str) -> _Any:
    # Lazy, so that ``import dereflect`` loads no backend and no OpenCV pipeline code.
    if name == "Remover":
        from dereflect.remover import Remover

        return Remover
    if name == "VideoSession":
        from dereflect.temporal import VideoSession

        return VideoSession
    if name == "open_model":
        from dereflect.models import open_model

        return open_model
    raise AttributeError(f"module 'dereflect' has no attribute {name!r}")


def __dir__() -> _List[str]:
    return sorted(set(globals()) | set(__all__))

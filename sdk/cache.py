"""The folder dereflect keeps what it makes once per machine: converted training weights
(``dereflect weights``) and TensorRT timing caches (``dereflect export engine``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DEREFLECT_CACHE``, else ``~/.cache/dereflect``."""
    env = os.environ.get("DEREFLECT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dereflect"

"""The folder dereflect keeps what it makes once per machine: converted training weights
(``dereflect weights``) and TensorRT timing caches (``dereflect export engine``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def cache_dir(folder: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``folder`` where a caller names one, else ``$DEREFLECT_CACHE``, else ``~/.cache/dereflect``."""
    if folder:
        return Path(folder).expanduser()
    env = os.environ.get("DEREFLECT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dereflect"

"""Where autoquant keeps what it caches on disk (references, HIGGS grids, the demo folder)."""

from __future__ import annotations

import os
from pathlib import Path

from ._errors import InputError


def cache_dir() -> Path:
    """``$AUTOQUANT_CACHE``, else ``~/.cache/autoquant`` -- refused (before anything is written)
    when a file sits there."""
    env = os.environ.get("AUTOQUANT_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "autoquant"
    if path.exists() and not path.is_dir():
        where = "AUTOQUANT_CACHE" if env else "the default cache folder"
        raise InputError(f"{where} {path} is a file, not a folder: point AUTOQUANT_CACHE at a "
                         f"folder (it is created if missing)")
    return path

"""Where autoquant keeps what it caches on disk (references, HIGGS grids, the demo folder)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$AUTOQUANT_CACHE``, else ``~/.cache/autoquant``."""
    return Path(os.environ.get("AUTOQUANT_CACHE") or Path.home() / ".cache" / "autoquant")

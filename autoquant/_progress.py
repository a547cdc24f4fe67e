"""Progress bars: notebook widgets where ipywidgets is installed, text bars everywhere else
(``tqdm.auto`` without ipywidgets warns "IProgress not found" in every notebook)."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm import tqdm

__all__ = ["tqdm"]

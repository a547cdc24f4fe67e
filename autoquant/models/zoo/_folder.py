"""Assembling a demo's diffusers folder: links into the package and the MiniLM package, and
JSON files written once (and again when missing or damaged)."""

from __future__ import annotations

import json
from pathlib import Path

from ... import _atomic


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def write_json_once(path: Path, data) -> None:
    """``data`` as JSON at ``path`` unless it is there already (missing or damaged: written)."""
    try:
        intact = json.loads(path.read_text()) == data
    except (OSError, ValueError):
        intact = False
    if not intact:
        _atomic.write_text(path, json.dumps(data, indent=1))

"""What every bench script shares: where it runs, and how its results are written.

Run a script from the repository root with autoquant installed (``pip install -e .``, or
``PYTHONPATH=$PWD`` on the GPU machine): ``python bench/NAME.py``. Python puts ``bench/`` first
on the path, so the scripts import these helpers (and ``_demo``, ``_flux``) directly.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def environment(device: Any = None) -> dict[str, Any]:
    """The machine and versions a result was measured with."""
    import torch

    import autoquant

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "autoquant": autoquant.__version__, "cpu": _cpu(),
                           "cores": __import__("os").cpu_count()}
    for package in ("diffusers", "hqq", "bitsandbytes", "torchao", "optuna"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = None
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (folders created); what every script's ``--json`` does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    return path

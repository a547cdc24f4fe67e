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
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = device_name(device)
    return env


def device_name(device: Any) -> str:
    """Where a result ran: a GPU by its name, else the device type ("cpu")."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


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

"""Checks of the command line's inputs that need no model: folders, devices (torch is imported
only for a device argument)."""

from __future__ import annotations

import os
from pathlib import Path

from .._errors import InputError


def writable_folder(path: str, what: str) -> Path:
    """``path`` as a folder we can write into: created if missing, and a file written there
    and removed (the only test that holds for root, read-only mounts and full disks)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {path}: a file is in the way; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".autoquant-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write there ({e.strerror or e}); pick another "
                         f"folder") from None
    return p


def writable_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{what} {path}: a folder is in the way; give a file name")
    writable_folder(str(p.parent), what)
    return p


def check_device(spec: str | None) -> None:
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {spec!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is visible on this machine; leave "
                             f"out --device to run on the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"--device {spec}: autoquant runs on cpu or cuda")


def devices_list(spec: str) -> list[str]:
    """``--devices cuda:0,cuda:1`` (any device, repeated for several workers on one) or ``all``
    (every CUDA GPU here)."""
    if spec == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise InputError("--devices all: no CUDA GPU is visible on this machine")
        return [f"cuda:{i}" for i in range(n)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise InputError(f"--devices {spec!r}: list devices, e.g. cuda:0,cuda:1, or say all")
    for d in devices:
        check_device(d)
    return devices


def image_format(path: str | Path) -> str:
    """Pillow's format name for an image path's extension (ValueError when it writes none)."""
    from PIL import Image

    Image.init()
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: Pillow cannot write {ext or 'a file without an extension'}; "
                         f"end the name with .png, .jpg, .webp or .tiff")
    return fmt

"""What several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from autoquant.models.inventory import components_of


def devices():
    """CPU always; CUDA only under the gpu marker (run through the device tool)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def generate(pipe, seed=0, steps=2, prompt="a photo of a red cat"):
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def two_images(pipe):
    """Two prompts, 2 steps, 32 px, seed 0: the export tests' images."""
    return pipe(["a red cube", "a blue ball"], num_inference_steps=2, height=32, width=32,
                output_type="pt", generator=torch.Generator().manual_seed(0)).images


def file_and_scored(pipe, loaded, recipe, component: str = "transformer"):
    """The images of ``pipe`` with ``component`` replaced by ``loaded`` (an exported file as
    its consumer loads it), and with ``recipe`` applied; the pipeline is back in full
    precision after each."""
    import autoquant

    original = getattr(pipe, component)
    setattr(pipe, component, loaded)
    try:
        from_file = two_images(pipe)
    finally:
        setattr(pipe, component, original)
    autoquant.apply_recipe(pipe, recipe, progress=False, keep_originals=True)
    try:
        scored = two_images(pipe)
    finally:
        autoquant.revert(pipe)
    return from_file, scored


def snapshot(pipe):
    """Every tensor and module type of the pipeline, to prove it was left untouched."""
    out = {}
    for cname, comp in components_of(pipe).items():
        for name, mod in comp.named_modules():
            out[f"{cname}.{name}:type"] = type(mod)
        for name, t in comp.state_dict().items():
            out[f"{cname}.{name}"] = t.clone()
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] is b[k], k


@contextlib.contextmanager
def full_disk(disk, size: str = "2m"):
    """A user who runs out of space: a small tmpfs mounted at ``disk`` (an empty folder) where
    this process may mount one, else a folder whose flushes fail with ENOSPC. Yields ``fill``:
    call it to leave (almost) no space."""
    import errno
    import os
    import subprocess

    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        from autoquant import _atomic

        real = _atomic._fsync_file

    def fill():
        if mounted:
            with open(disk / "filler", "wb", buffering=0) as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 4096)
        else:
            def enospc(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            _atomic._fsync_file = enospc
    try:
        yield fill
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        else:
            _atomic._fsync_file = real

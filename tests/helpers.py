"""What several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import pytest
import torch

from autoquant._inventory import components_of


def devices():
    """CPU always; CUDA only under the gpu marker (run through the device tool)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def generate(pipe, seed=0, steps=2, prompt="a photo of a red cat"):
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


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

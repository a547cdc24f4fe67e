"""GPU half of ``export --format comfy``: fp8_dynamic layers (quantized on a GPU when scored)
are written from fp8 weight-only's codes made on the CPU -- the same codes (no comfy-kitchen
needed here: the device machine has none)."""

from __future__ import annotations

import pytest
import torch

from autoquant.backends import get_backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs sm >= 8.9")
def test_gpu_fp8_dynamic_weights_are_fp8_weight_onlys():
    """export_tensors makes fp8_dynamic's weights with fp8 weight-only's config on the CPU:
    the same per-row codes and scales as the GPU layer that was scored."""
    from autoquant.backends.torchao import TorchaoConfig

    backend = get_backend("torchao")
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(512, 384, dtype=torch.bfloat16).requires_grad_(False)
    linear.weight.copy_(torch.randn(384, 512, generator=gen) * 0.02)
    scored = backend.quantize(linear.cuda(), TorchaoConfig(type="fp8_dynamic"),
                              torch.device("cuda")).weight
    made = backend.export_tensors(linear.cpu(), TorchaoConfig(type="fp8_dynamic"), "comfy")
    assert torch.equal(made["weight"].view(torch.uint8), scored.qdata.cpu().view(torch.uint8))
    assert torch.equal(made["weight_scale"].flatten(), scored.scale.float().cpu().flatten())

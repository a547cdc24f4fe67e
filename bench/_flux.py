"""The Flux-dev architecture with random weights, for the benchmarks that need a real-size model
(no weights can be downloaded here): FluxTransformer2DModel with Flux-dev's published config."""

from __future__ import annotations

import torch

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def flux_transformer(device: str | torch.device = "cpu", seed: int = 0, **overrides):
    """Built on ``device`` in bf16 (never a 48 GB fp32 copy); weights N(0, 0.02), biases 0, 1-D
    scales 1, drawn on the GPU when there is one (fast) and copied."""
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**{**FLUX_DEV, **overrides})
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    draw = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=draw).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, device=draw, dtype=p.dtype, generator=gen) * 0.02)
    if draw == "cuda":
        torch.cuda.synchronize()
    return model.eval().requires_grad_(False)

"""The Flux-dev architecture with random weights, for the benchmarks that need a real-size model
(no weights can be downloaded here): FluxTransformer2DModel with Flux-dev's published config,
inside a FluxPipeline with stand-in text encoders; and the timing helpers the Flux benchmarks
share."""

from __future__ import annotations

import gc

import torch

from autoquant.runtime.latency import sync, time_call  # noqa: F401  (sync: for the benches)
from autoquant.search._replay import first_sample as first_of_batch  # noqa: F401

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
    return random_init(model, device, seed)


def random_init(model, device, seed: int = 0):
    """``model`` (built on the meta device) made real on ``device``: weights N(0, 0.02), biases
    0, 1-D scales 1, drawn on the GPU when there is one (fast) and copied."""
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
        for name, b in model.named_buffers():  # e.g. CLIP's position ids
            if not b.is_floating_point():
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
    if draw == "cuda":
        torch.cuda.synchronize()
    return model.eval().requires_grad_(False)


#: Flux's text encoders as published (google/t5-v1_1-xxl, openai/clip-vit-large-patch14)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
              hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1, eos_token_id=2)


def full_size_encoders(device="cpu"):
    """T5-XXL v1.1's encoder (4.76B parameters) and CLIP-L's text model, random bf16 weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            t5 = T5EncoderModel(T5Config(**T5_XXL))
            clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    finally:
        torch.set_default_dtype(default)
    return random_init(clip, device, 1), random_init(t5, device, 2)


def block_space(candidates: list[str], objectives: str, description: str) -> str:
    """A Flux space (YAML text) with every layer of a transformer block tied -- one group per
    block, 57 in all: the benches' coarse space. ``candidates``: flow-style YAML entries."""
    lines = "\n".join(f"  - {c}" for c in candidates)
    return f"""format: autoquant-space/1
description: {description}
components: [transformer]
candidates:
{lines}
tie:
  - "re:(transformer\\\\.(?:single_)?transformer_blocks\\\\.\\\\d+)\\\\..*"
protect:
  - "re:transformer\\\\.(x_embedder|context_embedder|proj_out)"
  - "re:transformer\\\\.(time_text_embed|norm_out)\\\\..*"
fp_cap: 0.20
objectives: {objectives}
"""


FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
FLUX_SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                      max_shift=1.15, use_dynamic_shifting=True, shift=3.0)


def build_pipeline(device: torch.device, small: bool, encoders: str = "stand-in"):
    """``encoders``: ``stand-in`` (one layer each: the benches about the denoiser) or ``full``
    (T5-XXL and CLIP-L at their published sizes: the memory bench)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from autoquant.models.tiny import tiny_tokenizer

    # small: a narrow, shallow variant for checking the script on a CPU
    transformer = flux_transformer(device, **(dict(num_layers=1, num_single_layers=2,
                                                   num_attention_heads=4) if small else {}))
    if encoders == "full":
        clip, t5 = full_size_encoders(device)
    else:
        torch.manual_seed(1)
        t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=4096, d_ff=512, d_kv=64,
                                     num_layers=1, num_heads=8, decoder_start_token_id=0,
                                     pad_token_id=0, eos_token_id=2))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=768,
                                            intermediate_size=768, num_hidden_layers=1,
                                            num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768, bos_token_id=0, pad_token_id=0,
                                            eos_token_id=2))
    vae = AutoencoderKL(**FLUX_VAE)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=clip.eval(), tokenizer=tiny_tokenizer(77),
                        text_encoder_2=t5.eval(), tokenizer_2=tiny_tokenizer(512),
                        transformer=transformer)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(device=device, dtype=torch.bfloat16)
    return pipe


def allocated(device) -> int:
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def step_latency(module, call, device, repeats: int) -> float:
    """Median seconds of one denoiser call (autoquant's own timer)."""
    args, kwargs = call
    return time_call(lambda: module(*args, **kwargs), device, repeats, warmup=2)

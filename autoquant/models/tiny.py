"""Tiny, randomly initialized diffusers pipelines built in code (no download): ``tiny-flux``
(a Flux-shaped transformer with CLIP + T5 text encoders) and ``tiny-sd`` (a Stable-Diffusion-shaped
UNet). Their weights mean nothing; they exist so that tests and smoke runs exercise real diffusers
pipelines, real layer names and real generation on any machine, offline, in seconds."""

from __future__ import annotations

import torch

WORDS = ("a an the of and with in on photo picture drawing image dark light red blue green white "
         "black small large pair shirt dress coat bag boot boots sneaker sandal trouser pullover "
         "cat dog house tree car sky sea mountain portrait city night day").split()


def tiny_tokenizer(max_length: int = 16):
    """A word-level fast tokenizer (pad=0, unk=1, eos=2), built without any vocabulary file."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", model_max_length=max_length)


def _clip_text(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    # intermediate 96: its fc2 (in_features 96) cannot take group size 64 -- on purpose, so the
    # inventory's "unusable" marking is exercised by every test model.
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=64,
                         bos_token_id=0, pad_token_id=0, eos_token_id=2)
    return CLIPTextModel(cfg).eval()


def _vae(seed: int, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                         layers_per_block=1, sample_size=32, **extra).eval()


def tiny_flux(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=2))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed + 2, use_quant_conv=False,
                                                              use_post_quant_conv=False,
                                                              shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip_text(seed + 3), tokenizer=tiny_tokenizer(),
        text_encoder_2=t5.eval(), tokenizer_2=tiny_tokenizer(), transformer=transformer.eval())
    return pipe.to(dtype=dtype)


def tiny_sd(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        norm_num_groups=8, attention_head_dim=8)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_clip_text(seed + 2), tokenizer=tiny_tokenizer(),
        unet=unet.eval(), scheduler=EulerDiscreteScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)


BUILDERS = {"tiny-flux": tiny_flux, "tiny-sd": tiny_sd}

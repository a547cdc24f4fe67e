"""Full-precision reference images, generated once and cached on disk.

An image is keyed by (model, generation settings, prompt, seed):
- the model key hashes the pipeline class, the scheduler config, every component's layer names,
  shapes and dtypes, and a strided sample of 4096 values of every tensor -- a different
  checkpoint of the same architecture gets a new key;
- the settings key hashes everything passed to the pipeline except prompts, seeds and batch size.
Location: ``$AUTOQUANT_CACHE/references`` (default ``~/.cache/autoquant/references``), or the
``root`` you pass (``--cache-dir``). Files are float32 safetensors, exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._paths import cache_dir
from ._inventory import components_of
from .settings import EvalSettings


def model_key(pipe: Any) -> str:
    h = hashlib.sha256(type(pipe).__name__.encode())
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is not None:
        # private keys (``_use_default_values``: a list in set order) vary from run to run
        config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, module in components_of(pipe).items():
        for key, t in module.state_dict().items():
            if not isinstance(t, torch.Tensor):
                continue
            h.update(f"{name}.{key}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 4096)
                h.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ReferenceCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "references"

    def _path(self, model: str, settings: EvalSettings, prompt: str, seed: int) -> Path:
        item = hashlib.sha256(f"{seed}\0{prompt}".encode()).hexdigest()[:20]
        return self.root / model / settings.image_key() / f"{item}.safetensors"

    def load(self, model: str, settings: EvalSettings, prompt: str, seed: int):
        path = self._path(model, settings, prompt, seed)
        if not path.is_file():
            return None
        return load_file(str(path))["image"]

    def save(self, model: str, settings: EvalSettings, prompt: str, seed: int,
             image: torch.Tensor) -> None:
        path = self._path(model, settings, prompt, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"image": image.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"prompt": prompt, "seed": str(seed),
                            "settings": json.dumps(settings.pipeline_kwargs(), default=str)})
        tmp.replace(path)  # never a half-written reference

"""Full-precision reference images, generated once and cached on disk.

An image is keyed by (model, generation settings, prompt, seed):
- the model key hashes the pipeline class, the scheduler config, every component's layer names,
  shapes and dtypes, and a strided sample of 4096 values of every tensor -- a different
  checkpoint of the same architecture gets a new key;
- the settings key hashes everything passed to the pipeline except prompts, seeds and batch size.
Location: ``$AUTOQUANT_CACHE/references`` (default ``~/.cache/autoquant/references``), or the
``root`` you pass (``--cache-dir``). Files are float32 safetensors, exact.

A cached reference is verified on every read: readable, one float32 image of the expected shape
with values in [0, 1], written for this model, settings, prompt and seed, and matching the SHA-256
stored with it. Anything else (a truncated file, flipped bytes, a file replaced by zeros) is
regenerated, with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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


_log = logging.getLogger("autoquant")


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


class ReferenceCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "references"
        self.rejected: list[tuple[Path, str]] = []  # (file, why) found damaged, regenerated

    def _path(self, model: str, settings: EvalSettings, prompt: str, seed: int) -> Path:
        item = hashlib.sha256(f"{seed}\0{prompt}".encode()).hexdigest()[:20]
        return self.root / model / settings.image_key() / f"{item}.safetensors"

    def load(self, model: str, settings: EvalSettings, prompt: str, seed: int):
        """The cached image, or None when there is none or it does not verify."""
        path = self._path(model, settings, prompt, seed)
        if not path.is_file():
            return None
        problem = None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                image = f.get_tensor("image") if keys == ["image"] else None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            problem = f"unreadable ({type(e).__name__})"
        if problem is None:
            problem = self._problem(image, meta, model, settings, prompt, seed)
        if problem is None:
            return image
        self.rejected.append((path, problem))
        path.unlink(missing_ok=True)
        return None

    def report_rejected(self) -> None:
        """One warning line for every damaged file found so far (then forgets them)."""
        if self.rejected:
            path, why = self.rejected[0]
            more = f" (and {len(self.rejected) - 1} more)" if len(self.rejected) > 1 else ""
            _log.warning("autoquant: %d cached reference(s) did not verify and were generated "
                         "again; e.g. %s was %s%s", len(self.rejected), path, why, more)
            self.rejected = []

    @staticmethod
    def _problem(image, meta, model, settings, prompt, seed) -> str | None:
        if image is None:
            return "not a reference file"
        want = (meta.get("model"), meta.get("settings"), meta.get("prompt"), meta.get("seed"))
        if want != (model, settings.image_key(), prompt, str(seed)):
            return "for another model, setting, prompt or seed"
        if image.dtype != torch.float32 or image.dim() != 3 or image.shape[0] != 3 or (
                settings.height and tuple(image.shape[1:]) != (settings.height, settings.width)):
            return f"of the wrong shape or dtype ({tuple(image.shape)} {image.dtype})"
        if meta.get("sha256") != _digest(image):
            return "damaged (its checksum does not match)"
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            return "not an image in [0, 1]"
        return None

    def save(self, model: str, settings: EvalSettings, prompt: str, seed: int,
             image: torch.Tensor) -> None:
        path = self._path(model, settings, prompt, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = image.detach().float().cpu().contiguous()
        tmp = path.with_suffix(f".{__import__('os').getpid()}.tmp")
        save_file({"image": image}, str(tmp),
                  metadata={"model": model, "settings": settings.image_key(), "prompt": prompt,
                            "seed": str(seed), "sha256": _digest(image),
                            "pipeline_kwargs": json.dumps(settings.pipeline_kwargs(),
                                                          default=str)})
        tmp.replace(path)  # never a half-written reference

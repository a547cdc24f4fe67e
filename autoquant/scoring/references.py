"""Full-precision reference images, generated once and cached on disk.

An image is keyed by everything that can change one of its pixels:
- the model key hashes the pipeline class, the scheduler config, every component's layer names,
  shapes and dtypes (so the weights' dtype), and a strided sample of 4096 values of every tensor
  -- a different checkpoint of the same architecture gets a new key;
- the settings key hashes everything passed to the pipeline except prompts and seeds;
- the render key (:func:`render_key`) hashes where and how it runs: the device (GPU model and
  compute capability, or the CPU with its thread count), the versions of torch, diffusers and
  transformers, and torch's numerics switches (TF32, reduced-precision reductions, the enabled
  attention kernels, deterministic mode);
- the item hashes the prompt, the seed and the image's batch (its companions, in order): a
  batched bf16 matmul reduces in another order at another batch size (full precision scored
  43 dB against references made at batch size 1), so an image is reused only in its own batch.
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

from .. import _atomic
from .._atomic import save_safetensors as save_file
from .._paths import cache_dir
from ..generation.settings import EvalSettings
from ..models.inventory import components_of


def render_key(pipe: Any) -> str:
    """Hash of the machine and library state that can change a generated pixel (see above)."""
    import platform

    import diffusers
    import transformers

    device = _pipeline_device(pipe)
    facts: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "transformers": transformers.__version__, "device": device.type}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        facts.update(gpu=torch.cuda.get_device_name(index),
                     capability=list(torch.cuda.get_device_capability(index)),
                     cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                     tf32_cudnn=torch.backends.cudnn.allow_tf32,
                     bf16_reduction=torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                     fp16_reduction=torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                     sdpa=[torch.backends.cuda.flash_sdp_enabled(),
                           torch.backends.cuda.mem_efficient_sdp_enabled(),
                           torch.backends.cuda.math_sdp_enabled(),
                           torch.backends.cuda.cudnn_sdp_enabled()])
    else:
        facts.update(machine=platform.machine(), threads=torch.get_num_threads(),
                     mkldnn=torch.backends.mkldnn.is_available())
    facts.update(matmul_precision=torch.get_float32_matmul_precision(),
                 deterministic=torch.are_deterministic_algorithms_enabled())
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pipeline_device(pipe: Any) -> torch.device:
    """Where the pipeline's denoiser computes (diffusers' execution device, else its weights')."""
    for attr in ("_execution_device", "device"):
        try:
            value = getattr(pipe, attr)
        except Exception:  # diffusers' properties raise on some offload setups
            continue
        if isinstance(value, torch.device):
            return value
    for module in components_of(pipe).values():
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


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

    @staticmethod
    def _item(prompt: str, seed: int, batch) -> str:
        batch = [(prompt, seed)] if batch is None else list(batch)
        return hashlib.sha256(json.dumps([seed, prompt, batch]).encode()).hexdigest()[:20]

    def _path(self, model: str, settings: EvalSettings, prompt: str, seed: int, batch,
              render: str) -> Path:
        return (self.root / model / settings.image_key() / render /
                f"{self._item(prompt, seed, batch)}.safetensors")

    def load(self, model: str, settings: EvalSettings, prompt: str, seed: int,
             batch: list[tuple[str, int]] | None = None, render: str = "any"):
        """The cached image made in ``batch`` (the pairs it was generated with, in order) under
        ``render`` (:func:`render_key`), or None when there is none or it does not verify."""
        path = self._path(model, settings, prompt, seed, batch, render)
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
            problem = self._problem(image, meta, model, settings, prompt, seed,
                                    self._item(prompt, seed, batch), render)
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
    def _problem(image, meta, model, settings, prompt, seed, item, render) -> str | None:
        if image is None:
            return "not a reference file"
        want = (meta.get("model"), meta.get("settings"), meta.get("prompt"), meta.get("seed"),
                meta.get("item"), meta.get("render"))
        if want != (model, settings.image_key(), prompt, str(seed), item, render):
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
             image: torch.Tensor, batch: list[tuple[str, int]] | None = None,
             render: str = "any") -> None:
        path = self._path(model, settings, prompt, seed, batch, render)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = image.detach().float().cpu().contiguous()
        with _atomic.atomic_path(path) as tmp:  # never a half-written reference
            save_file({"image": image}, str(tmp),
                      metadata={"model": model, "settings": settings.image_key(),
                                "prompt": prompt, "seed": str(seed), "sha256": _digest(image),
                                "item": self._item(prompt, seed, batch), "render": render,
                                "pipeline_kwargs": json.dumps(settings.pipeline_kwargs(),
                                                              default=str)})

"""CLIP models for scoring: the demo's own, open_clip pretrained tags, or local checkpoints.

``load_clip(spec)``:
- ``"demo"``: the CLIP trained with the demo model (Fashion-MNIST), offline;
- ``"ARCH/TAG"``, e.g. ``"ViT-B-32/laion2b_s34b_b79k"``: open_clip's pretrained weights (downloaded
  by open_clip when the hub is reachable, else from its cache);
- ``"ARCH/path/to/checkpoint.pt"``: an open_clip architecture with local weights.

Every model is wrapped as :class:`Clip`, which takes images in [0, 1] (``[N, 3, H, W]``, any size)
and lists of strings, and returns L2-normalized features.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .._errors import AutoquantError, InputError

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Clip:
    """A CLIP behind one interface: ``image_features(images01)``, ``text_features(texts)``."""

    def __init__(self, name: str, model: nn.Module, image_size: int,
                 to_input: Callable[[torch.Tensor], torch.Tensor],
                 encode_text: Callable[[list[str]], torch.Tensor]):
        self.name, self.model, self.image_size = name, model.eval(), image_size
        self._to_input, self._encode_text = to_input, encode_text

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings of images in [0, 1]."""
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size),
                                          mode="bicubic", align_corners=False).clamp(0, 1)
        return nn.functional.normalize(self.model.encode_image(self._to_input(x)).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        return nn.functional.normalize(self._encode_text(list(texts)).float(), dim=-1)

    def to(self, device) -> "Clip":
        self.model.to(device)
        return self


def _demo_clip() -> Clip:
    from safetensors.torch import load_file

    from ..models.zoo import DEMO_DIR
    from ..models.zoo.models import DemoCLIP

    model = DemoCLIP()
    model.load_state_dict({k: v.float() for k, v in
                           load_file(str(DEMO_DIR / "clip.safetensors")).items()})
    return Clip("demo", model, 32, lambda x: x * 2 - 1, lambda t: model.encode_text(t))


def _open_clip(arch: str, pretrained: str) -> Clip:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip is a dependency
        raise AutoquantError("open_clip is not installed: pip install open_clip_torch") from e
    if arch not in open_clip.list_models():
        raise InputError(f"unknown open_clip architecture {arch!r}; e.g. ViT-B-32, ViT-L-14")
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # missing, offline, wrong file
        where = "local checkpoint" if os.path.exists(pretrained) else "pretrained tag"
        raise InputError(
            f"could not load CLIP {arch} with {where} {pretrained!r}: {type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]}. Without network use a local checkpoint (ARCH/path/to/ckpt), "
            f"'demo' for the demo model, or --no-clip.") from e
    tokenizer = open_clip.get_tokenizer(arch)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", _OPENAI_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", _OPENAI_STD)).view(1, 3, 1, 1)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    def to_input(x):
        return (x - mean.to(x.device)) / std.to(x.device)

    def encode_text(texts):
        return model.encode_text(tokenizer(texts).to(next(model.parameters()).device))

    return Clip(f"{arch}/{pretrained}", model, size, to_input, encode_text)


def load_clip(spec: str = "demo", device: str | torch.device = "cpu") -> Clip:
    """Load a CLIP for scoring (see the module docstring for ``spec``)."""
    if spec == "demo":
        clip = _demo_clip()
    elif "/" in spec:
        arch, _, pretrained = spec.partition("/")
        if not arch or not pretrained:  # open_clip would silently build random weights
            raise InputError(f"CLIP spec {spec!r}: name both the architecture and the "
                                 f"weights, ARCH/TAG or ARCH/path/to/checkpoint")
        clip = _open_clip(arch, pretrained)
    else:
        raise InputError(f"CLIP spec {spec!r}: use 'demo', 'ARCH/TAG' "
                             f"(e.g. ViT-B-32/laion2b_s34b_b79k) or 'ARCH/path/to/checkpoint'")
    return clip.to(device)

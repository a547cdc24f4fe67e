"""Evaluation settings: which prompts and seeds, at which resolution, steps, guidance and batch.

Each built-in model ships two prompt sets -- ``search`` (what a search scores candidates on) and
``holdout`` (never used while searching; for reporting) -- and default seeds for each. Other
models use the generic sets (``autoquant/prompts/generic-*.txt``). Users pass their own with a
prompts file (one prompt per line) and ``--seeds``.

Every image of a set starts from its own noise: the image of ``(prompt, seed)`` is generated with
``torch.Generator("cpu").manual_seed(noise_seed(prompt, seed))``. Seeding each image with the
bare seed gave every prompt of a seed the same starting latent, so 20 prompts x 2 seeds held two
distinct noises: a search fitted its plan to those two (on the demo, +4 dB on the search set
against the baseline and +0.7 dB on held-out seeds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .._errors import InputError
from ..models.builtin import generation_defaults, prompt_family

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"  # package data, beside search_spaces/
#: how an image's noise follows from its prompt and seed (part of every image's key: references
#: made under another scheme are not reused)
NOISE_SCHEME = "sha256(seed, prompt)"


def noise_seed(prompt: str, seed: int) -> int:
    """The generator seed of the image of ``(prompt, seed)``: its own noise per image, the same
    whatever the image's batch, position or device."""
    digest = hashlib.sha256(f"{int(seed)}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


#: seeds are passed on to numpy and Optuna, which take them below 2**32
MAX_SEED = 2**32 - 1

DEFAULT_SEEDS = {"search": (0, 1), "holdout": (1000, 1001)}


def read_prompts(path: str | Path) -> tuple[str, ...]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no prompts file at {path} (one prompt per line)")
    if path.stat().st_size > 2**20:
        raise InputError(f"{path} is larger than 1 MiB; a prompts file holds one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start})") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise InputError(f"{path} holds no prompts (one prompt per line)")
    return prompts


def prompt_set(model: str, name: str) -> tuple[str, ...]:
    if name not in DEFAULT_SEEDS:
        raise InputError(f"prompt set {name!r}: choose 'search' or 'holdout'")
    return read_prompts(PROMPTS_DIR / f"{prompt_family(model)}-{name}.txt")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything that decides which images are made. Images are (prompt, seed) pairs: every
    prompt with every seed, each with its own generator, so batching never changes an image."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    #: further pipeline keyword arguments (e.g. the demo's ``use_resolution_binning=False``)
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if not self.prompts:
            raise InputError("evaluation needs at least one prompt")
        if not self.seeds:
            raise InputError("evaluation needs at least one seed")
        for name in ("batch_size", "steps", "height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise InputError(f"{name.replace('_', ' ')} must be a whole number >= 1, "
                                     f"got {value!r}")
        if self.guidance is not None and not self.guidance >= 0:
            raise InputError(f"guidance must be >= 0, got {self.guidance!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED
               for s in self.seeds):
            raise InputError(f"seeds must be whole numbers from 0 to {MAX_SEED} (2**32 - 1), "
                             f"got {list(self.seeds)}")

    @classmethod
    def for_model(cls, model: str, prompt_set_name: str = "search",
                  prompts_file: str | None = None, seeds=None, steps=None, guidance=None,
                  size=None, batch_size: int = 8) -> "EvalSettings":
        defaults = generation_defaults(model)
        prompts = read_prompts(prompts_file) if prompts_file else prompt_set(model, prompt_set_name)
        extra = {k: v for k, v in defaults.items()
                 if k not in ("num_inference_steps", "guidance_scale", "height", "width")}
        return cls(prompts=prompts,
                   seeds=tuple(seeds) if seeds else DEFAULT_SEEDS[prompt_set_name],
                   steps=steps or defaults.get("num_inference_steps"),
                   guidance=guidance if guidance is not None else defaults.get("guidance_scale"),
                   height=size or defaults.get("height"), width=size or defaults.get("width"),
                   batch_size=batch_size, extra=tuple(sorted(extra.items())))

    def pairs(self) -> list[tuple[str, int]]:
        return [(p, s) for s in self.seeds for p in self.prompts]

    def pipeline_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(self.extra)
        if self.steps is not None:
            kw["num_inference_steps"] = self.steps
        if self.guidance is not None:
            kw["guidance_scale"] = self.guidance
        if self.height is not None:
            kw["height"] = self.height
        if self.width is not None:
            kw["width"] = self.width
        return kw

    def image_key(self) -> str:
        """Hash of what is passed to the pipeline but prompts and seeds, with the noise scheme
        (the batch an image is made in is part of its cache entry: see ``references``)."""
        return hashlib.sha256(json.dumps({**self.pipeline_kwargs(), "noise": NOISE_SCHEME},
                                         sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        return d

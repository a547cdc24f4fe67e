"""Load pipelines by name: a built-in (``tiny-flux``, ``tiny-sd``), a local folder, or a hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ._errors import AutoquantError
from ._tiny import BUILDERS

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def builtin_models() -> list[str]:
    return sorted([*BUILDERS, "demo"])


def generation_defaults(model: str) -> dict:
    """Keyword arguments a pipeline needs to generate sensibly (built-ins know theirs; hub and
    local pipelines use their own defaults)."""
    if model == "demo":
        from .zoo import DEMO_GENERATION

        return dict(DEMO_GENERATION)
    if model in BUILDERS:
        return {"num_inference_steps": 4, "height": 32, "width": 32}
    return {}


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers >= 0.42 takes ``dtype=`` and deprecates ``torch_dtype=``; older ones only know
    ``torch_dtype``."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise AutoquantError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def load_pipeline(model: str, dtype: str | torch.dtype | None = None,
                  revision: str | None = None, **kwargs: Any):
    """A diffusers pipeline from a built-in name, a local folder or a Hugging Face hub id.

    Weights load in ``dtype`` (default bfloat16, what Flux/SD3/Sana run in) on the CPU; apply a
    recipe with ``device="cuda"`` to quantize straight onto a GPU.
    """
    dtype = parse_dtype(dtype) or torch.bfloat16
    if model in BUILDERS:
        pipe = BUILDERS[model](dtype=dtype)
        pipe._autoquant_source = {"id": model}
        return pipe
    if model == "demo":
        from .zoo import load_demo_pipeline

        pipe = load_demo_pipeline(dtype)
        pipe._autoquant_source = {"id": "demo"}
        return pipe
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or model.startswith((".", "/", "~"))):
        raise AutoquantError(f"{model} is not a folder with a diffusers pipeline (model_index.json)")
    if local and not (path / "model_index.json").is_file():
        raise AutoquantError(f"{model} has no model_index.json: not a diffusers pipeline folder")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if local else model,
                                                 revision=revision, **dtype_kwargs(dtype), **kwargs)
    except Exception as e:
        where = "the local folder" if local else "the Hugging Face hub (or its cache)"
        raise AutoquantError(
            f"could not load {model!r} from {where}: {type(e).__name__}: {str(e)[:300]}\n"
            f"Pass a local diffusers folder, a hub id reachable from here, or a built-in model "
            f"({', '.join(builtin_models())}).") from e
    pipe._autoquant_source = {"id": str(path.resolve()) if local else model,
                              **({"revision": revision} if revision else {})}
    return pipe

"""Load pipelines by name: a built-in (``demo``, ``demo-flux``, ``tiny-flux``, ``tiny-sd``), a local folder, or a
Hugging Face hub id; and pick the dtype they compute in."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from .._compat import dtype_kwargs
from .._errors import InputError
from .._quiet import quiet_loading, quietly
from .builtin import BUILTIN_MODELS, builtin
from .source import ModelSource, set_source

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


def builtin_models() -> list[str]:
    return sorted(BUILTIN_MODELS)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """bfloat16 instructions (AVX512-BF16 or AMX) that PyTorch's CPU kernels use. Without them
    bf16 is emulated: the demo's images took 5.5x longer in bf16 than in float32 on such a CPU."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # also honours ATEN_CPU_CAPABILITY
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """``--dtype auto``: bfloat16 (what Flux, SD3 and Sana run in) on a GPU and on a CPU that
    computes it natively; float32 on a CPU that would emulate it."""
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.bfloat16


def parse_dtype(dtype: str | torch.dtype | None,
                device: str | torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise InputError(f"unknown dtype {dtype!r}; use one of {list(DTYPE_CHOICES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def load_pipeline(model: str, dtype: str | torch.dtype | None = None,
                  revision: str | None = None, device: str | torch.device | None = None,
                  **kwargs: Any):
    """A diffusers pipeline from a built-in name, a local folder or a Hugging Face hub id, on the
    CPU. ``dtype``: ``"auto"``/None picks it for ``device`` (where the pipeline will run; see
    :func:`default_dtype`). Apply a recipe with ``device="cuda"`` to quantize straight onto a GPU.
    """
    dtype = parse_dtype(dtype, device)
    source = ModelSource(id=model, revision=revision, dtype=dtype_name(dtype))
    spec = builtin(model)
    if spec is not None:
        with quiet_loading():
            pipe = spec.load(dtype)
        set_source(pipe, source)
        return pipe
    with quietly():
        from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or model.startswith((".", "/", "~"))):
        raise InputError(f"{model} is not a folder with a diffusers pipeline (model_index.json)")
    if local and not (path / "model_index.json").is_file():
        raise InputError(f"{model} has no model_index.json: not a diffusers pipeline folder")
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(path) if local else model,
                                                     revision=revision, **dtype_kwargs(dtype),
                                                     **kwargs)
    except (OSError, ValueError, ImportError) as e:
        where = "the local folder" if local else "the Hugging Face hub (or its cache)"
        raise InputError(
            f"could not load {model!r} from {where}: {type(e).__name__}: {_first_line(e)}\n"
            f"Pass a local diffusers folder, a hub id reachable from here, or a built-in model "
            f"({', '.join(builtin_models())}).") from e
    set_source(pipe, ModelSource(id=str(path.resolve()) if local else model, revision=revision,
                                 dtype=dtype_name(dtype)))
    return pipe


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The error's first line, cut at a word boundary if it is long."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."

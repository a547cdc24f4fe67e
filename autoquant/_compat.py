"""Differences between the library versions autoquant supports, in one place."""

from __future__ import annotations

from typing import Any


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """diffusers >= 0.42 takes ``dtype=`` and deprecates ``torch_dtype=``; older ones only know
    ``torch_dtype``."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}

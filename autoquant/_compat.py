"""Differences between the library versions autoquant supports, in one place."""

from __future__ import annotations

from typing import Any


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """diffusers >= 0.42 takes ``dtype=`` and deprecates ``torch_dtype=``; older ones only know
    ``torch_dtype``."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}


def pin_inductor_simd() -> None:
    """Name the CPU vector width Inductor already picks (``cpp.simdlen``), once, before compiling.

    Why: with ``simdlen`` unset, PyTorch 2.14's Inductor on an AVX512 CPU vectorizes the int8 ->
    float32 weight conversion of torchao's int8 weight-only layers with an 8-lane loop but
    16/32-lane stores, writing past the buffer (``malloc(): unaligned tcache chunk detected``,
    the process aborts). The same width, set explicitly, generates correct code
    (``tests/test_backend_contract.py::test_compiles_in_one_graph_unless_marked_eager_only``
    in float32 reproduces it). It honours ``ATEN_CPU_CAPABILITY`` as Inductor itself does."""
    from torch._inductor import config, cpu_vec_isa

    if config.cpp.simdlen is None:
        isa = cpu_vec_isa.pick_vec_isa()
        if isa:
            config.cpp.simdlen = isa.bit_width()

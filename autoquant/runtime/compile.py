"""How autoquant runs a denoiser under ``torch.compile`` (the deployment mode ``compile``).

A model that declares its repeated blocks (diffusers' ``_repeated_blocks``: Flux's double and
single transformer blocks, SD3's, ...) is compiled *regionally*, block by block, as diffusers'
``compile_repeated_blocks`` does: identical blocks share one compiled graph, so the quantized
Flux-dev transformer compiles in seconds where compiling the whole module took minutes per plan.
Blocks that differ (a mixed plan puts other layer types in some of them) each compile their own
variant; the recompile limit is raised so that no variant silently falls back to eager. Other
models compile whole, as do those whose blocks hold under 90% of the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import InputError
from ..models.inventory import chosen_components

#: regional only where the blocks hold this share of the weights: a UNet declares its attention
#: blocks, but its convolutions would stay eager -- it compiles whole
REGIONAL_SHARE = 0.9
#: ``torch.compile`` modes (None: the default). ``reduce-overhead`` and ``max-autotune`` record
#: CUDA graphs (static shapes: one graph per block variant and input shape); ``max-autotune*``
#: benchmark kernel choices while compiling (minutes)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def _mode(mode: str | None) -> str | None:
    if mode in (None, "default"):
        return None
    if mode not in COMPILE_MODES:
        raise InputError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def regions(module: nn.Module) -> list[nn.Module]:
    """The submodules compiled one by one (empty: the module compiles whole)."""
    names = set(getattr(module, "_repeated_blocks", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        return []
    held = sum(p.numel() for b in blocks for p in b.parameters())
    total = sum(p.numel() for p in module.parameters())
    return blocks if held >= REGIONAL_SHARE * total else []


def compile_module(module: nn.Module, whole: bool = False,
                   mode: str | None = None) -> list[nn.Module]:
    """Compile ``module`` in place (``nn.Module.compile``: from its next call on), regionally
    where it declares repeated blocks (``whole``: as one graph anyway), in ``torch.compile``
    ``mode`` (:data:`COMPILE_MODES`). Returns what was compiled, for :func:`uncompile`."""
    from .._compat import pin_inductor_simd

    mode = _mode(mode)
    pin_inductor_simd()
    blocks = [] if whole else regions(module)
    if not blocks:
        module.compile(dynamic=False, mode=mode)
        return [module]
    config = torch._dynamo.config
    # one cache entry per distinct block variant, at most one per block (+ slack for guards)
    limit = len(blocks) + 8
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < limit:
        setattr(config, name, limit)
    if getattr(config, "accumulated_recompile_limit", limit) < 4 * limit:
        config.accumulated_recompile_limit = 4 * limit
    for block in blocks:
        block.compile(dynamic=False, mode=mode)
        if mode in CUDA_GRAPH_MODES:
            _clone_outputs(block)
    return blocks


#: the modes that record CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _clone_outputs(block: nn.Module) -> None:
    """A block compiled with CUDA graphs returns tensors in the graph's static memory, which
    its next call -- the next block of the same kind, the same graph -- overwrites while the
    model still holds them (the residual stream): "accessing tensor output of CUDAGraphs that
    has been overwritten by a subsequent run". Each call's outputs are copied out, outside the
    compiled region (a copy of the block's activations: ~25 MB a Flux block at 1024 px)."""
    compiled_call = block._compiled_call_impl

    def call(*args, **kwargs):
        out = compiled_call(*args, **kwargs)
        return torch.utils._pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    block._compiled_call_impl = call


def uncompile(modules: list[nn.Module]) -> None:
    """Run what :func:`compile_module` compiled eagerly again."""
    for block in modules:
        block._compiled_call_impl = None


def compile_pipeline(target: Any, components: list[str] | None = None,
                     mode: str | None = None) -> list[str]:
    """Run ``components`` (default: the denoiser) under ``torch.compile`` from the next call on
    (``nn.Module.compile``, in place; block by block where the model declares repeated blocks,
    as diffusers' ``compile_repeated_blocks``). Every backend's layers compile in one graph
    unless the Methods table marks it eager-only; the first call compiles (seconds to minutes)."""
    comps = chosen_components(target, components, "to compile")
    _mode(mode)  # a bad mode fails before anything compiles
    for module in comps.values():
        compile_module(module, mode=mode)
    return list(comps)

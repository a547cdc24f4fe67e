"""Which attention kernel a denoiser runs (``autoquant apply --attention``).

diffusers routes the attention of its newer models (Flux, SD3, Sana, ...) through one dispatcher
(``ModelMixin.set_attention_backend``). PyTorch's SDPA picks FlashAttention-2 on Hopper; cuDNN's
fused attention is faster there at Flux's shapes (BENCHMARKS.md section 5). The choice changes no
weights, only the kernel (its images differ from SDPA's choice within bf16 rounding), and is set
before ``--compile``, which traces the kernel chosen.
"""

from __future__ import annotations

from typing import Any

from .._errors import InputError
from ..models.inventory import chosen_components

#: autoquant's names -> diffusers' ``AttentionBackendName`` values (PyTorch's own kernels only:
#: the others need packages PyPI does not have for every GPU -- pass diffusers' name for them)
ATTENTION_BACKENDS = {
    "native": "native",          # SDPA's own choice (FlashAttention-2 on Hopper and Ampere)
    "cudnn": "_native_cudnn",    # cuDNN's fused attention (CUDA, bf16 / fp16)
    "flash": "_native_flash",    # SDPA's FlashAttention-2 kernel, pinned
    "efficient": "_native_efficient",
    "math": "_native_math",      # the unfused reference
    "flex": "flex",              # FlexAttention (fast only under --compile)
}
#: the kernels that exist only on CUDA
CUDA_ONLY = ("cudnn", "flash", "efficient")


def backend_value(backend: str, device: str | None = "any") -> str:
    """diffusers' name for ``backend``; with ``device`` (what the model will be on: ``None`` is
    the CPU), also that the kernel runs there. Checked before any model is loaded."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = {b.value for b in AttentionBackendName}
    value = ATTENTION_BACKENDS.get(backend, backend if backend in known else None)
    if value is None:
        raise InputError(f"attention backend {backend!r}: choose one of "
                         f"{', '.join(ATTENTION_BACKENDS)} (or a diffusers AttentionBackendName)")
    if device != "any" and backend in CUDA_ONLY and not str(device or "cpu").startswith("cuda"):
        raise InputError(f"attention backend {backend!r} runs on CUDA: pass --device cuda "
                         "(or choose native)")
    return value


def _processors(module) -> list:
    """The attention processors of ``module`` that go through diffusers' dispatcher."""
    return [m.processor for m in module.modules()
            if getattr(getattr(m, "processor", None), "_attention_backend", "absent") != "absent"]


def set_attention(target: Any, backend: str, components: list[str] | None = None) -> list[str]:
    """Run the attention of ``components`` (default: the denoiser) of a pipeline or model through
    ``backend`` (a key of :data:`ATTENTION_BACKENDS`, or a diffusers ``AttentionBackendName``
    value). Validated before anything changes; returns the components set."""
    comps = chosen_components(target, components, "to set attention on")
    value = backend_value(backend)
    for name, module in comps.items():
        if not hasattr(module, "set_attention_backend") or not _processors(module):
            raise InputError(f"{name} ({type(module).__name__}) does not route its attention "
                             "through diffusers' dispatcher; --attention applies to Flux, SD3, "
                             "Sana and the other models diffusers moved to it")
        if backend in CUDA_ONLY:
            device = next(module.parameters()).device
            if device.type != "cuda":
                raise InputError(f"attention backend {backend!r} runs on CUDA; {name} is on "
                                 f"{device}: pass --device cuda (or choose native)")
    for name, module in comps.items():
        try:
            module.set_attention_backend(value)
        except (RuntimeError, ValueError) as err:  # diffusers: a package it needs is missing
            raise InputError(f"attention backend {backend!r}: {err}") from err
    return list(comps)

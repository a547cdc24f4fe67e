"""LoRA on quantized layers: peft adapters on a pipeline autoquant quantized (QLoRA style: the
quantized weights frozen, gradients through every backend's layer into the adapter).

peft's own dispatch takes most of autoquant's layers (nn.Linear subclasses, hqq's HQQLinear,
bitsandbytes' layers); a backend whose layer peft refuses declares a LoRA layer for it
(:meth:`autoquant.backends.Backend.lora_layers`), registered on the config with peft's
custom-module hook (``LoraConfig._register_custom_module``, experimental in peft; tested
against peft 0.21). ``peft`` is the ``lora`` extra.
"""

from __future__ import annotations

from typing import Any

from .._errors import InputError
from ..backends import get_backend, methods
from ..models.inventory import components_of


def lora_config(**kwargs: Any):
    """A ``peft.LoraConfig(**kwargs)`` that can wrap every quantized layer autoquant makes."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise InputError("LoRA needs peft: pip install 'autoquant[lora]'") from None
    return register_lora_layers(LoraConfig(**kwargs))


def register_lora_layers(config):
    """Register the backends' LoRA layers on ``config`` (a ``peft.LoraConfig``); returns it."""
    mapping: dict[type, type] = {}
    for method in methods():
        mapping.update(get_backend(method).lora_layers())
    if mapping:
        config._register_custom_module(mapping)
    return config


def add_lora(target: Any, config, adapter_name: str = "default",
             component: str = "transformer") -> Any:
    """Add a LoRA adapter to ``component`` of a pipeline (or to a module), its quantized layers
    included; returns the module. Only the adapter's parameters train."""
    comps = components_of(target)
    module = comps.get("") if "" in comps else comps.get(component)
    if module is None:
        raise InputError(f"no component {component!r}; this pipeline has {sorted(comps)}")
    register_lora_layers(config)
    if hasattr(module, "add_adapter"):  # diffusers models (PeftAdapterMixin)
        module.add_adapter(config, adapter_name=adapter_name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    return module


__all__ = ["lora_config", "register_lora_layers", "add_lora"]

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
from ..models.inventory import component_named, components_of


def lora_config(**kwargs: Any):
    """A ``peft.LoraConfig(**kwargs)`` that can wrap every quantized layer autoquant makes."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise InputError("LoRA needs peft: pip install 'autoquant[lora]'") from None
    return register_lora_layers(LoraConfig(**kwargs))


def register_lora_layers(config):
    """Register the backends' LoRA layers on ``config`` (a ``peft.LoraConfig``); returns it."""
    import importlib.util

    mapping: dict[type, type] = {}
    for method in methods():
        backend = get_backend(method)
        if backend.package and importlib.util.find_spec(backend.package[0]) is None:
            continue  # no layers of it can exist
        mapping.update(backend.lora_layers())
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


#: the LoraConfig fields read from a LoRA file's saved config
_CONFIG_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
                  "exclude_modules", "use_dora", "use_rslora", "lora_bias", "fan_in_fan_out")


def load_lora_weights(pipe: Any, source: Any, adapter_name: str | None = None,
                      component: str = "transformer", **kwargs: Any) -> str:
    """``pipe.load_lora_weights(source)`` for a pipeline autoquant quantized, on every method's
    layers: diffusers reads and converts the LoRA (``lora_state_dict``: its file formats and
    key converters) and makes the adapter's config (``get_peft_kwargs``), the adapter goes on
    through :func:`add_lora` (the backends' LoRA layers: HIGGS included, merging refused on
    quantized layers) and peft loads its weights. Returns the adapter's name; diffusers'
    ``set_adapters`` / ``disable_lora`` / ``unload_lora_weights`` work on it as on their own.

    ``pipe.load_lora_weights`` itself works on the layers peft dispatches (hqq, torchao, GGUF,
    bitsandbytes), with peft's layers: their ``fuse_lora`` is peft's (it re-quantizes hqq
    layers, refuses torchao's, fails on GGUF's).
    """
    try:
        from diffusers.utils.peft_utils import get_adapter_name, get_peft_kwargs
        from peft import set_peft_model_state_dict
    except ImportError:
        raise InputError("LoRA needs peft: pip install 'autoquant[lora]'") from None
    module = component_named(pipe, component)
    if not hasattr(type(pipe), "lora_state_dict"):
        raise InputError(f"{type(pipe).__name__} has no LoRA loader (diffusers' "
                         f"lora_state_dict)")
    state, alphas, metadata = type(pipe).lora_state_dict(source, return_alphas=True,
                                                         return_lora_metadata=True, **kwargs)
    prefix = f"{component}."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # the adapter's LoraConfig as saved (save_lora_weights' *_lora_adapter_metadata): its
    # alphas, patterns, ... -- without it diffusers' convention, alpha = rank
    metadata = {k[len(prefix):]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    if not state:
        raise InputError(f"the LoRA has no weights for {component}")
    if any("lora_A" not in k and "lora_B" not in k for k in state):
        odd = next(k for k in state if "lora_A" not in k and "lora_B" not in k)
        raise InputError(f"the LoRA holds {odd!r}, not a LoRA weight autoquant loads (LoRA "
                         f"A/B matrices only)")
    names = {n for n, _ in module.named_modules()}
    targets = sorted({k.split(".lora_")[0] for k in state})
    absent = [t for t in targets if t not in names]
    if absent:  # before the model is touched
        raise InputError(f"the LoRA is for layers {component} lacks: {absent[0]}"
                         f"{f' and {len(absent) - 1} more' if len(absent) > 1 else ''} (a LoRA "
                         f"of another model?)")
    alphas = {k[len(prefix):]: v for k, v in (alphas or {}).items() if k.startswith(prefix)}
    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    adapter_name = adapter_name or get_adapter_name(module)
    if adapter_name in getattr(module, "peft_config", {}):
        raise InputError(f"adapter {adapter_name!r} is already loaded: pick another name")
    # a file's config is untrusted: only the fields that shape the adapter are read (not,
    # e.g., init_lora_weights="pissa", which would rewrite the base layers)
    kwargs_ = {k: v for k, v in metadata.items() if k in _CONFIG_FIELDS} if metadata else \
        get_peft_kwargs(ranks, alphas or None, state, is_unet=False, adapter_name=adapter_name)
    try:
        config = lora_config(**kwargs_)
    except TypeError as e:
        raise InputError(f"the LoRA's saved config is not a LoraConfig this peft reads: "
                         f"{str(e)[:160]}") from None
    add_lora(pipe, config, adapter_name=adapter_name, component=component)
    result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise InputError(f"the LoRA holds weights of layers {component} lacks, e.g. "
                         f"{unexpected[0]}")
    return adapter_name


__all__ = ["lora_config", "register_lora_layers", "add_lora", "load_lora_weights"]

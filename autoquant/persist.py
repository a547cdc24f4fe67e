"""Save a quantized pipeline and load it back without quantizing again.

A saved folder holds ``recipe.yaml`` (the plan, the base model's id and fingerprint) and
``quantized.safetensors``: for each quantized layer, the tensors its backend exports (hqq: packed
codes + encoded metadata; bitsandbytes: its state dict with quant state; torchao: the tensor
subclass flattened with torchao's safetensors support) plus a JSON header with the layer's config.
Loading builds the base pipeline (built-in, local folder or hub id), checks the fingerprint, and
rebuilds each quantized layer from its tensors: outputs are bit-identical to the saved pipeline.
Layers the recipe left in full precision come from the base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._errors import AutoquantError
from ._modules import swap_module
from ._state import AppliedState, applied_state, set_applied, source_of
from .apply import _split
from .backends import config_from_dict, get_backend
from ._inventory import components_of, inventory
from .recipe import Recipe, load_recipe

TENSORS = "quantized.safetensors"
RECIPE = "recipe.yaml"


def save_quantized(target: Any, directory: str | Path) -> Path:
    """Write a pipeline (or module) quantized by :func:`apply_recipe` to ``directory``."""
    state = applied_state(target)
    if state is None:
        raise AutoquantError("this pipeline was not quantized by autoquant.apply_recipe; "
                             "apply a recipe first, then save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    comps = components_of(target)
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for name, cfg in state.configs.items():
        if cfg.full_precision:
            continue
        comp, path = _split(name, comps)
        module = comps[comp].get_submodule(path)
        layer_tensors, meta = get_backend(cfg.method).export_state(module)
        for key, value in layer_tensors.items():
            tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous().clone()
        header[name] = {"config": cfg.to_dict(), "meta": meta}
    save_file(tensors, str(directory / TENSORS),
              metadata={"autoquant": json.dumps(header), "format": "autoquant-quantized/1"})
    recipe: Recipe = state.recipe or Recipe(layers=dict(state.configs))
    source = source_of(target)
    recipe = Recipe(**{**recipe.__dict__,
                       "model": {**(recipe.model or {}), **(source.to_dict() if source else {}),
                                 "fingerprint": state.fingerprint}})
    recipe.save(directory / RECIPE)
    return directory


def load_quantized(directory: str | Path, base: Any = None, device: str | torch.device = "cpu"):
    """Load what :func:`save_quantized` wrote. ``base``: the full-precision pipeline/module to put
    the layers into (default: load it from the recipe's model id)."""
    from .pipelines import load_pipeline

    directory = Path(directory)
    if not (directory / TENSORS).is_file() or not (directory / RECIPE).is_file():
        raise AutoquantError(f"{directory} is not a saved autoquant pipeline "
                             f"(needs {RECIPE} and {TENSORS})")
    recipe = load_recipe(directory / RECIPE)
    if base is None:
        if not recipe.model or not recipe.model.get("id"):
            raise AutoquantError(f"{directory / RECIPE} names no base model; pass base=...")
        base = load_pipeline(recipe.model["id"], dtype=recipe.model.get("dtype"),
                             revision=recipe.model.get("revision"))
    inv = inventory(base)
    expected = (recipe.model or {}).get("fingerprint")
    if expected and expected != inv.fingerprint():
        raise AutoquantError(f"the base model's fingerprint {inv.fingerprint()} differs from the "
                             f"saved one {expected}: wrong base model")
    from safetensors import safe_open

    with safe_open(str(directory / TENSORS), framework="pt") as f:
        header = json.loads(f.metadata()["autoquant"])
    flat = load_file(str(directory / TENSORS))
    device = torch.device(device)
    comps = components_of(base)
    built = {}
    for name, entry in header.items():
        cfg = config_from_dict(entry["config"])
        layer = inv[name]
        prefix = f"{name}/"
        layer_tensors = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        built[name] = get_backend(cfg.method).import_state(
            cfg, layer.out_features, layer.in_features, layer.bias, layer.dtype, layer_tensors,
            entry["meta"], device)
    for name, module in built.items():
        swap_module(comps[inv[name].component], inv[name].path, module)
    for comp in comps.values():
        comp.to(device)
    configs = {name: config_from_dict(e["config"]) for name, e in header.items()}
    set_applied(base, AppliedState(configs=configs, fingerprint=inv.fingerprint(), recipe=recipe))
    return base

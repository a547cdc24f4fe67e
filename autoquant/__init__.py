"""autoquant: search per-layer, cross-backend quantization plans for diffusion pipelines.

Public surface::

    pipe = autoquant.load_pipeline("black-forest-labs/FLUX.1-dev")   # or a folder, or demo
    recipe = autoquant.load_recipe("plan.yaml")
    summary = autoquant.apply_recipe(pipe, recipe, device="cuda")
    autoquant.save_quantized(pipe, "flux-q/"); pipe = autoquant.load_quantized("flux-q/")

    search = autoquant.Search(autoquant.SearchConfig(model="demo", budget="30%",
                                                     space=autoquant.load_space("default")), pipe)
    report = autoquant.run_search(search)

Names are imported on first use (``import autoquant`` loads neither torch nor diffusers), and
the submodules ``autoquant.zoo``, ``autoquant.explore``, ``autoquant.search`` are reachable as
attributes.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "AutoquantError": "._errors", "InputError": "._errors", "BackendUnavailableError": "._errors",
    "BackendError": "._errors", "ConfigError": "._errors", "RecipeError": "._errors",
    "SpaceError": "._errors", "NonFiniteError": "._errors",
    "ApplySummary": ".apply", "apply_recipe": ".apply", "revert": ".apply",
    "compile_pipeline": ".apply",
    "Clip": ".clip", "load_clip": ".clip",
    "EvalResult": ".evaluator", "Evaluator": ".evaluator", "EvalSettings": ".settings",
    "noise_seed": ".settings",
    "QuantConfig": ".backends", "config_from_dict": ".backends", "get_backend": ".backends",
    "methods": ".backends",
    "Inventory": "._inventory", "LayerInfo": "._inventory", "inventory": "._inventory",
    "components_of": "._inventory",
    "load_quantized": ".persist", "save_quantized": ".persist",
    "load_pipeline": ".pipelines", "builtin_models": ".pipelines",
    "Plan": ".recipe", "Recipe": ".recipe", "load_recipe": ".recipe",
    "Search": ".search", "SearchConfig": ".search", "run_search": ".search",
    "SearchSpace": ".space", "load_space": ".space",
    "applied_state": "._state",
    "calibrate": ".calibration",
}
_SUBMODULES = ("zoo", "explore", "search", "backends", "space", "recipe", "apply", "persist",
               "evaluator", "settings", "metrics", "clip", "pipelines", "cli", "calibration")

__all__ = sorted([*_EXPORTS, "RECIPE_FORMAT", "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name == "RECIPE_FORMAT":
        value = importlib.import_module(".recipe", __name__).FORMAT
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES, "RECIPE_FORMAT"])

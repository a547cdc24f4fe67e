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
attributes. The package's rooms and what each may import: README, "Layout".
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "AutoquantError": "._errors", "InputError": "._errors", "BackendUnavailableError": "._errors",
    "BackendError": "._errors", "ConfigError": "._errors", "RecipeError": "._errors",
    "SpaceError": "._errors", "NonFiniteError": "._errors",
    "ApplySummary": ".plans.apply", "apply_recipe": ".plans.apply", "revert": ".plans.apply",
    "compile_pipeline": ".runtime.compile", "set_attention": ".runtime.attention",
    "Clip": ".scoring.clip", "load_clip": ".scoring.clip",
    "EvalResult": ".scoring.evaluator", "Evaluator": ".scoring.evaluator",
    "EvalSettings": ".generation.settings", "noise_seed": ".generation.settings",
    "QuantConfig": ".backends", "config_from_dict": ".backends", "get_backend": ".backends",
    "methods": ".backends",
    "Inventory": ".models.inventory", "LayerInfo": ".models.inventory",
    "inventory": ".models.inventory", "components_of": ".models.inventory",
    "load_quantized": ".plans.persist", "save_quantized": ".plans.persist",
    "load_pipeline": ".models.pipelines", "builtin_models": ".models.pipelines",
    "Plan": ".plans.recipe", "Recipe": ".plans.recipe", "load_recipe": ".plans.recipe",
    "Search": ".search", "SearchConfig": ".search", "run_search": ".search",
    "SearchSpace": ".search.space", "load_space": ".search.space",
    "applied_state": ".plans.applied",
    "calibrate": ".generation.calibration",
}

#: module paths of 0.2 -> where the module lives now. ``import autoquant.recipe`` (and every other
#: old path) gives the very module object of the new path, so code, pickles and monkeypatches
#: written against 0.2 keep working.
MOVED = {
    "recipe": "plans.recipe", "patterns": "plans.patterns", "apply": "plans.apply",
    "persist": "plans.persist", "_state": "plans.applied", "_yaml": "plans.strict_yaml",
    "_modules": "plans.swap",
    "evaluator": "scoring.evaluator", "references": "scoring.references",
    "metrics": "scoring.metrics", "clip": "scoring.clip", "baseline": "scoring.baseline",
    "settings": "generation.settings", "calibration": "generation.calibration",
    "_embeddings": "generation.embeddings",
    "memory": "runtime.memory", "latency": "runtime.latency", "_compile": "runtime.compile",
    "_streaming": "runtime.streaming",
    "pipelines": "models.pipelines", "builtin_models": "models.builtin",
    "_inventory": "models.inventory", "_tiny": "models.tiny",
    "zoo": "models.zoo", "zoo.models": "models.zoo.models", "zoo.data": "models.zoo.data",
    "zoo.captions": "models.zoo.captions", "zoo.train_demo": "models.zoo.train_demo",
    "space": "search.space", "allocate": "search.allocate",
    "_bytes": "backends.measure", "_cli_parser": "cli.parser", "_cli_checks": "cli.checks",
}
_SUBMODULES = ("zoo", "explore", "search", "backends", "space", "recipe", "apply", "persist",
               "evaluator", "settings", "metrics", "clip", "pipelines", "cli", "calibration",
               "models", "plans", "runtime", "scoring", "generation")

__all__ = sorted([*_EXPORTS, "RECIPE_FORMAT", "__version__"])


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``autoquant.<old path>`` (and anything below an old package path, e.g.
    ``autoquant.zoo.x``) and hands back the module at its new path. First on ``sys.meta_path``:
    the ordinary finder would load a second copy of a module below a moved package."""

    @staticmethod
    def new_name(fullname: str) -> str | None:
        prefix, _, rest = fullname.partition(".")
        if prefix != __name__:
            return None
        head, tail = rest, ""
        while head:
            if head in MOVED:
                return f"{__name__}.{MOVED[head]}{tail}"
            head, _, last = head.rpartition(".")
            tail = f".{last}{tail}"
        return None

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if self.new_name(fullname) else None

    def create_module(self, spec):
        return None  # a placeholder the import system makes; exec_module swaps it out

    def exec_module(self, module):
        real = importlib.import_module(self.new_name(module.__name__))
        sys.modules[module.__name__] = real  # the import statement returns what is here


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name == "RECIPE_FORMAT":
        value = importlib.import_module(".plans.recipe", __name__).FORMAT
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value



def __dir__():
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES, "RECIPE_FORMAT"])

"""autoquant: search per-layer, cross-backend quantization plans for diffusion pipelines.

Public surface::

    pipe = autoquant.load_pipeline("black-forest-labs/FLUX.1-dev")   # or a folder, or tiny-flux
    recipe = autoquant.load_recipe("plan.yaml")
    summary = autoquant.apply_recipe(pipe, recipe, device="cuda")
    autoquant.save_quantized(pipe, "flux-q/"); pipe = autoquant.load_quantized("flux-q/")
"""

from ._errors import AutoquantError, BackendUnavailableError, ConfigError, RecipeError
from .apply import ApplySummary, apply_recipe
from .backends import QuantConfig, config_from_dict, get_backend, methods
from .clip import Clip, load_clip
from .evaluator import EvalResult, Evaluator
from .settings import EvalSettings
from .inventory import Inventory, LayerInfo, inventory
from .persist import load_quantized, save_quantized
from .pipelines import load_pipeline
from .recipe import FORMAT as RECIPE_FORMAT
from .recipe import Plan, Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "AutoquantError", "BackendUnavailableError", "ConfigError", "RecipeError",
    "ApplySummary", "apply_recipe", "Clip", "load_clip", "EvalResult", "Evaluator",
    "EvalSettings", "QuantConfig", "config_from_dict", "get_backend", "methods",
    "Inventory", "LayerInfo", "inventory", "load_quantized", "save_quantized", "load_pipeline",
    "RECIPE_FORMAT", "Plan", "Recipe", "load_recipe", "__version__",
]

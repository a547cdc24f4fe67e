"""The models autoquant knows by name: how to load each, how it generates by default, which prompt
sets and which CLIP score it. Everything else (a local folder, a hub id) uses the generic prompt
sets, the pipeline's own call defaults, and needs ``--clip`` for CLIP metrics."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    #: ``load(dtype)`` -> a diffusers pipeline on the CPU
    load: Callable[[Any], Any]
    #: keyword arguments of the pipeline's ``__call__`` that make sensible images
    generation: Mapping[str, Any]
    #: prompt files ``autoquant/prompts/<family>-{search,holdout}.txt``
    prompt_family: str = "generic"
    #: the CLIP that scores it by default (``load_clip`` spec), None: pass ``--clip``
    clip: str | None = None
    #: the same call for the stock diffusers class an export names (None: ``generation``)
    stock_generation: Mapping[str, Any] | None = None


def _demo(dtype):
    from .zoo import load_demo_pipeline

    return load_demo_pipeline(dtype)


def _demo_flux(dtype):
    from .zoo.flux import load_demo_flux_pipeline

    return load_demo_flux_pipeline(dtype)


def _tiny(name):
    def load(dtype):
        from .tiny import BUILDERS

        return BUILDERS[name](dtype=dtype)
    return load


def _demo_generation() -> Mapping[str, Any]:
    from .zoo import DEMO_GENERATION  # a plain dict, no heavy imports

    return MappingProxyType(dict(DEMO_GENERATION))


def _demo_flux_generation() -> Mapping[str, Any]:
    from .zoo.flux import DEMO_FLUX_GENERATION  # a plain dict, no heavy imports

    return MappingProxyType(dict(DEMO_FLUX_GENERATION))


def _demo_flux_stock() -> Mapping[str, Any]:
    from .zoo.flux import STOCK_FLUX_KWARGS

    return MappingProxyType(dict(STOCK_FLUX_KWARGS))


_TINY_GENERATION = MappingProxyType({"num_inference_steps": 4, "height": 32, "width": 32})

BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel("demo", "the demo text-to-image model this project trains and ships "
                 "(PixArt format, Fashion-MNIST, 32 px)", _demo, _demo_generation(),
                 prompt_family="demo", clip="demo"),
    BuiltinModel("demo-flux", "the Flux-architecture demo this project trains and ships "
                 "(FluxPipeline: 2 double + 2 single blocks, Fashion-MNIST, 32 px)", _demo_flux,
                 _demo_flux_generation(), prompt_family="demo", clip="demo",
                 stock_generation=_demo_flux_stock()),
    BuiltinModel("tiny-flux", "a tiny Flux-shaped pipeline with random weights (tests, smoke runs)",
                 _tiny("tiny-flux"), _TINY_GENERATION),
    BuiltinModel("tiny-sd", "a tiny Stable-Diffusion-shaped pipeline with random weights",
                 _tiny("tiny-sd"), _TINY_GENERATION),
)}


def builtin(name: str) -> BuiltinModel | None:
    return BUILTIN_MODELS.get(name)


def generation_defaults(model: str) -> dict[str, Any]:
    """Keyword arguments a pipeline needs to generate sensibly (built-ins know theirs; hub and
    local pipelines use their own defaults)."""
    spec = builtin(model)
    return dict(spec.generation) if spec else {}


def stock_generation(model: str) -> dict[str, Any]:
    """The call arguments of the stock diffusers pipeline class for built-in ``model`` (what a
    model card's snippet passes; {} for a model that is not built in)."""
    spec = builtin(model)
    if spec is None:
        return {}
    return dict(spec.stock_generation if spec.stock_generation is not None else spec.generation)


def prompt_family(model: str) -> str:
    spec = builtin(model)
    return spec.prompt_family if spec else "generic"


def default_clip(model: str) -> str | None:
    spec = builtin(model)
    return spec.clip if spec else None

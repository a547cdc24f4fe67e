"""What the demo benchmarks share: the pipeline, its CLIP, the held-out evaluator, the search
settings and the uniform baselines scored on the held-out set."""

from __future__ import annotations

import torch

import autoquant
from autoquant.backends import config_from_dict
from autoquant.scoring.baseline import baseline_recipe
from autoquant.generation.settings import EvalSettings


def search_settings(seeds=(0,), model: str = "demo") -> EvalSettings:
    """A demo's 20 search prompts x ``seeds`` (seed 0 unless told: the benches' long-standing
    setting; the search's own default is seeds 0 and 1), 20 images a batch."""
    return EvalSettings.for_model(model, "search", seeds=list(seeds), batch_size=20)


def demo_bench(baselines: dict[str, dict], device: str = "cpu", model: str = "demo"):
    """``(pipe, clip, holdout evaluator, {name: held-out EvalResult of the uniform baseline})``
    for ``model`` (``demo`` or ``demo-flux``), all on ``device`` (the pipeline in the dtype
    ``--dtype auto`` picks there)."""
    from _offline_text import install_from_env

    install_from_env()  # AUTOQUANT_DEMO_TEXT: the text encoder's states from a table (GPU machine)
    torch.manual_seed(0)
    pipe = autoquant.load_pipeline(model, device=device).to(device)
    clip = autoquant.load_clip("demo", device)  # both demos are scored by the demo CLIP
    holdout = autoquant.Evaluator(pipe, EvalSettings.for_model(model, "holdout"), clip=clip,
                                  progress=False)
    inv = autoquant.inventory(pipe)
    base = {}
    for name, c in baselines.items():  # {"protect": "default"} keeps the usual layers (--protect)
        c = dict(c)
        protect = c.pop("protect", "none")
        base[name] = holdout.evaluate(baseline_recipe(inv, config_from_dict(c), ["transformer"],
                                                      protect=protect, model={"id": model}),
                                      name)
    return pipe, clip, holdout, base

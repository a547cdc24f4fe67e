"""Does a searched plan fit its prompts, or the noise of its seeds? Scores ``hqq4 + protect`` and
a recipe on four sets: the search prompts and the held-out prompts, each with the search seeds
(0, 1) and with the held-out seeds (1000, 1001). A plan whose PSNR follows the seeds rather than
the prompts has fitted its search set's noise (BENCHMARKS section 7).

    python bench/noise_fit.py RECIPE.yaml [--json bench/results/noise_fit.json]
"""

from __future__ import annotations

import argparse
import sys

import autoquant
from autoquant.backends import config_from_dict
from autoquant.scoring.baseline import baseline_recipe
from autoquant.generation.settings import EvalSettings

from _common import write_json
from _demo import demo_bench

SETS = {"search prompts, seeds 0-1": ("search", [0, 1]),
        "search prompts, seeds 1000-1001": ("search", [1000, 1001]),
        "held-out prompts, seeds 0-1": ("holdout", [0, 1]),
        "held-out prompts, seeds 1000-1001": ("holdout", [1000, 1001])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    pipe, clip, _, _ = demo_bench({})
    recipes = {"hqq4 + protect": baseline_recipe(
                   autoquant.inventory(pipe), config_from_dict({"method": "hqq", "bits": 4}),
                   ["transformer"], protect="default"),
               "recipe": autoquant.load_recipe(args.recipe)}
    out = {}
    for label, (prompts, seeds) in SETS.items():
        ev = autoquant.Evaluator(pipe, EvalSettings.for_model("demo", prompts, seeds=seeds,
                                                              batch_size=20),
                                 clip=clip, progress=False)
        for name, recipe in recipes.items():
            out.setdefault(name, {})[label] = ev.evaluate(recipe, name).metrics["psnr"]["mean"]
    for name, row in out.items():
        print(name, " | ".join(f"{k}: {v:.2f}" for k, v in row.items()))
    if args.json:
        write_json(args.json, {"recipe": args.recipe, "psnr": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())

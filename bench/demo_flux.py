"""Measurements of the Flux demo (``demo-flux``): sample quality (class accuracy of its images by
the shipped classifier and by the demo CLIP zero-shot, images per second on this CPU), uniform
baselines at 8/4/3/2 bits on the held-out prompts, the per-layer sensitivity spread, and one
search at uniform hqq4's bytes against hqq4 and hqq4 + protect.

    python bench/demo_flux.py [--seeds 4] [--trials 12] [--json bench/results/demo_flux.json] [--grid docs/demo_flux_samples.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import autoquant
from autoquant._format import human_bytes, table
from autoquant.models.zoo.captions import CLASSES, HOLDOUT_TEMPLATES, captions_for, class_prompts
from autoquant.models.zoo.flux import DEMO_FLUX_GENERATION, train_log
from autoquant.models.zoo.models import load_classifier
from autoquant.search import Search, SearchConfig, run_search

from _common import environment, write_json
from _demo import demo_bench, search_settings

MODEL = "demo-flux"
BASELINES = {
    "hqq8": {"method": "hqq", "bits": 8}, "hqq4": {"method": "hqq", "bits": 4},
    "hqq3": {"method": "hqq", "bits": 3}, "hqq2": {"method": "hqq", "bits": 2},
    "bnb-nf4": {"method": "bnb", "bits": 4, "type": "nf4"},
    "torchao-int8": {"method": "torchao", "type": "int8"},
    "higgs4": {"method": "higgs", "bits": 4, "p": 2}, "higgs3": {"method": "higgs", "bits": 3, "p": 2},
    "higgs2": {"method": "higgs", "bits": 2, "p": 2},
    "hqq4+protect": {"method": "hqq", "bits": 4, "protect": "default"},
    "bnb-nf4+protect": {"method": "bnb", "bits": 4, "type": "nf4", "protect": "default"},
}


def quality(pipe, seeds: int) -> dict:
    """Every class in every held-out wording, ``seeds`` seeds each, judged twice."""
    prompts, labels = [], []
    for c in range(len(CLASSES)):
        for p in captions_for(c, None, HOLDOUT_TEMPLATES):
            prompts.append(p)
            labels.append(c)
    labels = torch.tensor(labels)
    clip = autoquant.load_clip("demo")
    texts = clip.text_features(class_prompts())
    classifier = load_classifier()
    acc_cls, acc_clip, images = [], [], []
    for seed in range(seeds):
        out = torch.cat([pipe(prompts[i:i + 40], generator=torch.Generator().manual_seed(
            seed * 1000 + i), output_type="pt").images.float() for i in range(0, len(prompts), 40)])
        images.append(out)
        with torch.no_grad():
            acc_cls.append((classifier(out * 2 - 1).argmax(1) == labels).float().mean().item())
            acc_clip.append(((clip.image_features(out) @ texts.T).argmax(1) == labels)
                            .float().mean().item())
    t = time.perf_counter()
    pipe(["a photo of a sneaker"] * 8, generator=torch.Generator().manual_seed(0),
         output_type="pt")
    per_s = 8 / (time.perf_counter() - t)
    return {"images_per_seed": len(prompts), "seeds": seeds,
            "classifier_accuracy": statistics.mean(acc_cls),
            "classifier_accuracy_per_seed": acc_cls, "clip_accuracy": statistics.mean(acc_clip),
            "clip_accuracy_per_seed": acc_clip, "images_per_s_cpu_8": per_s,
            "grid": torch.cat(images)[:40]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4, help="seeds for the quality measurement")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--space", default="default",
                    help="the search's space (default: every method, no layer forced to stay)")
    ap.add_argument("--json", default="bench/results/demo_flux.json")
    ap.add_argument("--grid", default=None, help="write a PNG of generated samples")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe, clip, holdout, base = demo_bench(BASELINES, model=MODEL)
    q = quality(pipe, args.seeds)
    if args.grid:
        import torchvision

        torchvision.utils.save_image(q["grid"], args.grid, nrow=10, padding=1)
    del q["grid"]
    print(f"class accuracy {q['classifier_accuracy']:.1%} (classifier), "
          f"{q['clip_accuracy']:.1%} (CLIP zero-shot), {q['images_per_s_cpu_8']:.2f} images/s "
          f"(8 images, {torch.get_num_threads()} threads)", flush=True)
    rows = [[n, human_bytes(r.bytes), f"{r.bits_per_weight:.2f}", f"{r.metrics['psnr']['mean']:.2f}",
             f"{r.metrics['clip_fidelity']['mean']:.4f}"] for n, r in base.items()]
    print(table(rows, ["uniform", "bytes", "bits/w", "held-out PSNR", "CLIP fidelity"]), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="demo-flux-"))
    hqq4 = base["hqq4"]
    search = Search(SearchConfig(model=MODEL, budget=str(hqq4.bytes),
                                 space=autoquant.load_space(args.space), trials=args.trials,
                                 out=tmp / "s", settings=search_settings(model=MODEL), clip=clip,
                                 progress=False, sensitivity="full"), pipe)
    t0 = time.perf_counter()
    search.prepare()
    options = [c.label for c in search.space.candidates]
    spread = {}
    for label in ("hqq4-g64", "hqq2-g64"):
        col = [row[g.options.index(next(c for c in g.options if c.label == label))]
               for row, g in zip(search.error, search.groups.groups)
               if any(c.label == label for c in g.options)]
        spread[label] = {"max": max(col), "min": min(col), "ratio": max(col) / max(min(col), 1e-12),
                         "groups": len(col)}
    report = run_search(search)
    ours = holdout.evaluate(autoquant.load_recipe(tmp / "s" / "best.yaml"), "autoquant")
    search_s = time.perf_counter() - t0
    gain = {n: ours.metrics["psnr"]["mean"] - base[n].metrics["psnr"]["mean"]
            for n in ("hqq4", "hqq4+protect", "bnb-nf4", "bnb-nf4+protect")}
    print(f"sensitivity spread (most / least sensitive group, {options}): " + ", ".join(
        f"{k}: {v['ratio']:.0f}x over {v['groups']} groups" for k, v in spread.items()))
    print(f"search at hqq4's bytes ({human_bytes(hqq4.bytes)}): {human_bytes(ours.bytes)}, "
          f"held-out PSNR {ours.metrics['psnr']['mean']:.2f} dB; " +
          ", ".join(f"{g:+.2f} dB over {n}" for n, g in gain.items()) + f" ({search_s:.0f} s)")
    write_json(args.json, {
        "environment": environment(), "train_log": {k: {kk: vv for kk, vv in v.items()
                                                        if kk != "loss_curve"}
                                                    for k, v in train_log().items()},
        "generation": DEMO_FLUX_GENERATION, "quality": q,
        "baselines": {n: {"bytes": r.bytes, "bits_per_weight": r.bits_per_weight,
                          "psnr": r.metrics["psnr"]["mean"],
                          "clip_fidelity": r.metrics["clip_fidelity"]["mean"]}
                      for n, r in base.items()},
        "sensitivity_spread": spread,
        "search": {"space": args.space, "budget_bytes": hqq4.bytes, "bytes": ours.bytes, "trials": report["trials"],
                   "psnr": ours.metrics["psnr"]["mean"],
                   "clip_fidelity": ours.metrics["clip_fidelity"]["mean"], "gain_db": gain,
                   "seconds": search_s}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

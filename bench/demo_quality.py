"""Measurements of the demo model (the Demo issue): CLIP zero-shot accuracy, class accuracy of
generated images (held-out wordings, several seeds; judged by the demo CLIP and by the separate
classifier), CPU generation time, and PSNR of uniform HQQ over the denoiser at 8/4/3/2 bits.

    python bench/demo_quality.py [--seeds 4] [--json bench/results/demo_quality.json] [--grid docs/demo_samples.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import autoquant
from autoquant._format import table
from autoquant.scoring.clip import load_clip
from autoquant.models.zoo import DEMO_GENERATION, train_log
from autoquant.models.zoo.captions import CLASSES, HOLDOUT_TEMPLATES, captions_for, class_prompts
from autoquant.models.zoo.data import load_split
from autoquant.models.zoo.models import load_classifier

from _common import write_json


def generate(pipe, prompts: list[str], seed: int, batch: int = 40) -> torch.Tensor:
    """Images in [0, 1]; prompt i gets generator seed ``seed`` (one batch per chunk)."""
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out.append(pipe(prompts[i:i + batch], generator=g, output_type="pt",
                        **DEMO_GENERATION).images.float())
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--json", default="bench/results/demo_quality.json")
    ap.add_argument("--grid", default="docs/demo_samples.png")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    clip, classifier = load_clip("demo"), load_classifier()
    results: dict = {"train": train_log()}

    # 1. zero-shot CLIP and classifier on the Fashion-MNIST test set
    x, y = load_split("test")
    test01 = torch.nn.functional.pad(x.float() / 255, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1)
    text = clip.text_features(class_prompts())
    with torch.no_grad():
        zs = torch.cat([(clip.image_features(test01[i:i + 1000]) @ text.T).argmax(1)
                        for i in range(0, len(y), 1000)])
        cl = torch.cat([classifier(test01[i:i + 1000] * 2 - 1).argmax(1)
                        for i in range(0, len(y), 1000)])
    results["clip_zero_shot_accuracy"] = (zs == y).float().mean().item()
    results["classifier_test_accuracy"] = (cl == y).float().mean().item()

    # 2. generated images: every held-out wording of the first noun of each class, several seeds
    pipe = autoquant.load_pipeline("demo")
    prompts, labels = [], []
    for label in range(len(CLASSES)):
        for p in captions_for(label, None, HOLDOUT_TEMPLATES)[:len(HOLDOUT_TEMPLATES)]:
            prompts.append(p)
            labels.append(label)
    labels_t = torch.tensor(labels)
    images = torch.cat([generate(pipe, prompts, s) for s in range(args.seeds)])
    all_labels = labels_t.repeat(args.seeds)
    with torch.no_grad():
        by_clip = (clip.image_features(images) @ text.T).argmax(1)
        by_cls = classifier(images * 2 - 1).argmax(1)
    results["generated"] = {
        "images": len(images), "wordings_per_class": len(HOLDOUT_TEMPLATES), "seeds": args.seeds,
        "class_accuracy_by_clip": (by_clip == all_labels).float().mean().item(),
        "class_accuracy_by_classifier": (by_cls == all_labels).float().mean().item(),
        "per_class_by_classifier": {CLASSES[c]: (by_cls[all_labels == c] == c).float().mean().item()
                                    for c in range(len(CLASSES))},
    }

    # 3. CPU speed: 8 images at the default steps, after load
    eight = prompts[::5][:8]
    times = []
    for i in range(6):
        t = time.perf_counter()
        generate(pipe, eight, 100 + i)
        times.append(time.perf_counter() - t)
    results["cpu_seconds_for_8_images"] = {"median": statistics.median(times[1:]),
                                           "runs": times[1:], "threads": torch.get_num_threads(),
                                           "steps": DEMO_GENERATION["num_inference_steps"]}

    # 4. uniform HQQ over the denoiser: PSNR vs full precision on the same prompts and seeds
    ref = images[: len(prompts) * 2]
    rows = []
    results["uniform_hqq"] = {}
    for bits in (8, 4, 3, 2):
        q = autoquant.load_pipeline("demo")
        recipe = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                             "components": ["transformer"],
                                             "default": {"method": "hqq", "bits": bits}})
        summary = autoquant.apply_recipe(q, recipe, progress=False)
        out = torch.cat([generate(q, prompts, s) for s in range(2)])
        p = psnr(out, ref)
        with torch.no_grad():
            acc = (classifier(out * 2 - 1).argmax(1) == labels_t.repeat(2)).float().mean().item()
        results["uniform_hqq"][bits] = {"psnr_mean": p.mean().item(), "psnr_worst": p.min().item(),
                                        "transformer_linear_bytes": summary.bytes_after,
                                        "bits_per_weight": summary.bits_per_weight,
                                        "class_accuracy_by_classifier": acc}
        rows.append([f"hqq{bits}-g64", f"{summary.bits_per_weight:.2f}", f"{p.mean():.2f}",
                     f"{p.min():.2f}", f"{acc:.1%}"])
        if bits == 2 and args.grid:
            import torchvision
            grid = torch.cat([ref[:10 * len(HOLDOUT_TEMPLATES):len(HOLDOUT_TEMPLATES)],
                              out[:10 * len(HOLDOUT_TEMPLATES):len(HOLDOUT_TEMPLATES)]])
            torchvision.utils.save_image(grid, Path(args.grid).with_name("demo_fp_vs_hqq2.png"),
                                         nrow=10, padding=1)

    if args.grid:
        import torchvision
        # one row per seed, one column per class (first held-out wording)
        cols = torch.arange(0, len(prompts), len(HOLDOUT_TEMPLATES))
        grid = torch.cat([images[s * len(prompts) + cols] for s in range(args.seeds)])
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, args.grid, nrow=10, padding=1)

    g = results["generated"]
    print(table([
        ["CLIP zero-shot accuracy (FMNIST test, 10k)", f"{results['clip_zero_shot_accuracy']:.2%}", ">= 85%"],
        ["classifier accuracy (FMNIST test, 10k)", f"{results['classifier_test_accuracy']:.2%}", ""],
        [f"generated of the prompted class, by CLIP ({g['images']} images)", f"{g['class_accuracy_by_clip']:.2%}", ">= 80%"],
        [f"generated of the prompted class, by classifier ({g['images']} images)", f"{g['class_accuracy_by_classifier']:.2%}", ">= 80%"],
        ["CPU seconds for 8 images (median)", f"{results['cpu_seconds_for_8_images']['median']:.2f}", "< 2 s"],
    ], ["measure", "value", "target"]))
    print()
    print(table(rows, ["uniform (transformer)", "bits/weight", "PSNR mean dB", "PSNR worst dB",
                       "class acc"]))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

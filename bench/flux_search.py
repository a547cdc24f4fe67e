"""A real ``autoquant search`` on the Flux-dev architecture (11.9B parameters, random bf16 weights;
see ``flux_scale.py`` for the pipeline): the ``flux`` space, anchored sensitivity, the capped layer
cache, a few trials. Reports where the time goes and the GPU memory it needed -- never quality.

    python bench/flux_search.py [--trials 4] [--steps 20] [--json bench/results/flux_search_h100.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoquant._format import human_bytes
from autoquant.scoring.clip import _open_clip
from autoquant.search import Search, SearchConfig, run_search
from autoquant.generation.settings import EvalSettings, prompt_set
from autoquant.search.space import load_space

from _common import write_json
from _flux import build_pipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="flux")
    ap.add_argument("--budget", default="30%")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--sensitivity", default="auto")
    ap.add_argument("--layers", choices=["full", "small"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default="bench/results/flux_search_h100.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # what the CLI sets
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    t0 = time.perf_counter()
    pipe = build_pipeline(device, args.layers == "small")
    build_s = time.perf_counter() - t0
    settings = EvalSettings(prompts=prompt_set("flux", "search")[:2], seeds=(0,),
                            steps=args.steps, guidance=3.5, height=args.size, width=args.size,
                            batch_size=2, extra=(("max_sequence_length", 512),))
    clip = _open_clip("ViT-B-32", "").to(device)  # random weights: the metric's cost only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    search = Search(SearchConfig(model="flux-dev-architecture-random", budget=args.budget,
                                 space=load_space(args.space), trials=args.trials,
                                 out=Path(tempfile.mkdtemp(prefix="flux-search-")),
                                 settings=settings, clip=clip, progress=False,
                                 sensitivity=args.sensitivity), pipe)
    search.prepare()
    init_s = time.perf_counter() - t0
    print(f"setup {search.timing['references_s']:.1f} s, sensitivity "
          f"({search.sensitivity_mode}) {search.timing['sensitivity_s']:.1f} s, "
          f"{len(search.groups.groups)} groups, cache {search.cache.builds} builds / "
          f"{search.cache.evictions} evictions, cap {human_bytes(search.cache.max_bytes)}",
          flush=True)
    t0 = time.perf_counter()
    report = run_search(search)
    search_s = time.perf_counter() - t0
    done = [t for t in report["trial_timing"] if t["state"] == "COMPLETE"]
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "args": vars(args), "pipeline_build_s": build_s,
           "search_init_s": init_s, "timing": search.timing, "groups": len(search.groups.groups),
           "budget_bytes": search.budget_bytes, "fp_bytes": search.fp_bytes,
           "cache": report["cache"], "quantize_s": report["quantize_s"],
           "trials": report["trials"], "trial_timing": report["trial_timing"],
           "run_search_s": search_s, "best": report.get("best"),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda"
           else None}
    if done:
        out["trial_over_generation_mean"] = statistics.mean(t["total_s"] / t["generation_s"]
                                                            for t in done)
    write_json(args.json, out)
    print(report["table"])
    for t in report["trial_timing"]:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()})
    print(f"search init {init_s:.0f} s (setup {search.timing['references_s']:.0f} s incl. references, "
          f"sensitivity {search.timing['sensitivity_s']:.0f} s {search.sensitivity_mode}); "
          f"{args.trials} trials in {search_s:.0f} s; trial/generation "
          f"{out.get('trial_over_generation_mean', float('nan')):.2f}; peak GPU "
          f"{human_bytes(out['peak_gpu_bytes'] or 0)}; cache {report['cache']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Search issue's measurements on the demo model, scored on the held-out prompts and seeds:

1. at the bytes of uniform hqq 4-bit: best.yaml vs uniform hqq4, bnb nf4, torchao int-x 4;
2. at the bytes of uniform hqq 3-bit: best.yaml vs uniform 3-bit (and the 4-bit baselines);
3. plain Optuna TPE (one categorical per layer, no seeding, no cache, trial constraints) with the
   same trial count at the hqq4 budget: best PSNR within budget and wall time, side by side;
4. per-trial time split (assembly, proxy, generation, metrics) and trial / generation time.

    python bench/search_demo.py [--trials 24] [--json bench/results/search_demo.json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import autoquant
from autoquant._format import human_bytes, table
from autoquant.search import Search, SearchConfig, run_search
from autoquant.search.space import load_space

from _common import write_json
from _demo import demo_bench, search_settings as demo_search_settings
from search_efficiency import run_optuna

BASELINES = {"hqq4": {"method": "hqq", "bits": 4}, "bnb-nf4": {"method": "bnb", "bits": 4},
             "torchao-intx4": {"method": "torchao", "type": "intx", "bits": 4},
             "hqq3": {"method": "hqq", "bits": 3}}


def plain_tpe(pipe, space, budget_bytes, trials, seed, search_settings, clip):
    """What a user gets from Optuna alone: one categorical per layer, TPE, the constraints set on
    each trial, every candidate generated and scored (no seeding, no cache)."""
    records, recipe, _ = run_optuna(pipe, clip, search_settings, space, budget_bytes, trials,
                                    seed, "tpe", generate_infeasible=True)
    feasible = [r for r in records if r["psnr"] is not None]
    best = max(feasible, key=lambda r: r["psnr"], default=None)
    return {"wall_s": records[-1]["elapsed_s"], "feasible_trials": len(feasible),
            "trials": trials, "best_search_psnr": best["psnr"] if best else None,
            "best_bytes": best["bytes"] if best else None}, recipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--space", default="default")
    ap.add_argument("--json", default="bench/results/search_demo.json")
    args = ap.parse_args(argv)
    pipe, clip, holdout, base = demo_bench(BASELINES)
    space = load_space(args.space)
    search_settings = demo_search_settings()
    out: dict = {"baselines": {k: {"bytes": r.bytes, "psnr": r.metrics["psnr"]["mean"],
                                   "clip_fidelity": r.metrics["clip_fidelity"]["mean"]}
                               for k, r in base.items()}, "searches": {}}
    rows = []
    for target, compare in (("hqq4", ["hqq4", "bnb-nf4", "torchao-intx4"]), ("hqq3", ["hqq3"])):
        budget = base[target].bytes
        folder = Path(tempfile.mkdtemp(prefix=f"search-{target}-"))
        t0 = time.perf_counter()
        search = Search(SearchConfig(model="demo", budget=str(budget), space=space,
                                     trials=args.trials, out=folder, settings=search_settings,
                                     clip=clip, progress=False,
                                 sensitivity="full"), pipe)
        report = run_search(search)
        wall = time.perf_counter() - t0
        best = holdout.evaluate(autoquant.load_recipe(folder / "best.yaml"), f"autoquant@{target}")
        timings = [t for t in report["trial_timing"] if t["state"] == "COMPLETE"]
        ratio = statistics.mean(t["total_s"] / t["generation_s"] for t in timings)
        entry = {"budget_bytes": budget, "wall_s": wall, "trials": report["trials"],
                 "sensitivity_s": report["timing"]["sensitivity_s"],
                 "quantize_s": report["quantize_s"],
                 "best_search_psnr": report["best"]["psnr"],
                 "holdout": {"bytes": best.bytes, "psnr": best.metrics["psnr"]["mean"],
                             "psnr_worst": best.metrics["psnr"]["worst"],
                             "clip_fidelity": best.metrics["clip_fidelity"]["mean"]},
                 "best_baseline_psnr": max(base[c].metrics["psnr"]["mean"] for c in compare),
                 "trial_time_split_mean": {k: statistics.mean(t[k] for t in timings)
                                           for k in ("assemble_s", "proxy_s", "generation_s",
                                                     "metrics_s", "total_s")},
                 "trial_over_generation": ratio}
        if target == "hqq4":
            tpe, tpe_recipe = plain_tpe(pipe, space, budget, args.trials, 0, search_settings, clip)
            if tpe_recipe is not None:
                r = holdout.evaluate(tpe_recipe, "plain TPE")
                tpe["holdout_psnr"] = r.metrics["psnr"]["mean"]
            entry["plain_tpe"] = tpe
        out["searches"][target] = entry
        shutil.copy(folder / "best.yaml", Path(args.json).parent / f"search_demo_best_{target}.yaml")
        for name in compare:
            r = base[name]
            rows.append([f"@{target}", f"uniform {name}", human_bytes(r.bytes),
                         f"{r.metrics['psnr']['mean']:.2f}", f"{r.metrics['clip_fidelity']['mean']:.4f}"])
        rows.append([f"@{target}", "autoquant best.yaml", human_bytes(best.bytes),
                     f"{best.metrics['psnr']['mean']:.2f}",
                     f"{best.metrics['clip_fidelity']['mean']:.4f}"])
    print(table(rows, ["budget", "plan", "bytes", "PSNR (holdout)", "CLIP fid (holdout)"]))
    s4 = out["searches"]["hqq4"]
    print(f"\nat hqq4 bytes: autoquant {s4['holdout']['psnr']:.2f} dB vs best baseline "
          f"{s4['best_baseline_psnr']:.2f} dB ({s4['holdout']['psnr'] - s4['best_baseline_psnr']:+.2f} dB; target +2)")
    s3 = out["searches"]["hqq3"]
    best4 = max(base[n].metrics["psnr"]["mean"] for n in ("hqq4", "bnb-nf4"))
    print(f"at hqq3 bytes: autoquant {s3['holdout']['psnr']:.2f} dB vs uniform 4-bit "
          f"{best4:.2f} dB (target: at least that)")
    t = s4["plain_tpe"]
    print(f"\nsame budget, {args.trials} trials: autoquant best search-set PSNR "
          f"{s4['best_search_psnr']:.2f} dB in {s4['wall_s']:.0f} s (sensitivity "
          f"{s4['sensitivity_s']:.0f} s included); plain TPE {t['best_search_psnr']} dB "
          f"({t['feasible_trials']} feasible of {t['trials']}) in {t['wall_s']:.0f} s; "
          f"held-out: {s4['holdout']['psnr']:.2f} vs {t.get('holdout_psnr')}")
    split = s4["trial_time_split_mean"]
    print(f"trial time split (mean, s): assemble {split['assemble_s']:.3f}, proxy "
          f"{split['proxy_s']:.3f}, generation {split['generation_s']:.3f}, metrics "
          f"{split['metrics_s']:.3f}, total {split['total_s']:.3f}; trial/generation "
          f"{s4['trial_over_generation']:.3f} (target <= 1.2)")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

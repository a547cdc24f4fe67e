"""Anchored vs full sensitivity on the demo: what one replay per group (instead of one per
(group, config)) costs in proxy fidelity and in the plans a search finds.

1. time of each pass; Spearman rank correlation of the two tables (all entries, and the mean
   within a group -- the order the solver trades configs by);
2. the solver's plan from each table at hqq4's and hqq3's bytes, scored on the held-out set;
3. a search (``--trials``) with each table at the same budgets, best.yaml scored on held-out.

    python bench/sensitivity_modes.py [--trials 16] [--json bench/results/sensitivity_modes.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

import autoquant
from autoquant._format import human_bytes, table
from autoquant.search import Search, SearchConfig, run_search
from autoquant.search.space import load_space

from _common import write_json
from _demo import demo_bench, search_settings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--json", default="bench/results/sensitivity_modes.json")
    args = ap.parse_args(argv)
    pipe, clip, holdout, base = demo_bench({"hqq4": {"method": "hqq", "bits": 4},
                                            "hqq3": {"method": "hqq", "bits": 3}})
    tmp = Path(tempfile.mkdtemp(prefix="sensitivity-modes-"))
    search = Search(SearchConfig(model="demo", budget=str(base["hqq4"].bytes),
                                 space=load_space("default"), trials=args.trials, out=tmp / "x",
                                 settings=search_settings(),
                                 clip=clip, progress=False, sensitivity="full"), pipe)
    search.prepare()
    full, full_s = search.error, search.timing["sensitivity_s"]
    search.cache.clear()  # the anchored pass quantizes every (layer, config) itself, as alone
    t = time.perf_counter()
    anchored, _ = search.measure_sensitivity("anchored")
    anchored_s = time.perf_counter() - t
    replays = {"full": sum(sum(not c.full_precision for c in g.options)
                           for g in search.groups.groups), "anchored": len(search.groups.groups)}
    flat = [(a, f) for ga, gf, g in zip(anchored, full, search.groups.groups)
            for a, f, c in zip(ga, gf, g.options) if not c.full_precision]
    rho_all = spearmanr([a for a, _ in flat], [f for _, f in flat]).statistic
    rho_groups = statistics.mean(
        spearmanr([a for a, c in zip(ga, g.options) if not c.full_precision],
                  [f for f, c in zip(gf, g.options) if not c.full_precision]).statistic
        for ga, gf, g in zip(anchored, full, search.groups.groups))
    out = {"groups": len(search.groups.groups), "replays": replays,
           "full_s": full_s, "anchored_s": anchored_s,
           "spearman_all": rho_all, "spearman_within_group_mean": rho_groups, "budgets": {}}
    print(f"full: {replays['full']} replays, {full_s:.1f} s; anchored: {replays['anchored']} "
          f"replays, {anchored_s:.1f} s; Spearman all {rho_all:.3f}, within a group "
          f"{rho_groups:.3f}", flush=True)
    rows = []
    for target in ("hqq4", "hqq3"):
        budget = base[target].bytes
        entry = {"budget_bytes": budget, "baseline_psnr": base[target].metrics["psnr"]["mean"]}
        for mode, tab in (("full", full), ("anchored", anchored)):
            search.use_sensitivity(tab, mode)
            search.retarget(str(budget), tmp / f"{target}-{mode}")
            choice = search.solve_at(search.budget_bytes)
            solver = holdout.evaluate(search.recipe(choice), f"solver/{mode}")
            report = run_search(search)
            best = holdout.evaluate(autoquant.load_recipe(tmp / f"{target}-{mode}" / "best.yaml"),
                                    f"search/{mode}")
            entry[mode] = {"solver_psnr": solver.metrics["psnr"]["mean"],
                           "solver_bytes": solver.bytes,
                           "search_psnr": best.metrics["psnr"]["mean"], "search_bytes": best.bytes,
                           "search_set_psnr": report["best"]["psnr"]}
            rows.append([target, mode, human_bytes(budget), f"{entry['baseline_psnr']:.2f}",
                         f"{entry[mode]['solver_psnr']:.2f}", f"{entry[mode]['search_psnr']:.2f}"])
            print(rows[-1], flush=True)
        out["budgets"][target] = entry
    print(table(rows, ["budget", "sensitivity", "bytes", "uniform PSNR", "solver plan PSNR",
                       f"search ({args.trials} trials) PSNR"]))
    worst = min(out["budgets"][t]["anchored"]["search_psnr"] - out["budgets"][t]["full"]["search_psnr"]
                for t in out["budgets"])
    out["target"] = {"anchored_minus_full_db_worst": worst, "met": worst >= -1.0}
    print(f"target: anchored within 1 dB of full (held-out, after the search) -> worst "
          f"{worst:+.2f} dB: {'met' if worst >= -1.0 else 'NOT met'}; replays "
          f"{replays['full'] / replays['anchored']:.0f}x fewer")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality at equal memory (the Benchmarks issue, part 1), demo model, held-out prompts and seeds.

For every uniform baseline: the plan autoquant finds at that baseline's bytes (Δ PSNR, Δ CLIP
fidelity), and the bytes autoquant needs to equal the baseline's PSNR. The second is read off a
curve: autoquant searched at every baseline's bytes plus a ladder of budgets between the smallest
plan the space allows and the largest baseline; each best.yaml is scored on the held-out set, and
"bytes to match" is the smallest searched budget whose plan reaches the baseline's PSNR (so it is
an upper bound at the ladder's resolution). One sensitivity pass serves every budget
(``Search.retarget``).

    python bench/equal_memory.py [--trials 12] [--ladder 8] [--json bench/results/equal_memory.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import autoquant
from autoquant._format import human_bytes, table
from autoquant.search import Search, SearchConfig, run_search
from autoquant.search.space import load_space

from _common import write_json
from _demo import demo_bench, search_settings
from baselines import BASELINES as UNIFORM, GPTQ, HIGGS

# "uniform + protect": what people deploy (the usual layers kept in full precision, as
# `--protect default` and diffusers/Pruna skip lists do)
PROTECTED = {f"{name}+protect": {**cfg, "protect": "default"} for name, cfg in
             (("hqq4", UNIFORM["hqq4"]), ("bnb-nf4", UNIFORM["bnb-nf4"]),
              ("higgs4", HIGGS["higgs4"]), ("gptq4", GPTQ["gptq4"]))}
BASELINES = {**UNIFORM, **HIGGS, **GPTQ, **PROTECTED}
TARGET_DB = 2.0  # the goal: at least +2 dB at the 4-bit baselines' bytes, never worse elsewhere


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12, help="trials per budget")
    ap.add_argument("--ladder", type=int, default=8, help="extra budgets for bytes-to-match")
    ap.add_argument("--space", default="default")
    ap.add_argument("--json", default="bench/results/equal_memory.json")
    ap.add_argument("--only", default=None, help="comma-separated baselines (default: all)")
    ap.add_argument("--seeds", default="0",
                    help="search seeds, comma-separated (the search's own default: 0,1)")
    args = ap.parse_args(argv)
    chosen = {k: v for k, v in BASELINES.items()
              if args.only is None or k in args.only.split(",")}
    pipe, clip, holdout, base = demo_bench(chosen)
    tmp = Path(tempfile.mkdtemp(prefix="equal-memory-"))
    t0 = time.perf_counter()
    search = Search(SearchConfig(model="demo", budget=str(base["hqq4"].bytes),
                                 space=load_space(args.space), trials=args.trials, out=tmp / "x",
                                 settings=search_settings(
                                     [int(x) for x in args.seeds.split(",")]),
                                 clip=clip, progress=False,
                                 sensitivity="full"), pipe)
    search.prepare()  # references, inputs, the sensitivity table: once for every budget
    setup = time.perf_counter() - t0
    lo, hi = search.smallest_bytes(), max(r.bytes for r in base.values())
    ladder = ({int(lo * (hi / lo) ** (i / args.ladder)) + 1 for i in range(args.ladder + 1)}
              if args.ladder > 0 else set())
    budgets = sorted({r.bytes for r in base.values()} | ladder)
    curve: dict[int, dict] = {}
    for b in budgets:  # autoquant's held-out PSNR against its budget
        t = time.perf_counter()
        try:
            search.retarget(str(b), tmp / f"b{b}")
        except autoquant.AutoquantError as e:  # below the smallest plan: reported, not fatal
            curve[b] = {"error": str(e)}
            print(f"budget {human_bytes(b)}: {e}", flush=True)
            continue
        report = run_search(search)
        ours = holdout.evaluate(autoquant.load_recipe(tmp / f"b{b}" / "best.yaml"), "autoquant")
        curve[b] = {"bytes": ours.bytes, "psnr": ours.metrics["psnr"]["mean"],
                    "clip_fidelity": ours.metrics["clip_fidelity"]["mean"],
                    "search_psnr": report["best"]["psnr"], "trials": report["trials"],
                    "search_s": time.perf_counter() - t}
        print(f"budget {human_bytes(b)}: {curve[b]['psnr']:.2f} dB held-out "
              f"({curve[b]['search_s']:.0f} s)", flush=True)
    ok = {b: c for b, c in curve.items() if "psnr" in c}
    rows, records = [], []
    for name, r in base.items():
        psnr, fid = r.metrics["psnr"]["mean"], r.metrics["clip_fidelity"]["mean"]
        at = curve[r.bytes]
        match = min((c["bytes"] for c in ok.values() if c["psnr"] >= psnr), default=None)
        rec = {"baseline": name, "config": chosen[name], "bytes": r.bytes, "psnr": psnr,
               "clip_fidelity": fid, "autoquant": at, "bytes_to_match": match}
        if "psnr" in at:
            rec["d_psnr"], rec["d_clip_fidelity"] = at["psnr"] - psnr, at["clip_fidelity"] - fid
        records.append(rec)
        rows.append([name, human_bytes(r.bytes), f"{psnr:.2f}",
                     f"{at['psnr']:.2f}" if "psnr" in at else "-",
                     f"{rec['d_psnr']:+.2f}" if "d_psnr" in rec else "-",
                     f"{rec['d_clip_fidelity']:+.4f}" if "d_psnr" in rec else "-",
                     human_bytes(match) if match else "-",
                     f"{match / r.bytes:.0%}" if match else "-"])
    print(table(rows, ["baseline", "bytes", "PSNR", "autoquant PSNR", "Δ PSNR", "Δ CLIP fid",
                       "autoquant bytes to match", "of baseline"]))
    four = [r for r in records if r["config"].get("bits") == 4 or r["baseline"] in
            ("bnb-nf4", "bnb-fp4")]
    worst4 = min(r.get("d_psnr", float("-inf")) for r in four)
    worse = [r["baseline"] for r in records if r.get("d_psnr", 0) < -0.5]
    print(f"target: >= +{TARGET_DB} dB at every 4-bit baseline's bytes -> worst {worst4:+.2f} dB: "
          f"{'met' if worst4 >= TARGET_DB else 'NOT met'}; no baseline beaten by > 0.5 dB at "
          f"its own bytes: {'met' if not worse else 'NOT met (' + ', '.join(worse) + ')'}")
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "space": args.space,
           "trials_per_budget": args.trials, "search_seeds": args.seeds, "sensitivity_s": setup,
           "curve": [{"budget": b, **c} for b, c in sorted(curve.items())], "rows": records,
           "target": {"d_psnr_4bit_min": worst4, "met": worst4 >= TARGET_DB,
                      "worse_than_baseline": worse}}
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality at equal memory (the Benchmarks issue, part 1): for every uniform baseline, the plan
autoquant finds at that baseline's bytes, both scored on the demo's held-out prompts.
One sensitivity pass serves every budget (``Search.retarget``).

    python bench/equal_memory.py [--trials 12] [--json bench/results/equal_memory.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoquant  # noqa: E402
from autoquant._format import human_bytes, table  # noqa: E402
from autoquant.backends import config_from_dict  # noqa: E402
from autoquant.baseline import baseline_recipe  # noqa: E402
from autoquant.search import Search, SearchConfig, run_search  # noqa: E402
from autoquant.settings import EvalSettings  # noqa: E402
from autoquant.space import load_space  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import BASELINES as UNIFORM, HIGGS  # noqa: E402

BASELINES = {**UNIFORM, **HIGGS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--json", default="bench/results/equal_memory.json")
    args = ap.parse_args(argv)
    pipe = autoquant.load_pipeline("demo")
    clip = autoquant.load_clip("demo")
    holdout = autoquant.Evaluator(pipe, EvalSettings.for_model("demo", "holdout"), clip=clip,
                                  progress=False)
    inv = autoquant.inventory(pipe)
    base = {n: holdout.evaluate(baseline_recipe(inv, config_from_dict(c), ["transformer"]), n)
            for n, c in BASELINES.items()}
    tmp = Path(tempfile.mkdtemp(prefix="equal-memory-"))
    t0 = time.perf_counter()
    search = Search(SearchConfig(model="demo", budget=str(base["hqq4"].bytes),
                                 space=load_space("default"), trials=args.trials, out=tmp / "x",
                                 settings=EvalSettings.for_model("demo", "search", seeds=[0],
                                                                 batch_size=20),
                                 clip=clip, progress=False), pipe)
    setup = time.perf_counter() - t0
    rows, out = [], {"trials_per_budget": args.trials, "sensitivity_s": setup, "rows": []}
    # the plan autoquant finds at each baseline's bytes, and the bytes it needs to equal it
    for name, r in base.items():
        folder = tmp / name
        t = time.perf_counter()
        try:
            search.retarget(str(r.bytes), folder)
        except autoquant.AutoquantError as e:  # reported, not fatal
            print(f"{name}: {e}", flush=True)
            out["rows"].append({"baseline": name, "bytes": r.bytes, "error": str(e)})
            continue
        report = run_search(search)
        ours = holdout.evaluate(autoquant.load_recipe(folder / "best.yaml"), f"autoquant@{name}")
        row = {"baseline": name, "bytes": r.bytes, "psnr": r.metrics["psnr"]["mean"],
               "clip_fidelity": r.metrics["clip_fidelity"]["mean"], "autoquant_bytes": ours.bytes,
               "autoquant_psnr": ours.metrics["psnr"]["mean"],
               "autoquant_clip_fidelity": ours.metrics["clip_fidelity"]["mean"],
               "search_s": time.perf_counter() - t, "trials": report["trials"]}
        out["rows"].append(row)
        rows.append([name, human_bytes(r.bytes), f"{row['psnr']:.2f}",
                     f"{row['autoquant_psnr']:.2f}", f"{row['autoquant_psnr'] - row['psnr']:+.2f}",
                     f"{row['autoquant_clip_fidelity'] - row['clip_fidelity']:+.4f}"])
        print(rows[-1], flush=True)
    print(table(rows, ["baseline", "bytes", "baseline PSNR", "autoquant PSNR", "d PSNR",
                       "d CLIP fid"]))
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

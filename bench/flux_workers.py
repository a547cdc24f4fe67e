"""Many workers on the Flux-dev architecture (the multi-worker issue, GPU part): one study run by 1
worker, then by N workers (one per GPU of this machine), same trial count; trials per hour,
sensitivity wall time, duplicates.

    python bench/flux_workers.py [--workers 2] [--trials 10] [--steps 8] [--json bench/results/flux_workers_h100x2.json]

Each worker is a process that builds the Flux-dev-architecture pipeline on its own GPU (random
bf16 weights, the same seed everywhere: ``_flux.py``) and runs ``autoquant.run_search`` on a
shared SQLite study (one host, no server: BEGIN IMMEDIATE + heartbeats) and artifact folder. The
space ties each transformer block's layers (57 groups; the sensitivity pass is anchored), so that
a run fits minutes of GPU time; memory, time and sharing are what is measured, never quality.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from autoquant.search._workers import threads_per_worker  # as `search --devices` does

from _common import environment, write_json
from _flux import block_space, build_pipeline

SPACE = block_space([
    "{method: hqq, bits: 4, group_size: 64}",
    "{method: hqq, bits: 8, group_size: 64}",
    "{method: bnb, bits: 4, type: nf4}",
    "{method: torchao, type: int8}",
    "{method: none}",
], "[bytes, psnr]",
    "Flux with one group per transformer block (the benchmark's coarse space).")


def worker(args) -> int:
    """One worker: the pipeline on ``args.device``, then the shared search."""
    import autoquant
    from autoquant.generation.settings import EvalSettings, prompt_set

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    pipe = build_pipeline(device, small=args.small)
    settings = EvalSettings(prompts=prompt_set("flux", "search")[:2], seeds=(0,),
                            steps=args.steps, guidance=3.5, height=args.size, width=args.size,
                            batch_size=2, extra=(("max_sequence_length", 512),))
    space = autoquant.SearchSpace.from_dict(
        __import__("yaml").safe_load(SPACE), name="flux-blocks")
    search = autoquant.Search(autoquant.SearchConfig(
        model="flux-dev-architecture-random", budget=args.budget, space=space,
        trials=args.trials, storage=args.storage, study="flux", out=Path(args.out),
        artifacts=Path(args.artifacts), settings=settings, clip=None, progress=False,
        sensitivity="anchored", device=str(device)), pipe)
    autoquant.run_search(search)
    return 0


def run(args, n: int, folder: Path) -> dict:
    storage = f"sqlite:///{folder / 'study.db'}"
    env_base = {"AUTOQUANT_HEARTBEAT_S": "5", "AUTOQUANT_GRACE_S": "60"}
    procs = []
    t0 = time.time()
    for i in range(n):
        device = f"cuda:{i}" if torch.cuda.is_available() else "cpu"
        argv = [sys.executable, __file__, "--worker", "--device", device, "--storage",
                storage, "--out", str(folder / f"w{i}"), "--artifacts",
                str(folder / "artifacts"), "--trials", str(args.trials), "--steps",
                str(args.steps), "--size", str(args.size), "--budget", args.budget]
        if args.small:
            argv.append("--small")
        log = open(folder / f"w{i}.log", "w")
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      env={**__import__("os").environ, **env_base,
                                           "OMP_NUM_THREADS": str(threads_per_worker(n))}))
    codes = [p.wait() for p in procs]
    wall = time.time() - t0
    study = optuna.load_study(study_name="flux", storage=storage)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    counted = [t for t in trials if t.state.is_finished() and "discarded" not in t.user_attrs
               and t.number not in retried]
    plans = [tuple(sorted(t.params.items())) for t in counted]
    first = min(t.datetime_start for t in counted)
    last = max(t.datetime_complete for t in counted)
    trials_s = (last - first).total_seconds()
    sens = study.user_attrs.get("sensitivity", {})
    # steady state: each worker's first trial also compiles kernels and fills its layer cache
    by_worker: dict = {}
    for t in sorted(counted, key=lambda t: t.datetime_start):
        by_worker.setdefault(t.user_attrs.get("worker", {}).get("pid"), []).append(t)
    warm_start = max(ts[0].datetime_complete for ts in by_worker.values())
    later = [t for t in counted if t.datetime_start >= warm_start]
    steady = ((len(later) / (last - warm_start).total_seconds() * 3600)
              if later and last > warm_start else None)
    return {"workers": n, "steady_trials_per_hour": steady, "steady_trials": len(later), "exit_codes": codes, "wall_s": wall, "counted": len(counted),
            "duplicates": len(plans) - len(set(plans)), "trials_s": trials_s,
            "trials_per_hour": len(counted) / trials_s * 3600,
            "sensitivity_wall_s": sens.get("wall_s"), "sensitivity_mode": sens.get("mode"),
            "prepared_s": study.user_attrs.get("prepared", {}).get("prepared_s"),
            "per_worker": {str(d): sum(1 for t in counted
                                       if t.user_attrs.get("worker", {}).get("device") == d)
                           for d in {t.user_attrs.get("worker", {}).get("device")
                                     for t in counted}},
            "trial_total_s": [t.user_attrs.get("timing", {}).get("total_s") for t in counted]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--storage", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--artifacts", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--budget", default="30%")
    ap.add_argument("--small", action="store_true", help="a narrow Flux (checking the script)")
    ap.add_argument("--json", default="bench/results/flux_workers_h100x2.json")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    out = {"environment": environment("cuda:0" if torch.cuda.is_available() else None),
           "gpus": torch.cuda.device_count(),
           "args": vars(args), "runs": {}}
    for n in (1, args.workers):
        folder = Path(tempfile.mkdtemp(prefix=f"flux-workers-{n}-"))
        r = run(args, n, folder)
        out["runs"][str(n)] = r
        print(f"{n} worker(s): {r['counted']} trials, {r['trials_per_hour']:.0f} trials/hour, "
              f"sensitivity {r['sensitivity_wall_s']:.0f} s ({r['sensitivity_mode']}), "
              f"duplicates {r['duplicates']}, exit {r['exit_codes']}", flush=True)
        if any(r["exit_codes"]):
            print((folder / "w0.log").read_text()[-3000:])
        write_json(args.json, out)
    one, many = out["runs"]["1"], out["runs"][str(args.workers)]
    out["speedup"] = {"trials_per_hour": many["trials_per_hour"] / one["trials_per_hour"],
                      "steady_trials_per_hour": (many["steady_trials_per_hour"]
                                                 / one["steady_trials_per_hour"]),
                      "sensitivity_wall": many["sensitivity_wall_s"] / one["sensitivity_wall_s"]}
    sp = out["speedup"]
    print(f"{args.workers} vs 1 worker: trials/hour x{sp['trials_per_hour']:.2f} (after each "
          f"worker's first trial x{sp['steady_trials_per_hour']:.2f}; target >= 1.8), "
          f"sensitivity wall time x{sp['sensitivity_wall']:.2f} (target <= 0.6), duplicates "
          f"{many['duplicates']} (target 0)")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

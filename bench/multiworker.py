"""Many workers, one study (the multi-worker issue): the same search run by 1 worker and by N
worker processes sharing one study, and once more with one worker killed (SIGKILL) mid-trial.
Counts duplicates (a plan evaluated twice), lost trials (counted trials missing, or a lost plan
never re-run), and scores each run's best.yaml on the held-out prompts.

    python bench/multiworker.py [--model demo] [--workers 3] [--trials 16] [--storage postgres|sqlite]
        [--device cpu] [--space default] [--json bench/results/multiworker_demo_cpu.json]

``--storage postgres`` starts a throw-away PostgreSQL server (Debian's postgresql package);
``sqlite`` uses one SQLite file (one host). On a GPU machine, ``--device cuda`` gives worker i
``cuda:i`` (``--device cuda:0`` puts every worker on one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from _common import environment, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/pg.py: the throw-away server
from tests.pg import Cluster  # noqa: E402

RUNNING, FAIL = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL


def start_worker(args, storage: str, folder: Path, name: str, device: str, extra=()):
    env = {**os.environ, "AUTOQUANT_HEARTBEAT_S": "2", "AUTOQUANT_GRACE_S": "10"}
    if device == "cpu" and args.workers > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    argv = [sys.executable, "-m", "autoquant", "search", "--model", args.model, "--budget",
            args.budget, "--trials", str(args.trials), "--space", args.space, "--storage",
            storage, "--study", "bench", "--out", str(folder / name), "--artifacts",
            str(folder / "artifacts"), "--device", device, "--json", *args.extra, *extra]
    log = open(folder / f"{name}.log", "w")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def devices(args, n: int) -> list[str]:
    if args.device == "cuda":
        return [f"cuda:{i}" for i in range(n)]
    return [args.device] * n


def measure_run(args, storage: str, folder: Path, n: int, kill: bool) -> dict:
    t0 = time.time()
    procs = {f"w{i}": start_worker(args, storage, folder, f"w{i}", d)
             for i, d in enumerate(devices(args, n))}
    killed = None
    if kill:  # SIGKILL the last worker once it runs a trial of the study
        victim = procs[f"w{n - 1}"]
        while killed is None and victim.poll() is None:
            if "bench" in optuna.get_all_study_names(storage):
                for t in optuna.load_study(study_name="bench", storage=storage).get_trials(
                        deepcopy=False, states=(RUNNING,)):
                    if t.user_attrs.get("worker", {}).get("pid") == victim.pid:
                        os.kill(victim.pid, signal.SIGKILL)
                        killed = t.number
                        break
            time.sleep(0.2)
    codes = {k: p.wait() for k, p in procs.items()}
    wall = time.time() - t0
    study = optuna.load_study(study_name="bench", storage=storage)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    counted = [t for t in trials if t.state.is_finished() and "discarded" not in t.user_attrs
               and t.number not in retried]
    plans = [tuple(sorted(t.params.items())) for t in counted]
    sens = study.user_attrs.get("sensitivity", {})
    done = [t for t in counted if t.state == optuna.trial.TrialState.COMPLETE]
    out = {"workers": n, "exit_codes": codes, "wall_s": wall, "counted": len(counted),
           "duplicates": len(plans) - len(set(plans)),
           "lost": max(0, args.trials - len(counted)), "killed_trial": killed,
           "discarded": sum("discarded" in t.user_attrs for t in trials),
           "sensitivity_wall_s": sens.get("wall_s"), "sensitivity_mode": sens.get("mode"),
           "trials_per_worker": {str(p): sum(1 for t in counted
                                             if t.user_attrs.get("worker", {}).get("pid") == p)
                                 for p in {t.user_attrs.get("worker", {}).get("pid")
                                           for t in counted}},
           "trial_s_mean": (sum(t.user_attrs.get("timing", {}).get("total_s", 0) for t in done)
                            / max(1, len(done)))}
    if killed is not None:
        retry = retried.get(killed)
        out["killed_plan_rerun"] = bool(retry and retry.state.is_finished()
                                        and retry.state != FAIL)
        out["lost"] += 0 if out["killed_plan_rerun"] else 1
    first = min((t.datetime_start for t in counted if t.datetime_start), default=None)
    last = max((t.datetime_complete for t in counted if t.datetime_complete), default=None)
    if first and last:
        out["trials_wall_s"] = (last - first).total_seconds()
        out["trials_per_hour"] = len(counted) / out["trials_wall_s"] * 3600
    report = folder / "w0" / "report.json"
    if report.is_file() and "best" in json.loads(report.read_text()):
        out["best"] = json.loads(report.read_text())["best"]
    return out


def holdout_psnr(args, recipe: Path) -> float | None:
    if args.model != "demo" or not recipe.is_file():
        return None
    import autoquant

    pipe = autoquant.load_pipeline("demo")
    ev = autoquant.Evaluator(pipe, autoquant.EvalSettings.for_model("demo", "holdout"),
                             clip=autoquant.load_clip("demo"), progress=False)
    return ev.evaluate(autoquant.load_recipe(recipe)).metrics["psnr"]["mean"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--budget", default="30%")
    ap.add_argument("--space", default="default")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--storage", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", default="one,many,kill", help="which runs: one, many, kill")
    ap.add_argument("--json", default="bench/results/multiworker_demo_cpu.json")
    ap.add_argument("extra", nargs="*", help="more autoquant search arguments (after --)")
    args = ap.parse_args(argv)
    cluster = Cluster().start() if args.storage == "postgres" else None
    results: dict = {"environment": environment(), "args": vars(args), "runs": {}}
    try:
        for run in args.runs.split(","):
            folder = Path(tempfile.mkdtemp(prefix=f"multiworker-{run}-"))
            storage = (cluster.new_database(run) if cluster else
                       f"sqlite:///{folder / 'shared.db'}")
            n = 1 if run == "one" else args.workers
            r = measure_run(args, storage, folder, n, kill=run == "kill")
            r["holdout_psnr"] = holdout_psnr(args, folder / "w0" / "best.yaml")
            results["runs"][run] = r
            print(f"{run}: {n} worker(s), {r['counted']} trials in {r['wall_s']:.0f} s, "
                  f"duplicates {r['duplicates']}, lost {r['lost']}, sensitivity "
                  f"{r['sensitivity_wall_s'] or 0:.0f} s, held-out PSNR {r['holdout_psnr']}"
                  + (f", killed trial {r['killed_trial']} re-run: {r.get('killed_plan_rerun')}"
                     if run == "kill" else ""), flush=True)
            write_json(args.json, results)
    finally:
        if cluster:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

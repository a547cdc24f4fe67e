"""``autoquant search --devices cuda:0,cuda:1`` (or ``all``): one worker process per device on
this machine, all on one study. Each worker is a plain ``autoquant search`` with ``--device``;
this parent only starts them, shows the study's progress, passes Ctrl-C / SIGTERM on (each worker
ends its current trial), and writes the outputs once all are done. Each worker's own output goes
to ``OUT/workers/<n>-<device>.log``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from .._progress import tqdm
from ._outputs import tally, write_outputs
from ._study import default_study_name, open_storage


def _child_argv(argv: list[str], device: str) -> list[str]:
    """The parent's arguments without ``--devices``, with ``--device`` and ``--json``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--devices":
            skip = True
            continue
        if arg.startswith("--devices="):
            continue
        out.append(arg)
    return out + ["--device", device] + ([] if "--json" in out else ["--json"])


def threads_per_worker(workers: int) -> int:
    """CPU threads for each of ``workers`` processes on this host. GPU workers need their share
    too (image metrics, CLIP, decoding and the sampler run on the CPU): each taking every core
    oversubscribed a 32-core host and slowed each trial by 7% with two workers."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_workers(args, devices: list[str], out: Path) -> int:
    logs = out / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if len(devices) > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads_per_worker(len(devices)))
    children = []
    for i, device in enumerate(devices):
        log = open(logs / f"{i}-{device.replace(':', '')}.log", "w")
        children.append((subprocess.Popen(
            [sys.executable, "-m", "autoquant", *_child_argv(args.argv, device)],
            stdout=log, stderr=subprocess.STDOUT, env=env), log, device))
    print(f"started {len(children)} workers on {', '.join(devices)} (logs in {logs})",
          file=sys.stderr, flush=True)

    def forward(signum, _frame):
        for proc, _, _ in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        print(f"\n{signal.Signals(signum).name}: each worker ends its current trial",
              file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    storage = open_storage(args.storage, out)
    name = default_study_name(args.model, args.budget, args.study)
    bar = tqdm(total=args.trials, desc="search", unit="trial", disable=args.json, mininterval=1)
    try:
        while any(proc.poll() is None for proc, _, _ in children):
            if name in optuna.get_all_study_names(storage):
                study = optuna.load_study(study_name=name, storage=storage)
                bar.n = min(tally(study)["finished"], args.trials)
                bar.refresh()
            time.sleep(2)
    finally:
        bar.close()
        for s, h in previous.items():
            signal.signal(s, h)
        for _, log, _ in children:
            log.close()
    codes = {device: proc.returncode for proc, _, device in children}
    failed = {d: c for d, c in codes.items() if c}
    for device, code in failed.items():
        print(f"worker on {device} exited with {code}; see {logs}", file=sys.stderr)
    if name not in optuna.get_all_study_names(storage):
        return max(failed.values(), default=1)
    study = optuna.load_study(study_name=name, storage=storage)
    report = write_outputs(study, out, storage, {"workers": codes})
    if args.json:
        import json

        print(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1,
                         default=str))
    else:
        print(report["table"])
        if "best" in report:
            print(f"\nbest within budget: trial {report['best']['trial']}; recipe: "
                  f"{report['best']['recipe']}")
    return max(failed.values(), default=0)

"""A worker's loop: open or join the study, prepare what it shares, run trials until the study
holds ``--trials`` of them, write the outputs.

Plans come from the solver: the seed plans (queued once per study, in the storage, so they
survive any interruption), then proxy-repaired mutations of the study-wide best. A plan is
evaluated once per study: a worker whose proposal is already queued, running or finished
proposes another; two workers that queue the same plan at the same moment keep the older trial
and discard the newer ("discarded", not counted).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna

from .._format import human_bytes
from .._progress import tqdm
from ._outputs import tally, write_outputs
from ._search import Search
from ._setup import Stopped, plan_key, share, taken_plans
from ._study import create_or_join, heartbeat, open_storage, optuna_quietly, study_name
from ._trial import run_trial

WAITING = optuna.trial.TrialState.WAITING
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL


def run_search(search: Search, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run (or join, or continue) the study until it holds ``cfg.trials`` trials; write the
    outputs. ``stop``: set it (the CLI does, on Ctrl-C or SIGTERM) to end after the current
    trial."""
    cfg = search.cfg
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = stop or threading.Event()
    storage = open_storage(cfg.storage, out)
    from .space import OBJECTIVES

    directions = [OBJECTIVES[o] for o in search.objectives]
    study, created = create_or_join(storage, study_name(search), search.identity(), directions,
                                    search.objectives, cfg.resume, cfg.seed)
    store = _artifact_store(study, out, cfg.artifacts)
    try:
        share(search, study, storage, store, stop)
    except Stopped:
        return write_outputs(study, out, storage, {"timing": search.timing}, interrupted=True)
    worker = {"host": socket.gethostname(), "device": str(search.device), "pid": os.getpid()}
    dists = {g.name: optuna.distributions.CategoricalDistribution([c.label for c in g.options])
             for g in search.groups.groups}
    rng = random.Random(f"{cfg.seed}-{worker['host']}-{worker['pid']}")
    start = time.perf_counter()
    counts = tally(study)
    bar = tqdm(total=cfg.trials, initial=min(counts["finished"], cfg.trials), desc="search",
               unit="trial", disable=not cfg.progress, mininterval=1)
    ran = 0
    try:
        while not stop.is_set():
            if cfg.timeout and time.perf_counter() - start > cfg.timeout:
                break
            with optuna_quietly():
                optuna.storages.fail_stale_trials(study)
            counts = tally(study)
            bar.n = min(counts["finished"], cfg.trials)
            bar.refresh()
            if counts["finished"] >= cfg.trials:
                break
            if counts["counted"] >= cfg.trials and not counts["waiting"]:
                time.sleep(1.0)  # the last trials run elsewhere: wait for them (or their retry)
                continue
            if not counts["waiting"] and not _propose(search, study, rng):
                break  # the solver has nothing new to offer
            with optuna_quietly():
                trial = study.ask(dists)
            if _discard_if_not_needed(study, trial, cfg.trials):
                continue
            trial.set_user_attr("worker", worker)
            with heartbeat(storage, trial):
                run_trial(search, study, trial, store)
            ran += 1
            best = search.best(study)
            if best:
                bar.set_postfix({f"best {search.objectives[1]}": f"{best.values[1]:.4g}",
                                 "bytes": human_bytes(best.values[0])})
    finally:
        bar.close()
        search.cache.restore()
    extra = {"timing": search.timing, "quantize_s": search.cache.quantize_s,
             "cache": {"max_bytes": search.cache.max_bytes, "builds": search.cache.builds,
                       "evictions": search.cache.evictions,
                       "shrinks_after_out_of_memory": search.cache.shrinks},
             "worker": {**worker, "trials_run": ran, "created_study": created}}
    if getattr(search, "memory", None) is not None:  # where things lived, and the peak
        extra["memory"] = search.memory.to_dict()
    return write_outputs(study, out, storage, extra, interrupted=stop.is_set())


def _propose(search: Search, study: optuna.Study, rng: random.Random) -> bool:
    """Queue a plan the study has not seen: a mutation of the study-wide best."""
    taken = taken_plans(study)
    best = search.best(study)
    seeds = search.seeds() if best is None else []
    if best is None and not seeds:
        return False
    base = search.groups.choice(best.params) if best else seeds[0][1]
    for _ in range(50):
        choice = search.mutate(rng, base)
        if choice is None:
            return False
        params = search.groups.labels(choice)
        if plan_key(params) not in taken:
            study.enqueue_trial(params, user_attrs={"source": "mutation"}, skip_if_exists=False)
            return True
    return False


def _discard_if_not_needed(study: optuna.Study, trial: optuna.Trial, wanted: int) -> bool:
    """After ``ask``: drop the trial if it holds no queued plan (another worker popped the
    last one first, and Optuna made a new trial), if an older trial holds the same plan (two
    workers queued it at once), or if the study already counts ``wanted`` trials without it
    (several workers asked at once) -- counting the queued retries of lost trials, which are
    owed first. A dropped seed or retry is queued again, so nothing is lost."""
    if "source" not in trial.user_attrs:
        trial.set_user_attr("discarded", "no plan was queued (another worker took it)")
        study.tell(trial, state=FAIL)
        return True
    frozen = study.get_trials(deepcopy=False)
    counts = tally(study)
    mine = plan_key(trial.params)
    older = next((t.number for t in frozen if t.number < trial.number and t.params
                  and plan_key(t.params) == mine and t.number not in counts["retried"]
                  and "discarded" not in t.user_attrs and t.state != WAITING), None)
    if older is not None:
        reason = f"duplicate of trial {older}"
    else:
        ahead = sum(1 for t in frozen if t.number < trial.number and t.state != WAITING
                    and t.number not in counts["retried"] and "discarded" not in t.user_attrs)
        owed = sum(1 for t in frozen if t.state == WAITING and "retry_of" in t.user_attrs)
        if ahead + (0 if "retry_of" in trial.user_attrs else owed) < wanted:
            return False
        reason = f"surplus: the study already had {wanted} trials"
        if trial.user_attrs.get("source") != "mutation":  # a seed or a retry: keep it queued
            study.enqueue_trial(trial.params, user_attrs=dict(trial.user_attrs),
                                skip_if_exists=False)
    trial.set_user_attr("discarded", reason)
    study.tell(trial, state=FAIL)
    return True


def _artifact_store(study, out: Path, artifacts: str | Path | None):
    """This worker's artifact store: ``--artifacts`` if given; else the bucket the study records
    its artifacts in; else OUT/artifacts. The location used is remembered on the search (``search.artifacts``)."""
    from . import _artifacts

    study_location = _artifacts.recorded(study)
    if artifacts is None and study_location is not None and \
            _artifacts.is_remote(study_location["location"]):
        # a bucket is reachable from anywhere; a folder the study names is never used unasked
        # (another machine's path, or a hostile database's): the worker is told to pass it
        artifacts = study_location["location"]
    location = _artifacts.normalize(artifacts, out)
    store = _artifacts.open_store(location)
    store.location = location  # what prepare() records and errors name
    return store

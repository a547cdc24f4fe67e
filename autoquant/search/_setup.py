"""What the workers of one study share, done once: the full-precision references, the captured
denoiser inputs, the sensitivity table, and the queued seed plans.

The work is a queue of tasks in a companion study ``NAME:setup`` in the same storage, so it goes
through Optuna's storage like everything else (no coordinator of our own):

- ``prepare`` (one task): generate the references and capture the denoiser inputs, store both in
  the artifact store, pick the sensitivity mode;
- ``chunk`` (one per slice of groups): measure those rows of the sensitivity table -- so the
  table's wall time falls with the number of workers present;
- ``finish`` (one task): once every chunk is in, write the table to the study and queue the
  seed plans (the solver's and the uniform baselines). The worker holding it runs chunks that
  come back while it waits.

The task queue is created, exactly once, by the worker whose ``create_study`` succeeds. Tasks are
popped like Optuna pops queued trials and run under a heartbeat, so a task whose worker died is
queued again. Every worker then loads what it did not compute itself from the study.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from pathlib import Path

import optuna
import torch

from ._outputs import tally
from ._replay import Replay
from ._sensitivity import choose_mode, measure
from ._study import heartbeat, optuna_quietly, study_name

PREPARED = "prepared"
LATENCY = "latency"
SENSITIVITY = "sensitivity"
SEEDED = "seeded"
WAITING = optuna.trial.TrialState.WAITING
COMPLETE = optuna.trial.TrialState.COMPLETE
#: the table is cut in at most this many chunks (a few groups each on small models)
MAX_CHUNKS = 32


class Stopped(Exception):
    """The worker was asked to stop (Ctrl-C, SIGTERM) while setting up."""


def chunks(groups: int) -> list[tuple[int, int]]:
    size = max(1, math.ceil(groups / MAX_CHUNKS))
    return [(a, min(groups, a + size)) for a in range(0, groups, size)]


def _setup_study(storage, name: str, groups: int) -> optuna.Study:
    setup_name = f"{name}:setup"
    try:
        setup = optuna.create_study(study_name=setup_name, storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=setup_name, storage=storage)
    for task in ([{"task": "prepare"}]
                 + [{"task": "chunk", "start": a, "stop": b} for a, b in chunks(groups)]
                 + [{"task": "finish"}]):
        setup.enqueue_trial({}, user_attrs=task, skip_if_exists=False)
    return setup


def _pop(setup: optuna.Study):
    """The next queued task, or None. (ask() would make a new trial when the queue is empty, so
    the queue is looked at first; a trial made in a race is dropped.)"""
    if not setup.get_trials(deepcopy=False, states=(WAITING,)):
        return None
    with optuna_quietly():
        trial = setup.ask()
    if "task" not in trial.user_attrs:
        trial.set_user_attr("discarded", "no task was queued")
        setup.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    return trial


def share(search, study: optuna.Study, storage, store, stop: threading.Event) -> None:
    """Take setup tasks until the study is seeded, then make sure this worker holds the
    references, the captured inputs and the table. Raises Stopped if asked to stop first."""
    if not study.user_attrs.get(SEEDED):
        from .._progress import tqdm

        setup = _setup_study(storage, study_name(search), len(search.groups.groups))
        worker = _Worker(search, study, setup, storage, store, stop)
        total = len(chunks(len(search.groups.groups)))
        with tqdm(total=total, desc="sensitivity", unit="chunk", disable=not search.cfg.progress,
                  leave=False) as bar:
            worker.bar = bar
            while not study.user_attrs.get(SEEDED):
                if not worker.take_one():
                    time.sleep(0.5)
    _load_shared(search, study, store)


class _Worker:
    def __init__(self, search, study, setup, storage, store, stop):
        self.search, self.study, self.setup = search, study, setup
        self.storage, self.store, self.stop = storage, store, stop
        self.layer_inputs = None
        self.bar = None  # progress over the study's chunks (every worker's)

    def take_one(self) -> bool:
        """Run the next queued task, if there is one."""
        if self.stop.is_set():
            raise Stopped
        with optuna_quietly():
            optuna.storages.fail_stale_trials(self.setup)
        task = _pop(self.setup)
        if task is None:
            return False
        start = time.perf_counter()
        try:
            with heartbeat(self.storage, task):
                kind = task.user_attrs["task"]
                if kind == "prepare":
                    self.prepare()
                elif kind == "chunk":
                    a, b = task.user_attrs["start"], task.user_attrs["stop"]
                    task.set_user_attr("rows", self.rows(range(a, b)))
                else:
                    self.finish()
        except BaseException as e:  # stopped, or a failure: the task goes back to the queue
            attrs = {k: v for k, v in task.user_attrs.items() if k in ("task", "start", "stop")}
            self.setup.enqueue_trial({}, user_attrs={**attrs, "retry_of": task.number},
                                     skip_if_exists=False)
            task.set_user_attr("discarded", f"given back: {type(e).__name__}")
            self.setup.tell(task, state=optuna.trial.TrialState.FAIL)
            raise
        self.setup.tell(task, time.perf_counter() - start)
        if self.bar is not None:
            self.bar.n = sum(1 for t in self.setup.get_trials(deepcopy=False, states=(COMPLETE,))
                             if t.user_attrs.get("task") == "chunk")
            self.bar.refresh()
        return True

    def prepare(self) -> None:
        search, study, store = self.search, self.study, self.store
        t0 = time.time()
        search._inputs()
        if search.error is not None:  # a table given beforehand (a sweep over budgets)
            mode, probe_s = search.sensitivity_mode, search.timing.get("replay_s")
        else:
            mode, probe_s = choose_mode(search.cfg.sensitivity, search.replay, search.cache,
                                        search.groups, search.cfg.full_sensitivity_s,
                                        search.cfg.progress)
        from .._atomic import save_safetensors as save_file

        with tempfile.TemporaryDirectory() as tmp:
            refs = Path(tmp) / "references.safetensors"
            save_file({"images": search.evaluator.references.contiguous()}, str(refs))
            replay = search.replay.save(Path(tmp) / "replay.safetensors")
            ids = {name: optuna.artifacts.upload_artifact(
                study_or_trial=study, file_path=str(path), artifact_store=store)
                for name, path in (("references", refs), ("replay", replay))}
        study.set_user_attr("reference_artifact", search.upload_grid(
            study, store, search.evaluator.references, Path("references.png")))
        if search.searches_latency:  # one step-time model for every worker: one objective
            if search.budget.opt_lat is None:
                search.use_latency(search.measure_latency())
            study.set_user_attr(LATENCY, {**search.latency_info,
                                          "limit_s": search.budget.latency_limit_s})
        from . import _artifacts

        study.set_user_attr(_artifacts.LOCATION, {
            "location": getattr(store, "location", None), "host": _me(search)["host"]})
        study.set_user_attr(PREPARED, {**ids, "mode": mode, "replay_s": probe_s,
                                       "prepared_s": time.time() - t0,
                                       "prepared_at": time.time(), "by": _me(search)})

    def wait_for(self, key: str) -> dict:
        while True:
            value = self.study.user_attrs.get(key)
            if value is not None:
                return value
            if self.stop.is_set():
                raise Stopped
            time.sleep(0.5)

    def rows(self, indices) -> dict[str, list[float]]:
        search = self.search
        prepared = self.wait_for(PREPARED)
        if search.error is not None:
            return {str(i): search.error[i] for i in indices}
        _load_inputs(search, self.study, self.store)
        xs = None
        if prepared["mode"] == "anchored":  # every layer's inputs, captured once per worker
            if self.layer_inputs is None:
                search.cache.restore()
                self.layer_inputs = search.replay.layer_inputs(
                    {l.name: search.cache.originals[l.name] for g in search.groups.groups
                     for l in g.layers})
            xs = self.layer_inputs
        rows = measure(prepared["mode"], search.replay, search.cache, search.groups,
                       list(indices), progress=False, xs=xs, evaluator=search.evaluator)
        return {str(i): row for i, row in rows.items()}

    def finish(self) -> None:
        """Wait for every chunk (running the ones that come back), then write the table and
        queue the seed plans."""
        n = len(self.search.groups.groups)
        while True:
            done = {}
            for t in self.setup.get_trials(deepcopy=False, states=(COMPLETE,)):
                if t.user_attrs.get("task") == "chunk":
                    done.update({int(i): row for i, row in t.user_attrs["rows"].items()})
            if len(done) == n:
                break
            if not self.take_one():
                time.sleep(0.5)
        prepared = self.study.user_attrs[PREPARED]
        table = [done[i] for i in range(n)]
        self.study.set_user_attr(SENSITIVITY, {
            "mode": prepared["mode"], "replay_s": prepared["replay_s"], "table": table,
            "done_at": time.time(), "wall_s": time.time() - prepared["prepared_at"]})
        if self.search.error is None:
            self.search.use_sensitivity(table, prepared["mode"])
        enqueue_seeds(self.search, self.study)


def _me(search) -> dict:
    import socket

    return {"host": socket.gethostname(), "device": str(search.device), "pid": os.getpid()}


def _download(store, artifact_id: str, path: Path, study=None) -> Path:
    """An artifact of the study into ``path``; a store that cannot give it (another folder
    than the study's, an unreachable bucket) is one clear error naming where the study keeps
    its artifacts."""
    from . import _artifacts

    if path.exists():
        path.unlink()
    try:
        optuna.artifacts.download_artifact(artifact_store=store, file_path=str(path),
                                           artifact_id=artifact_id)
    except Exception as e:  # ArtifactNotFound, OSError, botocore's ClientError...
        if not isinstance(e, (optuna.artifacts.exceptions.ArtifactNotFound, OSError)) and \
                type(e).__module__.split(".")[0] not in ("botocore", "boto3", "google"):
            raise
        raise _artifacts.unreadable(getattr(store, "location", "this worker's artifact store"),
                                    _artifacts.recorded(study) if study is not None else None,
                                    e) from None
    return path


def _load_inputs(search, study, store) -> None:
    """The references and the captured inputs, from the study if this worker lacks them."""
    if search.evaluator is not None and search.replay is not None:
        return
    prepared = study.user_attrs[PREPARED]
    from safetensors.torch import load_file

    from ..scoring.evaluator import Evaluator

    with tempfile.TemporaryDirectory() as tmp:
        if search.evaluator is None:
            refs = load_file(str(_download(store, prepared["references"],
                                           Path(tmp) / "references.safetensors", study)))["images"]
            search.evaluator = Evaluator(search.pipe, search.settings, clip=search.cfg.clip,
                                         components=search.groups.components,
                                         progress=search.cfg.progress, key=search.model_key,
                                         references=refs, segments=search.stage_cut())
        if search.replay is None:
            search.replay = Replay.load(search.pipe, search.component,
                                        _download(store, prepared["replay"],
                                                  Path(tmp) / "replay.safetensors", study),
                                        search.device)
    search.measure_activations()  # under a memory plan: this worker's own, once
    search.calibrate()  # (gptq in the space: this worker's own calibration data, once)


def _load_shared(search, study, store) -> None:
    _load_inputs(search, study, store)
    if search.searches_latency and search.budget.opt_lat is None:
        search.use_latency(study.user_attrs[LATENCY])
    reused = search.error is None  # measured by another worker, or by an earlier run
    if reused:
        stored = study.user_attrs[SENSITIVITY]
        search.use_sensitivity(stored["table"], stored["mode"])
    search.timing.update(sensitivity_reused=reused,sensitivity_wall_s=study.user_attrs[SENSITIVITY].get("wall_s"),
                         sensitivity_mode=search.sensitivity_mode,
                         prepared_by=study.user_attrs[PREPARED].get("by"))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def taken_plans(study: optuna.Study) -> dict[tuple, int]:
    """Plans the study holds (queued, running or ended by their own fate) -> oldest trial."""
    counts = tally(study)
    out: dict[tuple, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.number in counts["retried"] or "discarded" in t.user_attrs or not t.params:
            continue
        out.setdefault(plan_key(t.params), t.number)
    return out


def enqueue_seeds(search, study: optuna.Study) -> None:
    """The solver's seed plans and the uniform baselines, queued once per study (in the
    storage: they survive any interruption)."""
    if study.user_attrs.get(SEEDED):
        return
    taken = taken_plans(study)
    for source, choice in search.seeds():
        params = search.groups.labels(choice)
        if plan_key(params) not in taken:
            study.enqueue_trial(params, user_attrs={"source": source}, skip_if_exists=False)
            taken[plan_key(params)] = -1
    study.set_user_attr(SEEDED, True)

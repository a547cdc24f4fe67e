"""Many workers, one study: worker *processes* on a real PostgreSQL server (and on SQLite, the
one-host storage), the demo-free tiny-flux model, heartbeats at 1 s so that a killed worker is
noticed in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from .pg import Cluster, bindir

FAIL, RUNNING = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING
STUDY = "shared"


@pytest.fixture(scope="module")
def cluster():
    if bindir() is None:
        pytest.skip("PostgreSQL is not installed here (.ci/run installs it)")
    c = Cluster().start()
    yield c
    c.stop()


@pytest.fixture()
def storage(request, cluster, tmp_path):
    """A fresh PostgreSQL database, or a SQLite file, per test."""
    if request.param == "postgres":
        return cluster.new_database(f"t{abs(hash(tmp_path)) % 10**8}")
    return f"sqlite:///{tmp_path / 'shared.db'}"


SPACE = """format: autoquant-space/1
candidates: [{method: hqq, bits: 2, group_size: 32}, {method: hqq, bits: 4, group_size: 32},
             {method: hqq, bits: 8, group_size: 32}, {method: none}]
"""


def worker(storage: str, tmp: Path, name: str, trials: int, *extra: str, seeds="0"):
    """One ``autoquant search`` process: a small space, two prompts, anchored sensitivity."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOQUANT_HEARTBEAT_S": "1",
           "AUTOQUANT_GRACE_S": "4", "AUTOQUANT_CACHE": str(tmp / "cache"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    (tmp / "space.yaml").write_text(SPACE)
    (tmp / "prompts.txt").write_text("a red cat\na blue car\n")
    log = open(tmp / f"{name}.log", "w")
    argv = [sys.executable, "-m", "autoquant", "search", "--model", "tiny-flux", "--dtype",
            "auto", "--budget", "45%", "--trials", str(trials), "--seeds", *seeds.split(),
            "--prompts", str(tmp / "prompts.txt"), "--space", str(tmp / "space.yaml"),
            "--sensitivity", "anchored", "--no-clip", "--storage", storage, "--study", STUDY,
            "--out", str(tmp / name), "--artifacts", str(tmp / "artifacts"), "--json", *extra]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(procs, tmp: Path, timeout=300) -> list[int]:
    codes = []
    for name, p in procs.items():
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(f"{name} did not finish: {(tmp / f'{name}.log').read_text()}")
    return codes


def load(storage: str) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=storage)


def accounted(study: optuna.Study, wanted: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly ``wanted`` trials count, none is left running, no plan ended twice, and every
    failed trial says why (discarded, or lost and retried)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    assert not [t for t in trials if t.state == RUNNING]
    counted = [t for t in trials if t.state.is_finished() and "discarded" not in t.user_attrs
               and t.number not in retried]
    assert len(counted) == wanted, [(t.number, t.state.name, t.user_attrs.get("discarded"))
                                    for t in trials]
    plans = [tuple(sorted(t.params.items())) for t in counted]
    assert len(plans) == len(set(plans)), "a plan was evaluated twice"
    for t in trials:
        if t.state == FAIL:
            assert "discarded" in t.user_attrs or t.number in retried or \
                "fail_reason" in t.user_attrs, t.number
    return counted


ONE_HOST = pytest.param("sqlite", marks=pytest.mark.slow)


@pytest.mark.parametrize("storage", ["postgres", ONE_HOST], indirect=True)
def test_three_workers_share_one_study(storage, tmp_path):
    procs = {f"w{i}": worker(storage, tmp_path, f"w{i}", 7) for i in range(3)}
    assert finish(procs, tmp_path) == [0, 0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:]
                                                  for i in range(3)]
    study = load(storage)
    counted = accounted(study, 7)
    workers = {t.user_attrs["worker"]["pid"] for t in counted}
    assert len(workers) >= 2, "the trials were not spread over the workers"
    setup = optuna.load_study(study_name=f"{STUDY}:setup", storage=storage)
    chunk_pids = {t.user_attrs.get("rows") is not None for t in setup.trials}
    assert chunk_pids == {True, False} or chunk_pids == {True}
    # the seeds were queued once: one trial per solver fraction
    sources = [t.user_attrs["source"] for t in study.trials if "discarded" not in t.user_attrs]
    assert sources.count("solver@100%") == 1
    report = json.loads((tmp_path / "w0" / "report.json").read_text())
    assert report["storage"].startswith(("postgresql+psycopg://", "sqlite:///"))
    assert all(t["worker"] for t in report["trials_detail"] if t["state"] == "COMPLETE")


def _running_trial_of(storage: str, pid: int, deadline: float):
    while time.time() < deadline:
        if STUDY in optuna.get_all_study_names(storage):
            for t in load(storage).get_trials(deepcopy=False, states=(RUNNING,)):
                if t.user_attrs.get("worker", {}).get("pid") == pid:
                    return t
        time.sleep(0.1)
    raise AssertionError("the worker never ran a trial")


@pytest.mark.parametrize("storage", ["postgres", ONE_HOST], indirect=True)
def test_a_killed_workers_trial_is_failed_by_heartbeat_and_run_again(storage, tmp_path):
    victim = worker(storage, tmp_path, "victim", 6, seeds="0 1 2 3")
    other = worker(storage, tmp_path, "other", 6, seeds="0 1 2 3")
    trial = _running_trial_of(storage, victim.pid, time.time() + 180)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert finish({"other": other}, tmp_path) == [0], (tmp_path / "other.log").read_text()[-3000:]
    study = load(storage)
    lost = study.trials[trial.number]
    assert lost.state == FAIL
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == trial.number]
    assert len(retry) == 1 and retry[0].state.is_finished() and retry[0].state != FAIL
    assert retry[0].params == lost.params
    assert retry[0].user_attrs["worker"]["pid"] == other.pid
    accounted(study, 6)
    report = json.loads((tmp_path / "other" / "report.json").read_text())
    assert report["trials"]["lost"] == 1
    assert any("worker lost" in f["reason"] for f in report["failed"])


@pytest.mark.parametrize("storage", ["postgres"], indirect=True)
def test_a_worker_with_other_settings_is_refused_before_it_writes(storage, tmp_path):
    assert finish({"first": worker(storage, tmp_path, "first", 1)}, tmp_path) == [0]
    before = [(t.number, t.state, t.user_attrs) for t in load(storage).trials]
    attrs = load(storage).user_attrs
    refused = {name: worker(storage, tmp_path, name, 1, *extra)  # both at once: they only start
               for name, extra in (("budget", ["--budget", "35%"]), ("steps", ["--steps", "2"]))}
    for name, p in refused.items():
        assert p.wait(120) == 2
        log = (tmp_path / f"{name}.log").read_text()
        assert "cannot join it" in log and "Traceback" not in log
    assert "budget: this worker 35%" in (tmp_path / "budget.log").read_text()
    assert "settings.steps: this worker 2" in (tmp_path / "steps.log").read_text()
    assert [(t.number, t.state, t.user_attrs) for t in load(storage).trials] == before
    assert load(storage).user_attrs == attrs


@pytest.mark.parametrize("storage", ["postgres"], indirect=True)
def test_resume_leaves_a_live_workers_trial_alone(storage, tmp_path):
    live = worker(storage, tmp_path, "live", 4, seeds="0 1 2 3")
    trial = _running_trial_of(storage, live.pid, time.time() + 180)
    resumed = worker(storage, tmp_path, "resumed", 4, "--resume", seeds="0 1 2 3")
    assert finish({"live": live, "resumed": resumed}, tmp_path) == [0, 0]
    study = load(storage)
    assert study.trials[trial.number].state != FAIL  # the live worker's trial ran to its end
    assert study.trials[trial.number].user_attrs["worker"]["pid"] == live.pid
    accounted(study, 4)

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


def worker(storage: str, tmp: Path, name: str, trials: int, *extra: str, seeds="0",
           artifacts: str | None = None, env_extra: dict | None = None):
    """One ``autoquant search`` process: a small space, two prompts, anchored sensitivity.
    ``artifacts``: its ``--artifacts`` (default one folder for all); with one given, the worker
    also gets a cache of its own (nothing shared but the database and the artifact store)."""
    cache = tmp / (f"{name}-cache" if artifacts else "cache")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOQUANT_HEARTBEAT_S": "1",
           "AUTOQUANT_GRACE_S": "4", "AUTOQUANT_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    (tmp / "space.yaml").write_text(SPACE)
    (tmp / "prompts.txt").write_text("a red cat\na blue car\n")
    log = open(tmp / f"{name}.log", "w")
    argv = [sys.executable, "-m", "autoquant", "search", "--model", "tiny-flux", "--dtype",
            "auto", "--budget", "45%", "--trials", str(trials), "--seeds", *seeds.split(),
            "--prompts", str(tmp / "prompts.txt"), "--space", str(tmp / "space.yaml"),
            "--sensitivity", "anchored", "--no-clip", "--storage", storage, "--study", STUDY,
            "--out", str(tmp / name), "--artifacts", artifacts or str(tmp / "artifacts"),
            "--json", *extra]
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


# -- workers that share no folder: artifacts in S3 -------------------------------------------
@pytest.fixture(scope="module")
def s3():
    """A real S3 server (moto's, on a free local port) and the AWS settings that reach it."""
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="studies")
    yield env, client
    server.stop()


@pytest.mark.parametrize("storage", ["postgres"], indirect=True)
def test_three_workers_with_no_shared_folder_share_a_study_through_s3(storage, tmp_path, s3,
                                                                       monkeypatch):
    env, client = s3
    where = "s3://studies/team/run-1"
    procs = {f"w{i}": worker(storage, tmp_path, f"w{i}", 7, artifacts=where, env_extra=env)
             for i in range(3)}
    assert finish(procs, tmp_path) == [0, 0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:]
                                                  for i in range(3)]
    study = load(storage)
    counted = accounted(study, 7)  # no plan twice, none left running
    assert len({t.user_attrs["worker"]["pid"] for t in counted}) >= 2
    assert study.user_attrs["artifacts"]["location"] == "s3://studies/team/run-1/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="studies").get("Contents", [])]
    assert keys and all(k.startswith("team/run-1/") for k in keys)
    assert not any((tmp_path / f"w{i}" / "artifacts").exists() for i in range(3))
    # the report, from the database alone, reads the images from the bucket the study names
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from autoquant import explore

    view = explore.open_study(storage=storage, study=STUDY)
    html = explore.write_report(view, tmp_path / "report.html").read_text()
    assert html.count("data:image/png") >= 2


@pytest.mark.parametrize("storage", ["postgres"], indirect=True)
def test_a_worker_that_cannot_read_the_studys_artifacts_is_told_where_they_are(storage,
                                                                             tmp_path):
    first = worker(storage, tmp_path, "first", 1, artifacts=str(tmp_path / "a"))
    assert finish({"first": first}, tmp_path) == [0], (tmp_path / "first.log").read_text()
    other = worker(storage, tmp_path, "other", 3, artifacts=str(tmp_path / "b"))
    assert other.wait(180) == 2
    text = (tmp_path / "other.log").read_text()
    assert "Traceback" not in text
    assert f"the study keeps them at {tmp_path / 'a'}" in text and "pass --artifacts" in text

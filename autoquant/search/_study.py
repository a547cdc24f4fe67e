"""The study's lifecycle: its storage, creating or joining it, and what every trial shares.

- **Storage.** ``--storage`` takes any SQLAlchemy URL Optuna's RDB storage takes (default: SQLite
  in ``--out``). Every storage is opened with Optuna's heartbeat, so a trial whose worker died
  (kill -9, OOM-killed, machine lost) goes stale, is failed by the next worker that looks, and its
  plan is queued again (:func:`_requeue_lost`). SQLite runs every transaction as ``BEGIN
  IMMEDIATE``: without it two processes can both pop the same queued trial. ``postgresql://``
  picks the installed driver (psycopg 3, else psycopg2); several workers creating the schema of an
  empty database at once retry instead of crashing.
- **Create or join.** The first worker creates the study and writes its identity (model, weights,
  dtype, budget, space, objectives, evaluation settings); a later worker with the same identity
  joins, one whose identity differs is refused with the differences named -- before any image is
  made. ``--resume`` only insists that the study exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import optuna

from .._errors import InputError
from .._format import human_bytes

#: seconds between a running trial's heartbeats, and without one before it counts as lost
HEARTBEAT_S = int(os.environ.get("AUTOQUANT_HEARTBEAT_S", 10))
GRACE_S = int(os.environ.get("AUTOQUANT_GRACE_S", 60))
IDENTITY = "autoquant"
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "lustre",
               "gpfs", "ceph", "fuse.gcsfuse", "fuse.s3fs", "glusterfs", "beegfs"}


@contextlib.contextmanager
def optuna_quietly():
    """Optuna warns that heartbeats are experimental and "supposed to be used with
    Study.optimize"; autoquant uses them with ask/tell on purpose (and beats itself)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


def default_study_name(model: str, budget: str, study: str | None = None) -> str:
    """``--study``, else ``autoquant-MODEL-BUDGET`` (the same on every worker)."""
    return study or f"autoquant-{model.replace('/', '-')}-{budget}"


def study_name(search) -> str:
    return default_study_name(search.cfg.model, search.cfg.budget, search.cfg.study)


def default_storage_url(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def _filesystem_type(path: Path) -> str | None:
    """The mount type of the file system holding ``path`` (Linux), else None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


def _sqlite_path(url: str) -> Path | None:
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def _postgres_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed (SQLAlchemy 2.1 would pick psycopg 3
    and fail with an ImportError when only psycopg2 is there)."""
    scheme, rest = url.split("://", 1)
    if "+" in scheme:
        driver = scheme.split("+", 1)[1]
        module = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pg8000": "pg8000",
                  "asyncpg": "asyncpg"}.get(driver, driver)
        if importlib.util.find_spec(module) is None:
            raise InputError(f"--storage {scheme}://...: the driver {driver} is not installed "
                             f"(pip install \"autoquant[postgres]\" installs psycopg)")
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise InputError("--storage postgresql://... needs a PostgreSQL driver: "
                     "pip install \"autoquant[postgres]\" (psycopg)")


def _sqlite_serializable(engine) -> None:
    """Every transaction BEGIN IMMEDIATE: pops of queued trials and state changes cannot
    interleave between processes (pysqlite otherwise begins lazily, after the read)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made so far lack the hooks


def open_storage(url: str | None, out: Path, heartbeat_s: int = HEARTBEAT_S,
                 grace_s: int = GRACE_S):
    """Optuna's RDB storage for ``url`` (default: SQLite in ``out``), with heartbeats."""
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    url = url or default_storage_url(out)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    family = scheme.split("+", 1)[0]
    engine_kwargs: dict[str, Any] = {}
    if family == "sqlite":
        path = _sqlite_path(url)
        if path is not None:
            if not path.parent.is_dir():
                raise InputError(f"--storage {url}: the folder {path.parent} does not exist")
            fs = _filesystem_type(path.parent)
            if fs in _NETWORK_FS:
                raise InputError(
                    f"--storage {url}: SQLite on a network file system ({fs}) does not lock "
                    f"reliably between processes or machines; put --out on a local disk, or use "
                    f"PostgreSQL for workers on several machines")
        engine_kwargs["connect_args"] = {"timeout": 120}
    elif family in ("postgresql", "postgres"):
        url = _postgres_url(url.replace("postgres://", "postgresql://", 1))
    elif family not in ("mysql", "oracle", "mssql"):
        raise InputError(f"--storage {url!r}: use a database URL such as "
                         f"sqlite:///path/study.db or postgresql://user@host/db")
    last: Exception | None = None
    for attempt in range(8):  # workers creating the schema of an empty database at once
        try:
            with optuna_quietly():
                storage = RDBStorage(url, engine_kwargs=engine_kwargs,
                                     heartbeat_interval=heartbeat_s, grace_period=grace_s,
                                     heartbeat_stale_trial_callback=_requeue_lost)
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            last = e
            time.sleep(0.2 + random.random() * (attempt + 1))
        except sqlalchemy.exc.OperationalError as e:
            raise InputError(f"--storage {url}: cannot open the database: "
                             f"{str(e.orig).strip().splitlines()[0]}") from None
        except sqlalchemy.exc.ArgumentError as e:
            raise InputError(f"--storage {url!r}: not a database URL ({e})") from None
        except ImportError as e:
            raise InputError(f"--storage {url}: {e}") from None
        except (sqlalchemy.exc.DatabaseError, ValueError, RuntimeError) as e:
            # a damaged or truncated SQLite file, a database that is not Optuna's, a schema
            # of another Optuna version
            why = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise InputError(f"--storage {url}: not a readable Optuna study database ({why}); "
                             f"if it is damaged, restore it from a copy or start again with "
                             f"another --out") from None
    else:
        raise InputError(f"--storage {url}: could not create the schema: {last}")
    if family == "sqlite":
        _sqlite_serializable(storage.engine)
    return storage


def _requeue_lost(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker stopped beating was just failed (by exactly one worker): queue its
    plan (or its setup task) again, marked as the retry of it."""
    if "task" in trial.user_attrs:
        attrs = {k: v for k, v in trial.user_attrs.items() if k in ("task", "start", "stop")}
        study.enqueue_trial({}, user_attrs={**attrs, "retry_of": trial.number},
                            skip_if_exists=False)
    elif trial.params:
        study.enqueue_trial(trial.params, user_attrs={
            "source": trial.user_attrs.get("source", "retry"), "retry_of": trial.number},
            skip_if_exists=False)


@contextlib.contextmanager
def heartbeat(storage, trial: optuna.Trial, interval: float = HEARTBEAT_S):
    """Beat for ``trial`` while the block runs (the first beat before anything else)."""
    trial_id = trial._trial_id  # Optuna exposes no public id; RDBStorage.record_heartbeat needs it
    storage.record_heartbeat(trial_id)
    stop = threading.Event()

    from sqlalchemy.exc import SQLAlchemyError

    def beat():
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except (SQLAlchemyError, OSError):  # a missed beat is retried; the trial goes on
                pass

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def create_or_join(storage, name: str, identity: dict, directions: list[str],
                   metric_names: list[str], resume: bool, seed: int = 0):
    """``(study, created)``. Refuses a study whose identity differs from ``identity``, and
    ``resume`` of a study that does not exist."""
    identity = json.loads(json.dumps(identity, default=str))  # as the storage will return it
    exists = name in optuna.get_all_study_names(storage)
    if resume and not exists:
        raise InputError(f"--resume: there is no study {name!r} in this storage to continue; "
                         f"leave out --resume to start it")
    created = False
    if not exists:
        try:
            study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                        sampler=optuna.samplers.RandomSampler(seed=seed))
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker created it a moment ago: join it
    if created:
        study.set_user_attr(IDENTITY, identity)
        with optuna_quietly():
            study.set_metric_names(metric_names)
        return study, True
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=seed))
    theirs = _wait_for_identity(study)
    differences = compare_identity(identity, theirs)
    if differences:
        raise InputError(f"study {name!r} was started with other settings, so this worker "
                         f"cannot join it:\n  - " + "\n  - ".join(differences) +
                         "\nRun with the study's settings, or pick another --study NAME / --out.")
    return study, False


def _wait_for_identity(study: optuna.Study, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        info = study.user_attrs.get(IDENTITY)
        if info is not None:
            return info
        if time.monotonic() > deadline:
            raise InputError(f"study {study.study_name!r} was not made by autoquant search (it "
                             f"has no {IDENTITY!r} attribute); pick another --study NAME")
        time.sleep(0.5)


#: identity keys that must be equal to join, with how to show them
_IDENTITY_KEYS = ("model", "fingerprint", "weights", "dtype", "budget", "space", "candidates",
                  "objectives", "settings", "clip", "latency", "latency_mode")


def precheck(storage, name: str, partial: dict) -> None:
    """Before the model is loaded: refuse at once to join a study whose settings differ in
    what can be known without the model (budget as written, space, settings, dtype, CLIP)."""
    if name not in optuna.get_all_study_names(storage):
        return
    theirs = optuna.load_study(study_name=name, storage=storage).user_attrs.get(IDENTITY)
    if not isinstance(theirs, dict):
        return  # being created right now, or not autoquant's: create_or_join says which
    mine = json.loads(json.dumps(partial, default=str))
    differences = compare_identity(mine, theirs, only=set(mine))
    if differences:
        raise InputError(f"study {name!r} was started with other settings, so this worker "
                         f"cannot join it:\n  - " + "\n  - ".join(differences) +
                         "\nRun with the study's settings, or pick another --study NAME / --out.")


def compare_identity(mine: dict, theirs: dict, only: set | None = None) -> list[str]:
    """Human-readable differences that forbid joining (empty: the same search)."""
    out = []
    for key in _IDENTITY_KEYS:
        if only is not None and key not in only:
            continue
        a, b = mine.get(key), theirs.get(key)
        if key == "budget":
            a, b = mine.get("budget_bytes"), theirs.get("budget_bytes")
            if a is None:  # not known yet (before the model is loaded): as written
                if mine.get("budget") != theirs.get("budget"):
                    out.append(f"budget: this worker {mine.get('budget')}, the study "
                               f"{theirs.get('budget')}")
            elif b is not None and int(a) != int(b):
                out.append(f"budget: this worker {mine.get('budget')} ({human_bytes(a)}), "
                           f"the study {theirs.get('budget')} ({human_bytes(b)})")
            continue
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}.{sub}: this worker {_short(a.get(sub))}, the study "
                               f"{_short(b.get(sub))}")
        else:
            out.append(f"{key}: this worker {_short(a)}, the study {_short(b)}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

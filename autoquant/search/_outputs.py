"""What a study leaves for people: ``best.yaml``, ``pareto/``, ``report.json`` -- written from the
study alone (its identity attribute holds everything needed, the model is not), so any worker,
or anyone with the storage URL, can write them. :func:`plan_recipe` is the one place a trial's
plan becomes a recipe (the explorer's export uses it too)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import optuna

from .. import _atomic
from .._format import human_bytes, table
from ..backends import backend_for, config_from_dict, full_precision
from ..generation.calibration import calibration_seeds
from ..plans.recipe import Recipe
from ._study import IDENTITY

#: the generation settings a recipe with calibrated layers records (provenance.calibration)
CALIBRATION_KEYS = ("prompts", "seeds", "steps", "guidance", "height", "width")

COMPLETE = optuna.trial.TrialState.COMPLETE


_NUMBER = (int, float)
_STR_LIST = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
#: the identity's fields that outputs and reports read, and what each must hold
_IDENTITY_FIELDS = {
    "model": lambda v: isinstance(v, str), "budget": lambda v: isinstance(v, str),
    "budget_bytes": lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool) and v >= 0,
    "fp_bytes": lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool) and v > 0,
    "objectives": lambda v: _STR_LIST(v) and len(v) >= 2 and v[0] == "bytes",
    "space_name": lambda v: isinstance(v, str), "fingerprint": lambda v: isinstance(v, str),
    "components": _STR_LIST, "fixed": _STR_LIST, "prompts": _STR_LIST,
    "source": lambda v: isinstance(v, dict),
    "bits": lambda v: isinstance(v, dict) and all(isinstance(x, _NUMBER) for x in v.values()),
    "versions": lambda v: isinstance(v, dict),
    "groups": lambda v: isinstance(v, dict) and all(_STR_LIST(x) for x in v.values()),
    "configs": lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
    "settings": lambda v: isinstance(v, dict) and _STR_LIST(v.get("prompts"))
    and isinstance(v.get("seeds"), list)
    and all(isinstance(x, int) and not isinstance(x, bool) for x in v["seeds"]),
}


def checked_identity(study: optuna.Study) -> dict:
    """The study's identity attribute, refused with one clear error unless every field the
    outputs read holds what autoquant writes (a study database may come from anyone)."""
    from .._errors import InputError

    info = study.user_attrs.get(IDENTITY)
    if not isinstance(info, dict):
        raise InputError(f"study {study.study_name!r} was not made by autoquant search (it has "
                         f"no {IDENTITY!r} attribute)")
    bad = [k for k, ok in _IDENTITY_FIELDS.items() if k not in info or not ok(info[k])]
    if bad:
        raise InputError(f"study {study.study_name!r}: its {IDENTITY!r} attribute is not what "
                         f"autoquant search writes (wrong or missing: {', '.join(bad)}); the "
                         f"database was changed by hand or by another tool")
    return info


def study_info(study: optuna.Study) -> dict:
    """The study's identity (checked), with the step-time limit in seconds when it has one."""
    info = dict(checked_identity(study))
    info["latency_limit_s"] = (study.user_attrs.get("latency") or {}).get("limit_s")
    return info


def quality_objectives(info: dict) -> list[str]:
    """The image metrics among the objectives (maximized), in their order."""
    return [o for o in info["objectives"] if o not in ("bytes", "latency")]


def trial_metrics(info: dict, trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """``{objective: value}`` of a complete trial."""
    return dict(zip(info["objectives"], trial.values))


def best_trial(study: optuna.Study, info: dict):
    """The complete trial within the budget (and the latency limit, if any) with the best first
    quality objective (the next ones break ties), or None."""
    quality = quality_objectives(info)
    limit = info.get("latency_limit_s")
    ok = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
          if t.values and t.values[0] <= info["budget_bytes"]
          and (limit is None or t.user_attrs.get("predicted_latency_s", 0) <= limit * 1.000001)]
    return max(ok, key=lambda t: [trial_metrics(info, t)[q] for q in quality], default=None)


def plan_recipe(info: dict, params: dict[str, str], metrics: dict | None = None,
                trial: int | None = None, study: str | None = None) -> Recipe:
    """A trial's plan as a recipe: one exact entry per searched layer, the base model's id and
    fingerprint, the budget, the metrics and where it came from."""
    configs = {label: config_from_dict(c) for label, c in info["configs"].items()}
    layers = {name: configs[full_precision().label] for name in info["fixed"]}
    for group, names in info["groups"].items():
        for name in names:
            layers[name] = configs[params[group]]
    settings = info["settings"]
    prompts_hash = hashlib.sha256("\n".join(settings["prompts"]).encode()).hexdigest()[:12]
    provenance = {**info["versions"], "study": study, "trial": trial,
                  "space": info["space_name"], "prompts_sha256": prompts_hash,
                  "seeds": list(settings["seeds"])}
    if any(backend_for(c).needs_calibration(c) for c in layers.values()):
        # what apply calibrates on, so that its gptq layers are the ones this search scored
        provenance["calibration"] = {**{k: settings[k] for k in CALIBRATION_KEYS},
                                     "seeds": calibration_seeds(settings["seeds"])}
    return Recipe(
        layers=dict(sorted(layers.items())), components=list(info["components"]),
        model={**info["source"], "fingerprint": info["fingerprint"]},
        budget={"spec": info["budget"], "bytes": int(info["budget_bytes"])},
        metrics=metrics,
        provenance=provenance)


def storage_label(storage) -> str:
    """The storage's URL, password hidden (what report.json says)."""
    url = getattr(storage, "url", None)
    if url is None:
        return "(not a database storage)"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def tally(study: optuna.Study) -> dict[str, Any]:
    """Trials by what happened to them. ``counted``: those that count towards ``--trials``
    (ended or running); lost (retried), duplicate and surplus trials do not."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"]: t.number for t in trials
               if isinstance(t.user_attrs.get("retry_of"), int)}
    out: dict[str, Any] = {s.name.lower(): 0 for s in optuna.trial.TrialState}
    out.update(lost=0, discarded=0, counted=0, finished=0)
    for t in trials:
        out[t.state.name.lower()] += 1
        if t.state == optuna.trial.TrialState.FAIL and t.number in retried:
            out["lost"] += 1
        elif "discarded" in t.user_attrs:
            out["discarded"] += 1
        elif t.state != optuna.trial.TrialState.WAITING:
            out["counted"] += 1
            out["finished"] += t.state.is_finished()
    out["retried"] = retried
    return out


def fail_reason(trial: optuna.trial.FrozenTrial, retried: dict[int, int]) -> str:
    if trial.number in retried:
        return (f"worker lost (its heartbeat stopped); the plan was re-run as trial "
                f"{retried[trial.number]}")
    if "discarded" in trial.user_attrs:
        return trial.user_attrs["discarded"]
    return trial.user_attrs.get("fail_reason") or "the worker stopped without recording a reason"


@contextlib.contextmanager
def _locked(out: Path):
    """Workers on one machine write the same folder: one at a time."""
    import fcntl

    with open(out / ".outputs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_write_text = _atomic.write_text


def study_folder(out: str | Path, study_name: str) -> Path:
    """``OUT/studies/<name>``: where one study's outputs live, apart from every other study's.
    A name that is not a plain file name (``/``, ``..``, spaces...) gets a safe spelling plus a
    hash of the real name, so two names never share a folder."""
    safe = "".join(c if c.isalnum() or c in "._%+-=@" else "_" for c in study_name)[:80]
    if safe != study_name or safe.startswith("."):
        safe = f"{safe.lstrip('.') or 'study'}-{hashlib.sha256(study_name.encode()).hexdigest()[:8]}"
    return Path(out) / "studies" / safe


def write_outputs(study: optuna.Study, out: str | Path, storage=None,
                  extra: dict | None = None, interrupted: bool = False) -> dict:
    """The study's ``best.yaml``, ``pareto/trial-NNNN.yaml`` and ``report.json`` in
    :func:`study_folder` (``OUT/studies/<study>/``), and the same three at the top of ``out``:
    the last study that wrote there. Each study's own folder is only ever rewritten by that study,
    so a second search into the same ``--out`` loses nothing of the first. Every file is written
    atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = study_info(study)
    objectives = info["objectives"]
    counts = tally(study)
    complete = study.get_trials(deepcopy=False, states=(COMPLETE,))
    pareto = study.best_trials if complete else []
    rows, front, files = [], [], {}
    best = best_trial(study, info)
    own = study_folder(out, study.study_name)
    for t in sorted(pareto, key=lambda t: t.values[0]):
        metrics = {**{k: (int(v) if k == "bytes" else v)
                      for k, v in trial_metrics(info, t).items()},
                   "within_budget": t.values[0] <= info["budget_bytes"]}
        name = f"pareto/trial-{t.number:04d}.yaml"
        files[name] = plan_recipe(info, t.params, metrics, t.number, study.study_name).to_yaml()
        front.append({"trial": t.number, "recipe": str(own / name), **metrics,
                      "source": t.user_attrs.get("source")})
        rows.append([str(t.number), t.user_attrs.get("source", ""), human_bytes(t.values[0]),
                     f"{t.values[0] / info['fp_bytes']:.1%}",
                     *[_fmt(o, v) for o, v in zip(objectives[1:], t.values[1:])],
                     "yes" if metrics["within_budget"] else "no"])
    report: dict[str, Any] = {
        "study": study.study_name, "storage": storage_label(storage), "outputs": str(own),
        "model": info["model"], "space": info["space_name"], "budget": info["budget"],
        "budget_bytes": info["budget_bytes"], "fp_bytes": info["fp_bytes"],
        "objectives": objectives, "groups": len(info["groups"]),
        "fixed_layers": len(info["fixed"]),
        "trials": {k: v for k, v in counts.items() if k != "retried"},
        "interrupted": interrupted, "pareto": front,
        "failed": [{"trial": t.number, "reason": fail_reason(t, counts["retried"]),
                    "worker": t.user_attrs.get("worker")}
                   for t in study.get_trials(deepcopy=False)
                   if t.state == optuna.trial.TrialState.FAIL],
        "trials_detail": [_trial_row(t) for t in study.get_trials(deepcopy=False)],
        "trial_timing": [dict(trial=t.number, state=t.state.name, **t.user_attrs["timing"],
                              **({"peak_gpu_bytes": t.user_attrs["peak_gpu_bytes"]}
                                 if "peak_gpu_bytes" in t.user_attrs else {}))
                         for t in study.get_trials(deepcopy=False)
                         if isinstance(t.user_attrs.get("timing"), dict)],
        **(extra or {}),
    }
    if best is not None:
        metrics = {k: (int(v) if k == "bytes" else v)
                   for k, v in trial_metrics(info, best).items()}
        metrics["pipeline_bytes"] = int(best.values[0] + info.get("other_components_bytes", 0))
        files["best.yaml"] = plan_recipe(info, best.params, metrics, best.number,
                                         study.study_name).to_yaml()
        report["best"] = {"trial": best.number, "recipe": str(out / "best.yaml"),
                          "study_recipe": str(own / "best.yaml"), **metrics}
    files["report.json"] = json.dumps(report, indent=1, default=str)
    with _locked(out):
        _write_set(own, files)
        _write_set(out, files)
    report["table"] = table(rows, ["trial", "source", "bytes", "of fp",
                                   *[_HEADERS.get(o, o) for o in objectives[1:]], "in budget"])
    return report


def _write_set(folder: Path, files: dict[str, str]) -> None:
    """Write ``files`` (relative name -> text) into ``folder``, each atomically, and remove the
    pareto recipes of trials that left the front (they were this folder's study's own)."""
    (folder / "pareto").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        _write_text(folder / name, text)
    for old in (folder / "pareto").glob("*.yaml"):
        if f"pareto/{old.name}" not in files:
            old.unlink(missing_ok=True)
    if "best.yaml" not in files:  # no trial within budget (yet): no best of another study
        (folder / "best.yaml").unlink(missing_ok=True)


_HEADERS = {"psnr": "PSNR", "ssim": "SSIM", "clip_fidelity": "CLIP fid", "latency": "step"}


def _fmt(objective: str, value: float) -> str:
    if math.isinf(value):
        return "inf"
    if objective == "latency":
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f}" if objective == "psnr" else f"{value:.4f}"


def _trial_row(t: optuna.trial.FrozenTrial) -> dict:
    a = t.user_attrs
    return {"trial": t.number, "state": t.state.name, "source": a.get("source"),
            "worker": a.get("worker"), "values": t.values, "timing": a.get("timing"),
            "pruned_at": a.get("pruned_at"),
            **({"infeasible_reason": a["infeasible_reason"]} if "infeasible_reason" in a else {})}

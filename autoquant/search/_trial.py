"""One trial, scored in stages: constraints (no image), the assembled model's proxy error, a
quarter of the search images (a candidate far below the best stops there), the full search set.

A trial that fails the way trials fail -- out of memory, non-finite images or metrics, a
quantization library failing on a layer -- is recorded with its reason and the study goes on.
Anything else is a bug: the trial is recorded as failed and the error propagates.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import optuna
import torch

from .._errors import BackendError, NonFiniteError

PRUNED = optuna.trial.TrialState.PRUNED
FAIL = optuna.trial.TrialState.FAIL


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text
                                                or "can't allocate memory" in text)


def is_trial_failure(error: BaseException) -> bool:
    """The failures a search records and survives."""
    return isinstance(error, (NonFiniteError, BackendError)) or is_out_of_memory(error)


def run_trial(search, study: optuna.Study, trial: optuna.Trial, store=None) -> None:
    """Score ``trial``'s plan and tell the study. Raises only for errors that are bugs."""
    cfg = search.cfg
    choice = search.groups.choice(trial.params)
    cons = search.constraints(choice)
    trial.set_user_attr("constraints", cons)
    # Optuna's own constraint record (what constraints-aware samplers and dashboards read)
    trial.set_constraint("bytes_over_budget", cons[0])
    trial.set_constraint("fp_weights_over_cap", cons[1])
    plan_bytes = search.plan_bytes(choice)
    trial.set_user_attr("predicted_bytes", plan_bytes)
    trial.set_user_attr("proxy_error_additive", search.proxy(choice))
    predicted_latency = search.plan_latency(choice)
    if predicted_latency is not None:
        trial.set_user_attr("predicted_latency_s", predicted_latency)
        if len(cons) > 2:
            trial.set_constraint("latency_over_limit", cons[2])
    if max(cons) > 0:  # infeasible: costs no generation
        trial.set_user_attr("pruned_at", "constraints")
        study.tell(trial, state=PRUNED)
        return
    memory = getattr(search, "memory", None)
    room = memory.cache_bytes if memory is not None else None  # what one plan may take
    if room is not None and plan_bytes > room:  # would not fit: no image either
        trial.set_user_attr("pruned_at", "gpu memory")
        trial.set_user_attr("infeasible_reason", (
            f"the assembled plan needs {plan_bytes:,} bytes on the GPU; "
            f"{room:,} are left for it under the {memory.cap:,}-byte cap"))
        study.tell(trial, state=PRUNED)
        return
    if memory is not None:
        memory.start_trial()
    t0 = time.perf_counter()
    try:
        search.cache.assemble(search.groups.plan(choice))
        t_assemble = time.perf_counter() - t0
        t1 = time.perf_counter()
        proxy = search.replay.error()
        trial.set_user_attr("proxy_error", proxy if math.isfinite(proxy) else None)
        t_proxy = time.perf_counter() - t1
        ev = search.evaluator
        n = len(ev.pairs)
        k = (search.stage_cut() or (n,))[0]
        best = search.best(study)
        if k < n:
            m, gen, met = ev.score(list(range(k)))
            first = ev.last_images
            trial.set_user_attr("stage1_psnr", m["psnr"]["mean"])
            best_stage = best.user_attrs.get("stage1_psnr") if best is not None else None
            # uniform baselines always get the full set: they are drawn next to the front
            baseline = trial.user_attrs.get("source", "").startswith("uniform")
            if (not baseline and best_stage is not None
                    and m["psnr"]["mean"] < best_stage - cfg.stage_margin_db):
                trial.set_user_attr("pruned_at", f"stage 1 ({k} of {n} images)")
                _timing(trial, t_assemble, t_proxy, gen, met, t0)
                study.tell(trial, state=PRUNED)
                return
            rest, g_s, m_s = ev.score(list(range(k, n)))
            gen, met = gen + g_s, met + m_s
            metrics = _merge(m, k, rest, n - k)
            images = torch.cat([first, ev.last_images])
        else:
            metrics, gen, met = ev.score()
            images = ev.last_images
        if predicted_latency is not None:  # measured too, eager, one step of one sample
            trial.set_user_attr("measured_latency_s", search.replay.step_seconds())
        values = [plan_bytes] + [
            predicted_latency if o == "latency" else metrics[o]["mean"]
            for o in search.objectives[1:]]
        if any(math.isnan(v) for v in values) or any(
                math.isinf(v) for o, v in zip(search.objectives[1:], values[1:]) if o != "psnr"):
            raise NonFiniteError(f"metrics are not finite: "
                                 f"{dict(zip(search.objectives, values))}")
        if store is not None:
            trial.set_user_attr("images_artifact", search.upload_grid(
                trial, store, images, Path(f"trial-{trial.number}.png")))
        _timing(trial, t_assemble, t_proxy, gen, met, t0)
        if memory is not None:
            trial.set_user_attr("peak_gpu_bytes", memory.trial_peak())
        trial.set_user_attr("metrics", metrics)
        study.tell(trial, values)
    except BaseException as e:
        reason = f"{type(e).__name__}: {str(e)[:500]}"
        if is_trial_failure(e):
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=FAIL)
            if is_out_of_memory(e) and memory is not None:
                search.cache.shrink()  # under a cap: the next trials get the room back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        # a bug, or Ctrl-C: the trial is not left RUNNING, and the error goes on
        trial.set_user_attr("fail_reason", ("interrupted: " if isinstance(e, KeyboardInterrupt)
                                            else "error: ") + reason)
        study.tell(trial, state=FAIL)
        raise


def _merge(a: dict, na: int, b: dict, nb: int) -> dict:
    out = {}
    for key in a:
        mean = (a[key]["mean"] * na + b[key]["mean"] * nb) / (na + nb)
        out[key] = {"mean": mean, "worst": min(a[key]["worst"], b[key]["worst"])}
    return out


def _timing(trial, t_assemble, t_proxy, gen, met, t0) -> None:
    total = time.perf_counter() - t0
    trial.set_user_attr("timing", {"assemble_s": t_assemble, "proxy_s": t_proxy,
                                   "generation_s": gen, "metrics_s": met, "total_s": total})

"""``autoquant search``: an Optuna study over per-layer plans under a memory budget.

How it works (each step measured in the closing report):
1. Byte formulas give every (group, config) its exact bytes; the budget and the full-precision
   cap are hard constraints checked before any image is made.
2. Sensitivity: the denoiser's real inputs (a few search prompts, early/middle/late steps) are
   replayed with one group at a time quantized to each candidate; the relative output error is an
   additive proxy of damage.
3. An exact solver (0/1 integer program, HiGHS) allocates configs to minimize the proxy at several
   budgets (100, 95, 90, 80% of the target); these plans and every uniform baseline that fits are
   enqueued as the first trials, so the front is never worse than the baselines.
4. Refinement where the proxy is wrong: the next trials take the best plan so far, force 1-3
   groups to another config, and let the solver re-balance the rest under the budget
   ("proxy-repaired mutation"). The study's sampler only records; the plans come from the solver.
5. Each trial assembles its model from the layer cache (nothing is quantized twice) and is scored
   in stages: the proxy error of the assembled model, then a quarter of the search images (stop
   when it is clearly below the best so far), then the full search set.
Objectives: bytes (min), PSNR (max), CLIP fidelity (max) -- a 3-objective Pareto front; "best"
is the highest PSNR within the budget, CLIP fidelity breaking ties.
Bytes are those of the searched components (all their parameters; the Linear layers quantized);
the whole pipeline's are printed too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from tqdm.auto import tqdm

from . import __version__
from ._bytes import measured_bytes
from ._errors import AutoquantError
from ._format import human_bytes, table
from .allocate import solve
from .backends.none import NoneConfig
from .evaluator import Evaluator, default_components, generate_images
from .inventory import components_of, inventory
from .recipe import Recipe
from .sensitivity import (Groups, LayerCache, anchored_sensitivity, capture_denoiser_inputs,
                          denoiser_outputs, measure_sensitivity, output_error)
from .settings import EvalSettings
from .space import SearchSpace, parse_budget

optuna.logging.set_verbosity(optuna.logging.WARNING)

SENSITIVITY_MODES = ("auto", "full", "anchored")


@dataclasses.dataclass
class SearchConfig:
    model: str
    budget: str
    space: SearchSpace
    trials: int = 30
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    out: Path = Path("autoquant-search")
    device: str | None = None
    resume: bool = False
    seed: int = 0
    settings: EvalSettings | None = None
    clip: Any = None
    progress: bool = True
    stage_fraction: float = 0.25
    stage_margin_db: float = 3.0
    #: bytes the layer cache may hold; None: half of the device's free memory at the start
    cache_bytes: float | None = None
    #: "full": one replay per (group, config); "anchored": one per group (see sensitivity.py);
    #: "auto": full unless one replay x the number of replays would exceed ``full_sensitivity_s``
    sensitivity: str = "auto"
    full_sensitivity_s: float = 600.0


class Search:
    def __init__(self, cfg: SearchConfig, pipe: Any):
        t0 = time.perf_counter()
        self.cfg, self.pipe = cfg, pipe
        self.device = torch.device(cfg.device) if cfg.device else next(
            components_of(pipe)[default_components(pipe)[0]].parameters()).device
        if cfg.sensitivity not in SENSITIVITY_MODES:
            raise AutoquantError(f"sensitivity {cfg.sensitivity!r}: choose one of "
                                 f"{', '.join(SENSITIVITY_MODES)}")
        if cfg.cache_bytes is not None and cfg.cache_bytes <= 0:
            raise AutoquantError(f"the layer cache needs a positive size, got {cfg.cache_bytes}")
        if cfg.device:
            pipe.to(self.device)
        self.inv = inventory(pipe)
        comps = cfg.space.components or default_components(pipe)
        self.groups = Groups.build(self.inv, cfg.space, comps)
        self.component = comps[0]
        # bytes: the searched components in full, Linear layers by formula
        all_comps = components_of(pipe)
        self.fp_bytes = sum(measured_bytes(all_comps[c]) for c in comps)
        linear_fp = sum(l.bytes for l in self.inv if l.component in comps)
        self.other_bytes = self.fp_bytes - linear_fp
        self.fixed_bytes = self.other_bytes + sum(l.bytes for l in self.groups.fixed)
        self.weight_params = sum(l.weight_params for l in self.inv if l.component in comps)
        self.fixed_fp = sum(l.weight_params for l in self.groups.fixed)
        self.opt_bytes = [[g.nbytes(c, self.device) for c in g.options] for g in self.groups.groups]
        self.opt_fp = [[g.weight_params if isinstance(c, NoneConfig) else 0 for c in g.options]
                       for g in self.groups.groups]
        self.budget_bytes = self._budget_bytes(cfg.budget)
        self.fp_allowed = cfg.space.fp_cap * self.weight_params - self.fixed_fp
        self._check_feasible()
        self.settings = cfg.settings or EvalSettings.for_model(cfg.model, "search", seeds=[0])
        self.evaluator = Evaluator(pipe, self.settings, clip=cfg.clip, components=comps,
                                   progress=cfg.progress)
        self.cache = LayerCache(pipe, self.inv, self.device,
                                max_bytes=cfg.cache_bytes if cfg.cache_bytes is not None
                                else default_cache_bytes(self.device))
        t1 = time.perf_counter()
        few = self.evaluator.pairs[:2]  # two prompts x 3 steps (x2 with guidance) suffice
        self.inputs = capture_denoiser_inputs(
            pipe, self.component,
            lambda: generate_images(pipe, dataclasses.replace(self.settings, batch_size=len(few)), few))
        self.ref_outputs = denoiser_outputs(pipe, self.component, self.inputs)
        self.sensitivity_mode, probe_s = self._sensitivity_mode()
        measure = anchored_sensitivity if self.sensitivity_mode == "anchored" else measure_sensitivity
        self.error = measure(pipe, self.cache, self.groups, self.component, self.inputs,
                             self.ref_outputs, cfg.progress)
        self.timing = {"setup_s": t1 - t0, "sensitivity_s": time.perf_counter() - t1,
                       "sensitivity_mode": self.sensitivity_mode, "replay_s": probe_s}

    def _sensitivity_mode(self) -> tuple[str, float | None]:
        """``auto``: time one replay; the full table if it costs at most ``full_sensitivity_s``."""
        if self.cfg.sensitivity != "auto":
            return self.cfg.sensitivity, None
        g = self.groups.groups[0]
        cfg = next(c for c in g.options if not isinstance(c, NoneConfig))
        self.cache.assemble({l.name: cfg for l in g.layers})
        output_error(self.pipe, self.component, self.inputs, self.ref_outputs)  # warm-up
        t = time.perf_counter()
        output_error(self.pipe, self.component, self.inputs, self.ref_outputs)
        probe_s = time.perf_counter() - t
        self.cache.restore()
        replays = sum(sum(not isinstance(c, NoneConfig) for c in g.options)
                      for g in self.groups.groups)
        full = probe_s * replays <= self.cfg.full_sensitivity_s
        if not full and self.cfg.progress:
            print(f"sensitivity: {replays} replays x {probe_s:.2f} s would take "
                  f"{probe_s * replays / 60:.0f} min; measuring {len(self.groups.groups)} anchors "
                  f"instead (--sensitivity full to insist)", flush=True)
        return ("full" if full else "anchored"), probe_s

    # -- budget --------------------------------------------------------------------------------
    def retarget(self, budget: str, out: Path, study: str | None = None) -> None:
        """Search again at another budget, reusing the sensitivity table, the layer cache and the
        references (what a sweep over budgets needs)."""
        self.cfg = dataclasses.replace(self.cfg, budget=budget, out=Path(out), study=study,
                                       resume=False)
        self.budget_bytes = self._budget_bytes(budget)
        self._check_feasible()

    def _budget_bytes(self, text: str) -> float:
        kind, value = parse_budget(text)
        if kind == "bytes":
            budget = value
        elif kind == "share":
            budget = value * self.fp_bytes
        else:
            budget = self.other_bytes + value * self.weight_params / 8
        mbpw = self.cfg.space.max_bits_per_weight
        if mbpw:
            budget = min(budget, self.other_bytes + mbpw * self.weight_params / 8)
        return budget

    def smallest_bytes(self) -> int:
        return self.fixed_bytes + sum(min(b) for b in self.opt_bytes)

    def _check_feasible(self) -> None:
        if self.fixed_fp > self.cfg.space.fp_cap * self.weight_params:
            raise AutoquantError(
                f"the space keeps {self.fixed_fp / self.weight_params:.1%} of the weights in full "
                f"precision (protected or unquantizable), above its fp_cap {self.cfg.space.fp_cap}")
        smallest = self.smallest_bytes()
        if smallest > self.budget_bytes:
            raise AutoquantError(
                f"budget {self.cfg.budget} ({human_bytes(self.budget_bytes)}) is below the "
                f"smallest plan this space allows: {human_bytes(smallest)} "
                f"({smallest / self.fp_bytes:.1%} of full precision, "
                f"{8 * (smallest - self.other_bytes) / self.weight_params:.2f} bpw)")

    # -- plans ---------------------------------------------------------------------------------
    def plan_bytes(self, choice: list[int]) -> int:
        return self.fixed_bytes + sum(self.opt_bytes[g][k] for g, k in enumerate(choice))

    def plan_fp(self, choice: list[int]) -> int:
        return self.fixed_fp + sum(self.opt_fp[g][k] for g, k in enumerate(choice))

    def constraints(self, choice: list[int]) -> list[float]:
        """Optuna convention: <= 0 is satisfied."""
        return [self.plan_bytes(choice) - self.budget_bytes,
                self.plan_fp(choice) - self.cfg.space.fp_cap * self.weight_params]

    def proxy(self, choice: list[int]) -> float:
        return sum(self.error[g][k] for g, k in enumerate(choice))

    def solve_at(self, byte_budget: float, fixed: dict[int, int] | None = None):
        return solve(self.error, self.opt_bytes, self.opt_fp, byte_budget - self.fixed_bytes,
                     self.fp_allowed, fixed)

    def seeds(self) -> list[tuple[str, list[int]]]:
        out = []
        for f in (1.0, 0.95, 0.9, 0.8):
            choice = self.solve_at(self.budget_bytes * f)
            if choice is not None:
                out.append((f"solver@{f:.0%}", choice))
        for cfg in self.cfg.space.candidates:  # uniform baselines that fit
            if isinstance(cfg, NoneConfig):
                continue
            choice = [g.options.index(cfg) if cfg in g.options else
                      min(range(len(g.options)), key=lambda k: self.opt_bytes[i][k])
                      for i, g in enumerate(self.groups.groups)]
            if max(self.constraints(choice)) <= 0:
                out.append((f"uniform {cfg.label}", choice))
        return out

    def mutate(self, rng: random.Random, base: list[int]) -> list[int] | None:
        for _ in range(20):
            k = rng.randint(1, min(3, len(base)))
            fixed = {}
            for g in rng.sample(range(len(base)), k):
                others = [i for i in range(len(self.groups.groups[g].options)) if i != base[g]]
                if others:
                    fixed[g] = rng.choice(others)
            choice = self.solve_at(self.budget_bytes * rng.choice((1.0, 1.0, 0.97, 0.93)), fixed)
            if choice is not None:
                return choice
        return None

    def recipe(self, choice: list[int], metrics: dict | None = None, trial: int | None = None,
               study: str | None = None) -> Recipe:
        """The plan as a recipe: one exact entry per searched layer."""
        plan = self.groups.plan(choice)
        import hqq, bitsandbytes, torchao, diffusers  # noqa: E401 - provenance
        prompts_hash = hashlib.sha256("\n".join(self.settings.prompts).encode()).hexdigest()[:12]
        return Recipe(
            layers=dict(sorted(plan.items())), components=list(self.groups.components),
            model={**(getattr(self.pipe, "_autoquant_source", None) or {"id": self.cfg.model}),
                   "fingerprint": self.inv.fingerprint()},
            budget={"spec": str(self.cfg.budget), "bytes": int(self.budget_bytes)},
            metrics=metrics,
            provenance={"autoquant": __version__, "hqq": hqq.__version__,
                        "bitsandbytes": bitsandbytes.__version__, "torchao": torchao.__version__,
                        "diffusers": diffusers.__version__, "torch": str(torch.__version__),
                        "study": study, "trial": trial, "space": self.cfg.space.name,
                        "prompts_sha256": prompts_hash, "seeds": list(self.settings.seeds)})


def default_cache_bytes(device: torch.device) -> float:
    """Half of what the device has free now: the rest is for generation and the references."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2


def _params(search: Search, choice: list[int]) -> dict[str, str]:
    return {g.name: g.options[k].label for g, k in zip(search.groups.groups, choice)}


def _choice(search: Search, params: dict[str, str]) -> list[int]:
    return [[c.label for c in g.options].index(params[g.name]) for g in search.groups.groups]


def run_search(search: Search) -> dict[str, Any]:
    cfg = search.cfg
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = cfg.study or f"autoquant-{cfg.model.replace('/', '-')}-{cfg.budget}"
    if not cfg.resume:
        try:
            optuna.load_study(study_name=name, storage=storage)
            raise AutoquantError(f"study {name!r} already exists in {storage}: pass --resume to "
                                 f"continue it, or --study NAME / another --out for a new one")
        except KeyError:
            pass
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=cfg.resume,
                                directions=["minimize", "maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=cfg.seed))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["bytes", "psnr", "clip_fidelity"])
    dists = {g.name: optuna.distributions.CategoricalDistribution([c.label for c in g.options])
             for g in search.groups.groups}
    # what the explorer needs to draw the study without the model: groups, budget, sizes
    study.set_user_attr("autoquant", {
        "model": cfg.model, "budget": str(cfg.budget), "budget_bytes": search.budget_bytes,
        "fp_bytes": search.fp_bytes, "space": cfg.space.name, "fp_cap": cfg.space.fp_cap,
        "components": search.groups.components,
        "groups": {g.name: [l.name for l in g.layers] for g in search.groups.groups},
        "fixed": [l.name for l in search.groups.fixed],
        "prompts": [p for p, _ in search.evaluator.pairs], "seeds": list(search.settings.seeds)})
    store = optuna.artifacts.FileSystemArtifactStore(str(_artifact_dir(out)))
    if not study.user_attrs.get("reference_artifact"):
        study.set_user_attr("reference_artifact", _upload_grid(
            study, store, search.evaluator.references, Path("references.png")))
    # an interrupted run leaves RUNNING trials: record them as failed, then redo their plans
    done: dict[tuple, int] = {}
    redo = []
    for t in study.get_trials(deepcopy=False):
        key = tuple(sorted(t.params.items()))
        if t.state == optuna.trial.TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted")
            redo.append(t.params)
        elif t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            done[key] = t.number
    queue: list[tuple[str, dict]] = [("resumed", p) for p in redo]
    if not study.trials or not done:
        queue += [(src, _params(search, c)) for src, c in search.seeds()]
    rng = random.Random(cfg.seed + len(study.trials))
    stop = {"flag": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    start = time.perf_counter()
    finished = sum(1 for t in study.trials if t.state.is_finished())
    bar = tqdm(total=cfg.trials, initial=min(finished, cfg.trials), desc="search", unit="trial",
               disable=not cfg.progress, mininterval=1)
    best = _best(study, search.budget_bytes)
    try:
        while finished < cfg.trials and not stop["flag"]:
            if cfg.timeout and time.perf_counter() - start > cfg.timeout:
                break
            if queue:
                source, params = queue.pop(0)
            else:
                base = _choice(search, best.params) if best else search.seeds()[0][1]
                choice = search.mutate(rng, base)
                if choice is None:
                    break
                source, params = "mutation", _params(search, choice)
            key = tuple(sorted(params.items()))
            if key in done:
                continue
            study.enqueue_trial(params, skip_if_exists=False)
            trial = study.ask(dists)
            trial.set_user_attr("source", source)
            _run_trial(search, study, trial, cfg, store, out)
            done[key] = trial.number
            finished += 1
            best = _best(study, search.budget_bytes)
            bar.update()
            if best:
                bar.set_postfix(best_psnr=f"{best.values[1]:.2f}", bytes=human_bytes(best.values[0]))
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
        search.cache.restore()
    return write_outputs(search, study, out, interrupted=stop["flag"])


def _artifact_dir(out: Path) -> Path:
    path = out / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


GRID_IMAGES = 8


def _upload_grid(study_or_trial, store, images: torch.Tensor, path: Path) -> str:
    """A PNG grid of the first images, stored as an Optuna artifact (optuna-dashboard shows it)."""
    import torchvision

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / path.name
        torchvision.utils.save_image(images[:GRID_IMAGES].float(), file, nrow=GRID_IMAGES,
                                     padding=1)
        return optuna.artifacts.upload_artifact(study_or_trial=study_or_trial,
                                                file_path=str(file), artifact_store=store,
                                                mimetype="image/png")


def _run_trial(search: Search, study, trial, cfg: SearchConfig, store=None,
               out: Path | None = None) -> None:
    choice = _choice(search, trial.params)
    cons = search.constraints(choice)
    trial.set_user_attr("constraints", cons)
    # Optuna's own constraint record (what constraints-aware samplers and dashboards read)
    trial.set_constraint("bytes_over_budget", cons[0])
    trial.set_constraint("fp_weights_over_cap", cons[1])
    trial.set_user_attr("predicted_bytes", search.plan_bytes(choice))
    trial.set_user_attr("proxy_error_additive", search.proxy(choice))
    if max(cons) > 0:  # infeasible: costs no generation
        trial.set_user_attr("pruned_at", "constraints")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    t0 = time.perf_counter()
    try:
        search.cache.assemble(search.groups.plan(choice))
        t_assemble = time.perf_counter() - t0
        t1 = time.perf_counter()
        proxy = output_error(search.pipe, search.component, search.inputs, search.ref_outputs)
        trial.set_user_attr("proxy_error", proxy)
        t_proxy = time.perf_counter() - t1
        ev = search.evaluator
        n = len(ev.pairs)
        k = max(1, int(n * cfg.stage_fraction))
        best = _best(study, search.budget_bytes)
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
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return
            rest, g_s, m_s = ev.score(list(range(k, n)))
            gen, met = gen + g_s, met + m_s
            metrics = _merge(m, k, rest, n - k)
            images = torch.cat([first, ev.last_images])
        else:
            metrics, gen, met = ev.score()
            images = ev.last_images
        if store is not None:
            trial.set_user_attr("images_artifact", _upload_grid(
                trial, store, images, Path(f"trial-{trial.number}.png")))
        _timing(trial, t_assemble, t_proxy, gen, met, t0)
        trial.set_user_attr("metrics", metrics)
        study.tell(trial, [search.plan_bytes(choice), metrics["psnr"]["mean"],
                           metrics.get("clip_fidelity", {"mean": 0.0})["mean"]])
    except Exception as e:  # OOM, NaN images, a backend failing: recorded, the study goes on
        trial.set_user_attr("fail_reason", f"{type(e).__name__}: {str(e)[:500]}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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


def _best(study, budget: float):
    ok = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
          if t.values and t.values[0] <= budget]
    return max(ok, key=lambda t: (t.values[1], t.values[2]), default=None)


def write_outputs(search: Search, study, out: Path, interrupted: bool = False) -> dict:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    pareto = study.best_trials if complete else []
    (out / "pareto").mkdir(exist_ok=True)
    for old in (out / "pareto").glob("*.yaml"):
        old.unlink()
    rows, front = [], []
    for t in sorted(pareto, key=lambda t: t.values[0]):
        metrics = {"bytes": int(t.values[0]), "psnr": t.values[1], "clip_fidelity": t.values[2],
                   "within_budget": t.values[0] <= search.budget_bytes}
        path = out / "pareto" / f"trial-{t.number:04d}.yaml"
        search.recipe(_choice(search, t.params), metrics, t.number, study.study_name).save(path)
        front.append({"trial": t.number, "recipe": str(path), **metrics,
                      "source": t.user_attrs.get("source")})
        rows.append([str(t.number), t.user_attrs.get("source", ""), human_bytes(t.values[0]),
                     f"{t.values[0] / search.fp_bytes:.1%}", f"{t.values[1]:.2f}",
                     f"{t.values[2]:.4f}", "yes" if t.values[0] <= search.budget_bytes else "no"])
    best = _best(study, search.budget_bytes)
    report: dict[str, Any] = {
        "study": study.study_name, "storage": study._storage.__class__.__name__,
        "model": search.cfg.model, "space": search.cfg.space.name, "budget": search.cfg.budget,
        "budget_bytes": search.budget_bytes, "fp_bytes": search.fp_bytes,
        "groups": len(search.groups.groups), "fixed_layers": len(search.groups.fixed),
        "trials": {s.name.lower(): sum(1 for t in study.trials if t.state == s)
                   for s in optuna.trial.TrialState},
        "interrupted": interrupted, "pareto": front, "timing": search.timing,
        "quantize_s": search.cache.quantize_s,
        "cache": {"max_bytes": search.cache.max_bytes, "builds": search.cache.builds,
                  "evictions": search.cache.evictions},
        "failed": [{"trial": t.number, "reason": t.user_attrs.get("fail_reason")}
                   for t in study.trials if t.state == optuna.trial.TrialState.FAIL],
        "trial_timing": [dict(trial=t.number, state=t.state.name, **t.user_attrs.get("timing", {}))
                         for t in study.trials if "timing" in t.user_attrs],
    }
    if best is not None:
        choice = _choice(search, best.params)
        metrics = {"bytes": int(best.values[0]), "psnr": best.values[1],
                   "clip_fidelity": best.values[2],
                   "pipeline_bytes": int(best.values[0] + _other_components_bytes(search))}
        search.recipe(choice, metrics, best.number, study.study_name).save(out / "best.yaml")
        report["best"] = {"trial": best.number, "recipe": str(out / "best.yaml"), **metrics}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    report["table"] = table(rows, ["trial", "source", "bytes", "of fp", "PSNR", "CLIP fid",
                                   "in budget"])
    return report


def _other_components_bytes(search: Search) -> int:
    comps = components_of(search.pipe)
    return sum(measured_bytes(m) for c, m in comps.items() if c not in search.groups.components)

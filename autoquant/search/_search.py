"""A search: one model, one space, one budget. :class:`Search` is built cheaply (inventory,
groups, budget -- everything that can refuse bad input before any image is made);
:meth:`Search.prepare` does the expensive, once-per-study work (references, captured denoiser
inputs, the sensitivity table), taking from the study what another worker or an earlier run
already stored."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._bytes import measured_bytes
from .._errors import InputError
from .._state import source_of
from ..evaluator import Evaluator, default_components, generate_images
from .._inventory import components_of, inventory
from ..references import model_key
from ..settings import EvalSettings
from ..space import SearchSpace
from ._budget import Budget, Planner
from ._cache import LayerCache
from ._groups import Groups
from ._outputs import best_trial
from ._replay import Replay
from ._sensitivity import MODES, choose_mode, measure
from ._setup import SENSITIVITY
from ._study import IDENTITY


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
    #: "full": one replay per (group, config); "anchored": one per group (see _sensitivity.py);
    #: "auto": full unless one replay x the number of replays would exceed ``full_sensitivity_s``
    sensitivity: str = "auto"
    full_sensitivity_s: float = 30.0
    #: the artifact folder the study's workers share (default OUT/artifacts)
    artifacts: Path | None = None
    #: a step-time limit (``1.0x`` full precision's step, ``150ms``); with it or a ``latency``
    #: objective in the space, step time is searched too, measured in ``latency_mode``
    latency: str | None = None
    latency_mode: str = "eager"
    #: bound the search's peak GPU memory (``24GiB``; see :mod:`autoquant.memory`); None: what
    #: the device has (not enforced)
    gpu_memory: str | int | None = None

    def __post_init__(self):
        if self.sensitivity not in MODES:
            raise InputError(f"sensitivity {self.sensitivity!r}: choose one of "
                             f"{', '.join(MODES)}")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise InputError(f"the layer cache needs a positive size, got {self.cache_bytes}")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise InputError(f"trials must be a whole number >= 1, got {self.trials!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise InputError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        from ..latency import MODES as LATENCY_MODES
        from ..latency import parse_latency

        if self.latency is not None:
            parse_latency(self.latency)
        if self.latency_mode not in LATENCY_MODES:
            raise InputError(f"latency mode {self.latency_mode!r}: choose one of "
                             f"{', '.join(LATENCY_MODES)}")
        if self.gpu_memory is not None:
            from ..memory import parse_memory

            self.gpu_memory = parse_memory(self.gpu_memory)
        self.out = Path(self.out)


def default_cache_bytes(device: torch.device) -> float:
    """Half of what the device has free now: the rest is for generation and the references."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2


class Search:
    def __init__(self, cfg: SearchConfig, pipe: Any):
        self.cfg, self.pipe = cfg, pipe
        self.device = torch.device(cfg.device) if cfg.device else next(
            components_of(pipe)[default_components(pipe)[0]].parameters()).device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cfg.gpu_memory is not None and self.device.type != "cuda":
            raise InputError(f"--gpu-memory bounds a CUDA device's memory; this search runs on "
                             f"{self.device} (give --device cuda)")
        if cfg.device and self.device.type != "cuda":
            pipe.to(self.device)  # on a GPU the memory plan places the components
        self.inv = inventory(pipe)
        self.space = cfg.space.for_device(self.device)  # + the configs this device can run
        comps = cfg.space.components or default_components(pipe)
        self.groups = Groups.build(self.inv, self.space, comps)
        self.component = comps[0]
        all_comps = components_of(pipe)
        self.budget = Budget.build(self.groups, sum(measured_bytes(all_comps[c]) for c in comps),
                                   self.space, self.inv)
        self.budget.set_target(cfg.budget)
        self.settings = cfg.settings or EvalSettings.for_model(cfg.model, "search", seeds=[0])
        # without a CLIP there is no CLIP fidelity to search on (said in report.json)
        self.objectives = [o for o in cfg.space.objectives
                           if o != "clip_fidelity" or cfg.clip is not None]
        if cfg.latency is not None and "latency" not in self.objectives:
            self.objectives.append("latency")
        self._check_devices()
        self.memory = self._place(comps)
        self.cache = LayerCache(pipe, self.inv, self.device,
                                max_bytes=cfg.cache_bytes if cfg.cache_bytes is not None
                                else default_cache_bytes(self.device),
                                streamed=self.memory.streamed_layers() if self.memory else ())
        self.model_key = model_key(pipe)
        self.evaluator: Evaluator | None = None
        self.replay: Replay | None = None
        self.error: list[list[float]] | None = None
        self.planner: Planner | None = None
        self.sensitivity_mode: str | None = None
        self.timing: dict[str, Any] = {}

    def _place(self, comps: list[str]):
        """On a GPU: where each component lives under the memory cap (the whole device when
        none is given). Elsewhere: the prompt embeddings are still kept once per batch."""
        from .._embeddings import PromptEmbeddings
        from ..memory import MemoryPlan, spare_encoders

        if self.device.type != "cuda":
            PromptEmbeddings.install(self.pipe, spare_encoders(self.pipe, comps))
            return None
        memory = MemoryPlan(self.pipe, self.device, self.cfg.gpu_memory, comps,
                            self.budget.budget_bytes, enforce=self.cfg.gpu_memory is not None,
                            inv=self.inv)
        if self.searches_latency and "streamed" in memory.placement.values():
            raise InputError("--latency times layers resident on the GPU; under this "
                             "--gpu-memory the denoiser streams. Measure latency on a GPU that "
                             "holds it, or search without --latency")
        return memory.place()

    @property
    def searches_latency(self) -> bool:
        return "latency" in self.objectives

    def _check_devices(self) -> None:
        """Every candidate must run on the search's device: refused clearly otherwise."""
        from .._errors import SpaceError
        from ..backends import get_backend

        problems = [f"{c.label}: {r}" for c in self.space.candidates
                    if (r := get_backend(c.method).unavailable_reason(c, self.device))]
        if problems:
            raise SpaceError([f"cannot run on {self.device}: {p}" for p in problems] +
                             ["pick a space whose configs run here (e.g. default)"],
                             self.cfg.space.name)

    def measure_latency(self) -> dict:
        """The step-time model for this search's options, measured here: ``{fp_step_s,
        opt_lat, mode, device}`` (what a study shares with its workers)."""
        from ..latency import build_model

        if self.replay is None:
            self._inputs()
        self.cache.restore()
        layers = {l.name: self.cache.originals[l.name] for g in self.groups.groups
                  for l in g.layers}
        options = {l.name: g.options for g in self.groups.groups for l in g.layers}
        def assemble(plan):
            self.cache.assemble(plan) if plan is not None else self.cache.restore()

        model, seconds = build_model(self.replay.module, self.replay.step_call(), layers,
                                     options, self.device, self.cfg.latency_mode,
                                     self.cfg.progress, assemble)
        opt_lat = [[sum(model.delta(l.name, c) for l in g.layers) for c in g.options]
                   for g in self.groups.groups]
        self.timing["latency_table_s"] = seconds
        return {"fp_step_s": model.fp_step_s, "opt_lat": opt_lat,
                "mode": self.cfg.latency_mode, "device": str(self.device),
                "entries_measured": model.table.measured, "calibration": model.scale,
                "uniform_step_s": model.uniform_step_s}

    def use_latency(self, info: dict) -> None:
        """Predict step times from ``info`` (see :meth:`measure_latency`) from now on."""
        from ..latency import parse_latency

        b = self.budget
        b.fp_step_s, b.opt_lat = info["fp_step_s"], info["opt_lat"]
        self.latency_info = info
        if self.cfg.latency is None:
            return
        kind, value = parse_latency(self.cfg.latency)
        b.latency_limit_s = value * b.fp_step_s if kind == "relative" else value
        fastest = Planner(b, self.groups, [[0.0] * len(g.options) for g in self.groups.groups]
                          ).fastest_at(b.budget_bytes)
        best = b.plan_latency(fastest) if fastest is not None else None
        if best is None or best > b.latency_limit_s:
            raise InputError(
                f"--latency {self.cfg.latency} ({b.latency_limit_s * 1e3:.2f} ms per step) cannot "
                f"be met within the budget: the fastest plan this space allows takes "
                f"{best * 1e3:.2f} ms ({best / b.fp_step_s:.2f}x full precision's "
                f"{b.fp_step_s * 1e3:.2f} ms, {self.cfg.latency_mode}) on {self.device}; allow "
                f"at least that, or a space with faster configs")

    # -- what a study records about it ---------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What every worker of one study must share, and what outputs need without the model."""
        import diffusers

        source = source_of(self.pipe)
        settings = self.settings.to_dict()
        # the batch size stays: it changes pixels, and every worker scores against the same
        # references, made in the same batches
        others = components_of(self.pipe)
        versions = {"autoquant": __version__, "torch": str(torch.__version__),
                    "diffusers": diffusers.__version__}
        from ..backends import package_versions

        versions.update(package_versions())
        return {
            "model": self.cfg.model, "source": source.to_dict() if source else {"id": self.cfg.model},
            "fingerprint": self.inv.fingerprint(), "weights": self.model_key,
            "dtype": str(self.inv.layers[0].dtype).replace("torch.", "") if self.inv.layers else None,
            "budget": str(self.cfg.budget), "budget_bytes": self.budget.budget_bytes,
            "fp_bytes": self.budget.fp_bytes, "space": self.cfg.space.to_dict(),
            "space_name": self.cfg.space.name, "objectives": list(self.objectives),
            "settings": settings, "clip": getattr(self.cfg.clip, "name", None),
            "latency": self.cfg.latency, "latency_mode": self.cfg.latency_mode,
            "sensitivity": self.cfg.sensitivity, "fp_cap": self.cfg.space.fp_cap,
            "components": list(self.groups.components),
            "groups": {g.name: [l.name for l in g.layers] for g in self.groups.groups},
            "fixed": [l.name for l in self.groups.fixed],
            "candidates": [c.label for c in self.space.candidates],
            "configs": {c.label: c.to_dict() for c in self.space.candidates}
            | {"none": {"method": "none"}},
            "bits": {c.label: c.nominal_bits for c in self.space.candidates} | {"none": 16.0},
            "prompts": [p for p, _ in self.settings.pairs()],
            "other_components_bytes": sum(measured_bytes(m) for c, m in others.items()
                                          if c not in self.groups.components),
            "versions": versions,
        }

    # -- the expensive part, once per study ----------------------------------------------------
    def prepare(self, study=None) -> None:
        """References, the captured denoiser inputs and the sensitivity table. With ``study``,
        a table the study already holds is used, and one measured here is stored in it."""
        import time

        self._inputs()
        stored = study.user_attrs.get(SENSITIVITY) if study is not None else None
        if stored is not None and len(stored["table"]) != len(self.groups.groups):
            stored = None  # cannot happen for one identity; never trust a malformed table
        if self.searches_latency and self.budget.opt_lat is None:
            self.use_latency(self.measure_latency())
        if self.error is None:
            t1 = time.perf_counter()
            if stored is not None:
                self.use_sensitivity(stored["table"], stored["mode"])
                self.timing.update(sensitivity_reused=True, replay_s=stored.get("replay_s"))
            else:
                self.use_sensitivity(*self.measure_sensitivity(self.cfg.sensitivity))
                self.timing["sensitivity_reused"] = False
            self.timing["sensitivity_s"] = time.perf_counter() - t1
        if study is not None and stored is None:
            study.set_user_attr(SENSITIVITY, {"mode": self.sensitivity_mode,
                                              "replay_s": self.timing.get("replay_s"),
                                              "table": self.error})

    def _inputs(self) -> None:
        """The evaluator (its references) and the captured denoiser inputs, once."""
        import time

        if self.replay is None:
            t0 = time.perf_counter()

            def capture():
                self.replay = Replay.capture(self.pipe, self.component, self._generate_two)

            self._first_generation("capture", capture)
            self.timing["capture_s"] = time.perf_counter() - t0
        if self.evaluator is None:
            t0 = time.perf_counter()
            self.evaluator = Evaluator(self.pipe, self.settings, clip=self.cfg.clip,
                                       components=self.groups.components,
                                       progress=self.cfg.progress, key=self.model_key,
                                       segments=self.stage_cut())
            self.timing["references_s"] = time.perf_counter() - t0
        self.calibrate()

    def calibrate(self) -> None:
        """Calibration data for the layers a calibrated method (gptq) may quantize: the search's
        prompt set through the full-precision pipeline, once per process."""
        from ..backends import backend_for
        from ..calibration import calibrate, calibrated_with, settings_for, settings_key

        layers = {l.name: self.cache.originals[l.name] for g in self.groups.groups
                  if any(backend_for(c).calibrated for c in g.options) for l in g.layers}
        settings = settings_for(self.settings)
        if not layers or all(calibrated_with(m) == settings_key(settings)
                             for m in layers.values()):
            return  # (what its recipes record: recalibrated if calibrated on anything else)
        self.cache.clear()  # stale layers out, the originals in place: the hooks watch them
        info = calibrate(self.pipe, settings, layers, progress=self.cfg.progress)
        self.timing["calibration_s"] = info["seconds"]

    def stage_cut(self) -> tuple[int, ...]:
        """Where a trial's first stage ends (it scores ``range(k)``, then the rest if it is
        not pruned): references are made in the same batches."""
        n = len(self.settings.pairs())
        k = max(1, int(n * self.cfg.stage_fraction))
        return (k,) if k < n else ()

    def _generate_two(self):
        """Full-precision images of the first two search prompts (two prompts x 3 steps, x2
        with guidance, are all the captured inputs need)."""
        few = self.settings.pairs()[:2]
        return generate_images(self.pipe, dataclasses.replace(self.settings,
                                                              batch_size=len(few)), few)

    def _first_generation(self, what: str, work) -> None:
        """``work()`` -- the study's first full-precision generation. Under a memory plan it
        measures the activations (scaled from its two prompts to the search's batch), which size
        the layer cache; if it runs out of memory under the cap, the search is refused with what
        it needs."""
        if self.memory is None:
            work()
            return
        pairs = self.settings.pairs()
        scale = max(1.0, min(self.settings.batch_size, len(pairs)) / len(pairs[:2]))
        self.memory.first_generation(what, work, scale)
        self._size_cache()

    def measure_activations(self) -> None:
        """Under a memory plan whose cache is not sized yet (a worker that loaded the shared
        inputs instead of capturing them): one full-precision generation measures them."""
        if self.memory is not None and self.memory.cache_bytes is None:
            self._first_generation("generation", self._generate_two)

    def _size_cache(self) -> None:
        """Under a memory plan: the layer cache gets what the cap leaves (said once)."""
        if self.memory is None or self.memory.cache_bytes is not None:
            return
        self.cache.max_bytes = self.memory.size_cache(self.cfg.cache_bytes)
        if self.cfg.progress:
            from .._progress import tqdm

            tqdm.write(self.memory.describe())

    def measure_sensitivity(self, mode: str = "auto") -> tuple[list[list[float]], str]:
        """``(table, mode)``: the sensitivity table measured here (``auto`` picks the mode)."""
        self._inputs()
        mode, probe_s = choose_mode(mode, self.replay, self.cache, self.groups,
                                    self.cfg.full_sensitivity_s, self.cfg.progress)
        self.timing["replay_s"] = probe_s
        rows = measure(mode, self.replay, self.cache, self.groups, progress=self.cfg.progress)
        return [rows[i] for i in range(len(self.groups.groups))], mode

    def use_sensitivity(self, table: list[list[float]], mode: str) -> None:
        """Plan from ``table`` from now on (one row per group, one value per option)."""
        if len(table) != len(self.groups.groups) or any(
                len(row) != len(g.options) for row, g in zip(table, self.groups.groups)):
            raise InputError("a sensitivity table needs one row per group and one value per "
                             "option")
        self.error, self.sensitivity_mode = table, mode
        self.timing["sensitivity_mode"] = mode
        self.planner = Planner(self.budget, self.groups, table)

    def _planned(self) -> Planner:
        if self.planner is None:
            self.prepare()
        return self.planner

    # -- budget and plans ----------------------------------------------------------------------
    @property
    def budget_bytes(self) -> float:
        return self.budget.budget_bytes

    @property
    def fp_bytes(self) -> int:
        return self.budget.fp_bytes

    @property
    def other_bytes(self) -> int:
        return self.budget.other_bytes

    def plan_bytes(self, choice: list[int]) -> int:
        return self.budget.plan_bytes(choice)

    def constraints(self, choice: list[int]) -> list[float]:
        return self.budget.constraints(choice)

    def smallest_bytes(self) -> int:
        return self.budget.smallest_bytes()

    def proxy(self, choice: list[int]) -> float:
        return self._planned().proxy(choice)

    def solve_at(self, byte_budget: float, fixed: dict[int, int] | None = None):
        return self._planned().solve_at(byte_budget, fixed)

    def seeds(self) -> list[tuple[str, list[int]]]:
        return self._planned().seeds()

    def mutate(self, rng, base: list[int]) -> list[int] | None:
        return self._planned().mutate(rng, base)

    def plan_latency(self, choice: list[int]) -> float | None:
        return self.budget.plan_latency(choice)

    def best(self, study):
        """The study-wide best trial within the budget (from every worker), or None."""
        return best_trial(study, {"objectives": self.objectives,
                                  "budget_bytes": self.budget.budget_bytes,
                                  "latency_limit_s": self.budget.latency_limit_s})

    def recipe(self, choice: list[int], metrics: dict | None = None, trial: int | None = None,
               study: str | None = None):
        """The plan as a recipe (the builder outputs and the explorer use)."""
        from ._outputs import plan_recipe

        return plan_recipe(self.identity(), self.groups.labels(choice), metrics, trial, study)

    def retarget(self, budget: str, out: Path, study: str | None = None) -> None:
        """Search again at another budget, reusing the sensitivity table, the layer cache and the
        references (what a sweep over budgets needs)."""
        self.cfg = dataclasses.replace(self.cfg, budget=budget, out=Path(out), study=study,
                                       resume=False)
        self.budget.set_target(budget)

    # -- images a study keeps --------------------------------------------------------------------
    @staticmethod
    def upload_grid(study_or_trial, store, images: torch.Tensor, path: Path) -> str:
        """A PNG grid of the first images, stored as an Optuna artifact (optuna-dashboard shows
        it)."""
        import optuna
        import torchvision

        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / path.name
            torchvision.utils.save_image(images[:GRID_IMAGES].float(), file, nrow=GRID_IMAGES,
                                         padding=1)
            return optuna.artifacts.upload_artifact(study_or_trial=study_or_trial,
                                                    file_path=str(file), artifact_store=store,
                                                    mimetype="image/png")


GRID_IMAGES = 8
__all__ = ["Search", "SearchConfig", "IDENTITY"]

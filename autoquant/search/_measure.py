"""The once-per-study measurements of a :class:`~autoquant.search.Search`: captured denoiser
inputs, references, calibration, the sensitivity table and the step-time model -- each taken
from the study when another worker or an earlier run already stored it. A mixin: it works on
the search's own state (its cache, groups, budget, settings)."""

from __future__ import annotations

import dataclasses

from .._errors import InputError
from ..scoring.evaluator import Evaluator, generate_images
from ._budget import Planner
from ._replay import Replay
from ._sensitivity import choose_mode, measure
from ._setup import SENSITIVITY


class Measurements:
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
        from ..runtime.latency import build_model

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
        from ..runtime.latency import parse_latency

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
        from ..generation.calibration import calibrate, calibrated_with, settings_for, settings_key

        layers = {l.name: self.cache.originals[l.name] for g in self.groups.groups
                  if any(backend_for(c).needs_calibration(c) for c in g.options)
                  for l in g.layers}
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
        rows = measure(mode, self.replay, self.cache, self.groups, progress=self.cfg.progress,
                       evaluator=self.evaluator)
        return [rows[i] for i in range(len(self.groups.groups))], mode

    def use_sensitivity(self, table: list[list], mode: str) -> None:
        """Plan from ``table`` from now on (one row per group, one value per option; in
        ``images`` mode one list of per-image errors per option)."""
        if len(table) != len(self.groups.groups) or any(
                len(row) != len(g.options) for row, g in zip(table, self.groups.groups)):
            raise InputError("a sensitivity table needs one row per group and one value per "
                             "option")
        if mode == "images":
            n = len(self.settings.pairs())
            if not all(isinstance(v, list) and len(v) == n and
                       all(isinstance(x, (int, float)) for x in v) for row in table for v in row):
                raise InputError(f"an images sensitivity table needs, per group and option, a "
                                 f"list of {n} per-image errors (one per search image)")
        self.error, self.sensitivity_mode = table, mode
        self.timing["sensitivity_mode"] = mode
        self.planner = Planner(self.budget, self.groups, table, per_image=mode == "images")

    def _planned(self) -> Planner:
        if self.planner is None:
            self.prepare()
        return self.planner

"""A search: one model, one space, one budget. :class:`Search` is built cheaply (inventory,
groups, budget -- everything that can refuse bad input before any image is made);
:meth:`Search.prepare` does the expensive, once-per-study work (references, captured denoiser
inputs, the sensitivity table), taking from the study what another worker or an earlier run
already stored."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import __version__
from .._errors import InputError
from ..backends.measure import measured_bytes
from ..generation.settings import EvalSettings
from ..models.inventory import components_of, inventory
from ..models.source import source_of
from ..scoring.evaluator import default_components
from ..scoring.references import model_key
from ._budget import Budget
from ._cache import LayerCache
from ._config import SearchConfig, default_cache_bytes
from ._groups import Groups
from ._measure import Measurements
from ._outputs import best_trial
from ._study import IDENTITY

if TYPE_CHECKING:
    from ..scoring.evaluator import Evaluator
    from ._budget import Planner
    from ._replay import Replay


class Search(Measurements):
    """A search (module docstring); the once-per-study measurements are
    :class:`~autoquant.search._measure.Measurements`."""


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
        from ..generation.embeddings import PromptEmbeddings
        from ..runtime.memory import MemoryPlan, spare_encoders

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
        from ..backends import full_precision, package_versions

        versions.update(package_versions())
        fp = full_precision()
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
            "configs": {c.label: c.to_dict() for c in [*self.space.candidates, fp]},
            "bits": {c.label: c.nominal_bits for c in self.space.candidates} | {fp.label: 16.0},
            "prompts": [p for p, _ in self.settings.pairs()],
            "other_components_bytes": sum(measured_bytes(m) for c, m in others.items()
                                          if c not in self.groups.components),
            "versions": versions,
        }

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

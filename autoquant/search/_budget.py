"""Budget arithmetic and allocation: the exact bytes of every plan, the hard constraints, and the
plans the solver proposes (seeds at several budgets, proxy-repaired mutations).

Bytes are those of the searched components: all their parameters and buffers, with the Linear
layers at their configs' exact byte formulas.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from .._errors import InputError
from .._format import human_bytes
from ._groups import Groups
from .allocate import solve
from .space import SearchSpace, parse_budget


@dataclasses.dataclass
class Budget:
    fp_bytes: int  # the searched components in full precision
    other_bytes: int  # what is not a Linear layer
    fixed_bytes: int  # other_bytes + the layers fixed in full precision
    weight_params: int  # Linear weights of the searched components
    fixed_fp: int  # of those, kept in full precision whatever the plan
    opt_bytes: list[list[int]]  # [group][option]
    opt_fp: list[list[int]]  # full-precision weights of [group][option]
    space: SearchSpace
    spec: str = ""
    budget_bytes: float = 0.0
    #: step-time model: full-precision step, seconds each option adds, and the limit (or None)
    fp_step_s: float | None = None
    opt_lat: list[list[float]] | None = None
    latency_limit_s: float | None = None

    @classmethod
    def build(cls, groups: Groups, component_bytes: int, space: SearchSpace,
              inventory) -> "Budget":
        layers = [l for l in inventory if l.component in groups.components]
        linear_fp = sum(l.bytes for l in layers)
        other = component_bytes - linear_fp
        return cls(
            fp_bytes=component_bytes, other_bytes=other,
            fixed_bytes=other + sum(l.bytes for l in groups.fixed),
            weight_params=sum(l.weight_params for l in layers),
            fixed_fp=sum(l.weight_params for l in groups.fixed),
            opt_bytes=[[g.nbytes(c) for c in g.options] for g in groups.groups],
            opt_fp=[[g.weight_params if c.full_precision else 0 for c in g.options]
                    for g in groups.groups],
            space=space)

    # -- the target ---------------------------------------------------------------------------
    def bytes_for(self, spec: str) -> float:
        """Bytes of a budget given as bytes (6GB), a share (35%) or bits per weight (4.25bpw)."""
        kind, value = parse_budget(spec)
        if kind == "bytes":
            budget = value
        elif kind == "share":
            budget = value * self.fp_bytes
        else:
            budget = self.other_bytes + value * self.weight_params / 8
        if budget > self.fp_bytes:
            raise InputError(f"budget {spec} ({human_bytes(budget)}) is more than the searched "
                             f"components hold in full precision ({human_bytes(self.fp_bytes)}): "
                             f"there is nothing to search; give at most 100%")
        mbpw = self.space.max_bits_per_weight
        if mbpw:
            budget = min(budget, self.other_bytes + mbpw * self.weight_params / 8)
        return budget

    def set_target(self, spec: str) -> None:
        """Aim at ``spec``; refuses a budget no plan of the space can meet."""
        self.spec, self.budget_bytes = str(spec), self.bytes_for(spec)
        self.check_feasible()

    @property
    def fp_allowed(self) -> float:
        return self.space.fp_cap * self.weight_params - self.fixed_fp

    def smallest_bytes(self) -> int:
        return self.fixed_bytes + sum(min(b) for b in self.opt_bytes)

    def check_feasible(self) -> None:
        if self.fixed_fp > self.space.fp_cap * self.weight_params:
            raise InputError(
                f"the space keeps {self.fixed_fp / self.weight_params:.1%} of the weights in full "
                f"precision (protected or unquantizable), above its fp_cap {self.space.fp_cap}")
        smallest = self.smallest_bytes()
        if smallest > self.budget_bytes:
            raise InputError(
                f"budget {self.spec} ({human_bytes(self.budget_bytes)}) is below the "
                f"smallest plan this space allows: {human_bytes(smallest)} "
                f"({smallest / self.fp_bytes:.1%} of full precision, "
                f"{8 * (smallest - self.other_bytes) / self.weight_params:.2f} bpw)")

    # -- plans ----------------------------------------------------------------------------------
    def plan_bytes(self, choice: list[int]) -> int:
        return self.fixed_bytes + sum(self.opt_bytes[g][k] for g, k in enumerate(choice))

    def plan_fp(self, choice: list[int]) -> int:
        return self.fixed_fp + sum(self.opt_fp[g][k] for g, k in enumerate(choice))

    def plan_latency(self, choice: list[int]) -> float | None:
        """Predicted seconds of one denoiser step (None without a latency model)."""
        if self.opt_lat is None:
            return None
        return self.fp_step_s + sum(self.opt_lat[g][k] for g, k in enumerate(choice))

    def constraints(self, choice: list[int]) -> list[float]:
        """Optuna convention: <= 0 is satisfied. (bytes over the budget, weights over the cap,
        and with a latency limit, predicted seconds over it)"""
        out = [self.plan_bytes(choice) - self.budget_bytes,
               self.plan_fp(choice) - self.space.fp_cap * self.weight_params]
        if self.latency_limit_s is not None:
            out.append(self.plan_latency(choice) - self.latency_limit_s)
        return out


class ImageTable:
    """An ``images``-mode table: ``rows[g][k]`` holds each search image's squared error with only
    group g at option k. What it predicts for a plan is each image's error -- the floor (the
    smallest error any quantized option gives that image: a bf16 pipeline's images move that
    much under any change at all, and that part does not add up over groups) plus every group's
    damage above it -- and the score it stands for is the mean PSNR over the images."""

    def __init__(self, rows: list[list[list[float]]], groups: Groups):
        fp = [np.array([c.full_precision for c in g.options]) for g in groups.groups]
        arrays = [np.asarray(r, dtype=float) for r in rows]
        quantized = np.concatenate([a[~f] for a, f in zip(arrays, fp)])  # [entries, images]
        finite = np.isfinite(quantized)
        ruinous = 1e3 * quantized[finite].max(initial=1e-12)  # a non-finite image's error
        floor = np.where(finite, quantized, np.inf).min(axis=0)
        self.floor = np.maximum(np.where(np.isfinite(floor), floor, ruinous), 1e-12)
        self.delta = []
        for a, f in zip(arrays, fp):
            d = np.clip(np.where(np.isfinite(a), a, ruinous) - self.floor, 0.0, None)
            d[f] = 0.0
            self.delta.append(d)

    def predicted(self, choice: list[int]) -> np.ndarray:
        return self.floor + sum(self.delta[g][k] for g, k in enumerate(choice))

    def db_lost(self, choice: list[int]) -> float:
        """Predicted mean PSNR below the floor's, in dB (0: no damage above the floor)."""
        return float(10 * np.mean(np.log10(self.predicted(choice) / self.floor)))

    def linear(self, weights: np.ndarray) -> list[list[float]]:
        """``cost[g][k]``: the weighted mean damage; with weights 1/(a plan's predicted errors)
        it is the first-order change of the mean log error around that plan."""
        return [[float(np.mean(d[k] * weights)) for k in range(len(d))] for d in self.delta]


class Planner:
    """The solver's plans for one budget and one sensitivity table (``error[g][k]``; with
    ``per_image``, an ``images``-mode table of per-image errors, see :class:`ImageTable`)."""

    def __init__(self, budget: Budget, groups: Groups, error: list[list], per_image: bool = False):
        self.budget, self.groups = budget, groups
        self.images = ImageTable(error, groups) if per_image else None
        # additive, for display and ordering: damage relative to each image's floor
        self.error = self.images.linear(1 / self.images.floor) if per_image else error

    def proxy(self, choice: list[int]) -> float:
        if self.images is not None:
            return self.images.db_lost(choice)
        return sum(self.error[g][k] for g, k in enumerate(choice))

    def _solve(self, cost, byte_budget: float, fixed: dict[int, int] | None = None):
        b = self.budget
        extra = ([(b.opt_lat, b.latency_limit_s - b.fp_step_s)]
                 if b.latency_limit_s is not None else None)
        return solve(cost, b.opt_bytes, b.opt_fp, byte_budget - b.fixed_bytes,
                     b.fp_allowed, fixed, extra)

    def solve_at(self, byte_budget: float, fixed: dict[int, int] | None = None):
        if self.images is None:
            return self._solve(self.error, byte_budget, fixed)
        # The mean PSNR is a mean of logs: not additive over groups. Majorize-minimize: the
        # log's tangent at the current plan bounds it from above, so each solve of the
        # linearized problem predicts no lower a PSNR than the plan before it.
        choice, best = None, None
        weights = 1 / self.images.floor
        for _ in range(8):
            new = self._solve(self.images.linear(weights), byte_budget, fixed)
            if new is None or new == choice:
                break
            choice = new
            if best is None or self.proxy(choice) < self.proxy(best):
                best = choice
            weights = 1 / self.images.predicted(choice)
        return best

    def fastest_at(self, byte_budget: float) -> list[int] | None:
        """The plan with the smallest predicted step time within ``byte_budget`` (and the cap)."""
        b = self.budget
        lo = min(v for row in b.opt_lat for v in row)
        cost = [[v - lo for v in row] for row in b.opt_lat]  # the solver wants them >= 0
        return solve(cost, b.opt_bytes, b.opt_fp, byte_budget - b.fixed_bytes, b.fp_allowed)

    def seeds(self) -> list[tuple[str, list[int]]]:
        """The first trials: the solver's plans at 100/95/90/80% of the budget, then every uniform
        baseline of the space that fits, plain and with the usual layers kept in full precision
        ("+ protect", what people deploy) -- so the front is never worse than them. The
        baselines come most promising first (by the sensitivity table's predicted error): a
        space of 15 configs has ~30 of them, more than a short search runs, and at an 8-bit
        budget "int8 + protect" must not wait behind uniform 2-bit plans."""
        out = []
        for f in (1.0, 0.95, 0.9, 0.8):
            choice = self.solve_at(self.budget.budget_bytes * f)
            if choice is not None:
                out.append((f"solver@{f:.0%}", choice))
        return out + sorted(self._baselines(), key=lambda seed: self.proxy(seed[1]))

    def _baselines(self) -> list[tuple[str, list[int]]]:
        out = []
        for cfg in self.budget.space.candidates:
            if cfg.full_precision:
                continue
            choice = [g.options.index(cfg) if cfg in g.options else
                      min(range(len(g.options)), key=lambda k: self.budget.opt_bytes[i][k])
                      for i, g in enumerate(self.groups.groups)]
            if max(self.budget.constraints(choice)) <= 0:
                out.append((f"uniform {cfg.label}", choice))
            protected = self._protected(choice)
            if protected != choice and max(self.budget.constraints(protected)) <= 0:
                out.append((f"uniform {cfg.label} + protect", protected))
        return out

    def _protected(self, choice: list[int]) -> list[int]:
        """``choice`` with the groups made only of the usual layers (``--protect default``'s)
        in full precision, where the space offers it."""
        from ..scoring.baseline import is_protected

        out = list(choice)
        for i, g in enumerate(self.groups.groups):
            if all(map(is_protected, g.layers)):
                none = next((k for k, c in enumerate(g.options) if c.full_precision), None)
                if none is not None:
                    out[i] = none
        return out

    def mutate(self, rng: random.Random, base: list[int]) -> list[int] | None:
        """Force 1-3 groups of ``base`` to another option; the solver re-balances the rest."""
        for _ in range(20):
            k = rng.randint(1, min(3, len(base)))
            fixed = {}
            for g in rng.sample(range(len(base)), k):
                others = [i for i in range(len(self.groups.groups[g].options)) if i != base[g]]
                if others:
                    fixed[g] = rng.choice(others)
            choice = self.solve_at(self.budget.budget_bytes * rng.choice((1.0, 1.0, 0.97, 0.93)),
                                   fixed)
            if choice is not None:
                return choice
        return None

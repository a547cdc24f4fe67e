"""Exact bit allocation: choose one config per group to minimize the summed (additive) error
proxy under a byte budget and a full-precision cap -- a multiple-choice knapsack, solved as a
0/1 integer program with HiGHS (scipy.optimize.milp), as HAWQ-V3 and ModelOpt's auto_quantize do."""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


def solve(error: list[list[float]], nbytes: list[list[int]], fp_params: list[list[int]],
          byte_budget: float, fp_budget: float,
          fixed: dict[int, int] | None = None,
          extra: list[tuple[list[list[float]], float]] | None = None) -> list[int] | None:
    """Index of the chosen option per group, or None when no choice fits.

    ``error[g][k]``, ``nbytes[g][k]``, ``fp_params[g][k]``: the k-th option of group g.
    ``fixed``: groups whose option is forced (mutations the search wants to try).
    ``extra``: more additive limits, ``(cost[g][k], upper bound)`` each (a step-time limit).
    """
    fixed = fixed or {}
    offsets, cost, brow, frow = [], [], [], []
    for g, errs in enumerate(error):
        offsets.append(len(cost))
        cost += list(errs)
        brow += list(nbytes[g])
        frow += list(fp_params[g])
    n = len(cost)
    one_per_group = np.zeros((len(error), n))
    lower = np.zeros(n)
    upper = np.ones(n)
    for g, errs in enumerate(error):
        one_per_group[g, offsets[g]:offsets[g] + len(errs)] = 1
        if g in fixed:
            upper[offsets[g]:offsets[g] + len(errs)] = 0
            lower[offsets[g] + fixed[g]] = upper[offsets[g] + fixed[g]] = 1
    rows = [np.array(brow, dtype=float), np.array(frow, dtype=float)]
    bounds = [byte_budget, fp_budget]
    for extra_cost, bound in extra or []:
        rows.append(np.array([v for g in extra_cost for v in g], dtype=float))
        bounds.append(bound)
    A = np.vstack([one_per_group, *rows])
    lb = np.concatenate([np.ones(len(error)), [-np.inf] * len(rows)])
    ub = np.concatenate([np.ones(len(error)), bounds])
    # scale the objective so HiGHS' tolerances see the differences between small errors
    c = np.array(cost) / max(1e-12, float(np.abs(cost).max()))
    res = milp(c, constraints=LinearConstraint(A, lb, ub), integrality=np.ones(n),
               bounds=Bounds(lower, upper), options={"time_limit": 30, "disp": False})
    if res.x is None:
        return None
    x = np.round(res.x).astype(int)
    return [int(np.argmax(x[offsets[g]:offsets[g] + len(errs)])) for g, errs in enumerate(error)]

"""The exact allocation (HiGHS) and the plans built on it: seeds and proxy-repaired mutations."""

from __future__ import annotations

import itertools
import random

import pytest

from autoquant.search.allocate import solve


def brute_force(error, nbytes, fp, byte_budget, fp_budget, fixed=None):
    best = None
    for choice in itertools.product(*(range(len(e)) for e in error)):
        if fixed and any(choice[g] != k for g, k in fixed.items()):
            continue
        b = sum(nbytes[g][k] for g, k in enumerate(choice))
        f = sum(fp[g][k] for g, k in enumerate(choice))
        if b <= byte_budget and f <= fp_budget:
            e = sum(error[g][k] for g, k in enumerate(choice))
            if best is None or e < best[0] - 1e-12:
                best = (e, list(choice))
    return best


def problem(seed, groups=6, options=4):
    rng = random.Random(seed)
    error = [[0.0] + [rng.uniform(1e-4, 1.0) for _ in range(options - 1)] for _ in range(groups)]
    nbytes = [[rng.randint(50, 100)] + [rng.randint(5, 60) for _ in range(options - 1)]
              for _ in range(groups)]
    fp = [[rng.randint(10, 20)] + [0] * (options - 1) for _ in range(groups)]
    return error, nbytes, fp


@pytest.mark.parametrize("seed", range(8))
def test_the_solver_finds_the_optimum_within_budget_and_cap(seed):
    error, nbytes, fp = problem(seed)
    lo = sum(min(r) for r in nbytes)
    budget, cap = lo * 1.6, 25
    choice = solve(error, nbytes, fp, budget, cap)
    expected = brute_force(error, nbytes, fp, budget, cap)
    assert choice is not None and expected is not None
    assert sum(nbytes[g][k] for g, k in enumerate(choice)) <= budget
    assert sum(fp[g][k] for g, k in enumerate(choice)) <= cap
    assert sum(error[g][k] for g, k in enumerate(choice)) == pytest.approx(expected[0], abs=1e-9)


def test_fixed_groups_are_kept_and_the_rest_rebalanced():
    error, nbytes, fp = problem(3)
    budget = sum(min(r) for r in nbytes) * 1.6
    fixed = {0: 2, 4: 1}
    choice = solve(error, nbytes, fp, budget, 25, fixed)
    assert choice[0] == 2 and choice[4] == 1
    expected = brute_force(error, nbytes, fp, budget, 25, fixed)
    assert sum(error[g][k] for g, k in enumerate(choice)) == pytest.approx(expected[0], abs=1e-9)


def test_infeasible_gives_none():
    error, nbytes, fp = problem(1)
    assert solve(error, nbytes, fp, sum(min(r) for r in nbytes) - 1, 100) is None
    # feasible bytes, but the fixed choices alone break the budget
    big = {g: max(range(len(r)), key=lambda k: r[k]) for g, r in enumerate(nbytes)}
    assert solve(error, nbytes, fp, sum(min(r) for r in nbytes) + 5, 100, big) is None


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    import autoquant
    from autoquant.search import Search, SearchConfig
    from autoquant.generation.settings import EvalSettings
    from autoquant.search.space import SearchSpace

    space = SearchSpace.from_dict({"format": "autoquant-space/1", "candidates": [
        {"method": "hqq", "bits": 2, "group_size": 32}, {"method": "hqq", "bits": 4,
                                                         "group_size": 32},
        {"method": "hqq", "bits": 8, "group_size": 32}, {"method": "none"}]})
    s = Search(SearchConfig(model="tiny-flux", budget="40%", space=space, trials=2,
                            out=tmp_path_factory.mktemp("s"), clip=None, progress=False,
                            settings=EvalSettings.for_model("tiny-flux", "search", seeds=[0])),
               autoquant.load_pipeline("tiny-flux", dtype="auto"))
    s.prepare()
    return s


def test_seed_plans_meet_the_budget_at_each_fraction_and_baselines_fit(search):
    seeds = search.seeds()
    sources = [src for src, _ in seeds]
    assert sources[:4] == ["solver@100%", "solver@95%", "solver@90%", "solver@80%"]
    for src, choice in seeds:
        cons = search.constraints(choice)
        assert max(cons) <= 0, src
        if src.startswith("solver@"):
            share = int(src[7:-1]) / 100
            assert search.plan_bytes(choice) <= search.budget_bytes * share
    # the baselines come most promising first: a short search runs them before the hopeless
    # ones (at an 8-bit budget, "int8 + protect" before uniform 2-bit)
    baselines = [search.proxy(c) for s, c in seeds if s.startswith("uniform")]
    assert len(baselines) > 2 and baselines == sorted(baselines)
    # the solver's plan at 100% is at least as good for the proxy as any uniform baseline
    best = search.proxy(seeds[0][1])
    assert all(best <= search.proxy(c) + 1e-12 for s, c in seeds if s.startswith("uniform"))


def test_mutations_change_the_base_and_stay_feasible(search):
    rng = random.Random(0)
    base = search.seeds()[0][1]
    seen = set()
    for _ in range(10):
        choice = search.mutate(rng, base)
        assert choice is not None and choice != base
        assert max(search.constraints(choice)) <= 0
        seen.add(tuple(choice))
    assert len(seen) > 3  # mutations explore, they do not repeat one plan


def _image_planner(rows, nbytes, byte_budget, fp=None):
    """A Planner over an images-mode table, without a model (what it reads of budget/groups)."""
    from types import SimpleNamespace

    from autoquant.search._budget import Planner

    groups = SimpleNamespace(groups=[SimpleNamespace(options=[
        SimpleNamespace(full_precision=bool(fp and fp[g][k])) for k in range(len(r))])
        for g, r in enumerate(rows)])
    budget = SimpleNamespace(opt_bytes=nbytes, opt_fp=fp or [[0] * len(r) for r in rows],
                             fixed_bytes=0, fp_allowed=10**9, latency_limit_s=None,
                             budget_bytes=byte_budget)
    return Planner(budget, groups, rows, per_image=True)


def test_an_image_table_plans_for_the_mean_psnr_not_the_mean_error():
    """Two images: group 0's damage falls on an image that is nearly exact (1e-6), group 1's on
    one that is already far off (1e-3). Summed squared error says: protect group 1 (its damage
    is 4x larger); the mean PSNR says: protect group 0 (it costs that image 13 dB, group 1
    costs the other 0.8 dB). One upgrade fits the budget."""
    import math

    floor = [1e-6, 1e-3]
    rows = [[[1e-6, 1e-3], [2e-5 + 1e-6, 1e-3]],  # group 0: option 0 = 8-bit, 1 = 2-bit
            [[1e-6, 1e-3], [1e-6, 1e-3 + 2e-4]],
            [[1e-6, 1e-3], [1e-6 + 1e-9, 1e-3]]]  # group 2: only the floor moves (bf16 noise)
    nbytes = [[10, 1], [10, 1], [10, 1]]
    planner = _image_planner(rows, nbytes, byte_budget=12)
    assert list(planner.images.floor) == floor
    plain = solve([[sum(v) for v in r] for r in rows], nbytes, [[0, 0]] * 3, 12, 0)
    assert plain == [1, 0, 1]  # the summed error's choice
    choice = planner.solve_at(12)
    assert choice == [0, 1, 1]
    lost = planner.proxy(choice)
    assert lost == pytest.approx((10 * math.log10((1e-3 + 2e-4) / 1e-3)
                                  + 10 * math.log10((1e-6 + 1e-9) / 1e-6)) / 2, rel=1e-6)
    assert lost < planner.proxy(plain)
    assert planner.proxy([0, 0, 0]) == 0.0  # every group at the floor: no damage predicted


def test_an_image_table_keeps_full_precision_at_zero_and_a_broken_image_ruinous():
    inf = float("inf")
    rows = [[[1e-4, 1e-4], [inf, 1e-4], [0.0, 0.0]],  # option 1 made a NaN image; 2 is fp
            [[1e-4, 1e-4], [3e-4, 3e-4], [0.0, 0.0]]]
    fp = [[0, 0, 1], [0, 0, 1]]
    planner = _image_planner(rows, [[5, 1, 20], [5, 1, 20]], byte_budget=7, fp=fp)
    assert all(v == 0.0 for d in planner.images.delta for v in d[2])
    assert planner.solve_at(7) == [0, 1]  # never the option whose image broke
    assert planner.error[0][1] > 100 * planner.error[1][1]

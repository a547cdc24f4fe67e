"""``autoquant search``: an Optuna study over per-layer plans under a memory budget.

How it works (each step measured in the report):
1. Byte formulas give every (group, config) its exact bytes; the budget and the full-precision
   cap are hard constraints checked before any image is made (``_budget``).
2. Sensitivity: the denoiser's real inputs (a few search prompts, early/middle/late steps) are
   replayed with one group at a time quantized; the relative output error is an additive proxy
   of damage (``_replay``, ``_sensitivity``). Measured once per study and stored in it.
3. An exact solver (0/1 integer program, HiGHS) allocates configs to minimize the proxy at
   several budgets; these plans and every uniform baseline that fits are queued once as the
   first trials, so the front is never worse than the baselines.
4. Refinement where the proxy is wrong: the next trials take the study-wide best plan, force
   1-3 groups to another config, and let the solver re-balance the rest ("proxy-repaired
   mutation"). The study's sampler only records; the plans come from the solver.
5. Each trial assembles its model from the layer cache (``_cache``) and is scored in stages
   (``_trial``).
Several workers (processes, GPUs, machines) can share one study through its storage
(``_study``, ``_run``); the outputs are written from the study alone (``_outputs``).
"""

from ._outputs import best_trial, plan_recipe, write_outputs
from ._replay import Replay
from ._run import run_search
from ._search import Search, SearchConfig
from .space import SearchSpace, load_space

__all__ = ["Search", "SearchConfig", "SearchSpace", "Replay", "run_search", "load_space",
           "write_outputs", "plan_recipe", "best_trial"]

"""Search efficiency (the Benchmarks issue, part 2): autoquant against what Optuna gives alone.

Same model (demo), same search prompts and seeds, same budget, same number of trials, same
objectives (bytes, PSNR, CLIP fidelity):

- autoquant: ``Search`` + ``run_search`` (sensitivity pass, solver-made plans, layer cache,
  staged scoring); its wall time includes the sensitivity pass;
- plain TPE: one categorical per Linear layer over the same candidates, ``TPESampler`` reading
  the constraints set on each trial (bytes over budget, full-precision share over the cap,
  ``Trial.set_constraint``, what Optuna 5 uses instead of ``constraints_func``); an infeasible
  candidate is told its constraints without generating an image (the cheap, fair shortcut);
- random: the same with ``RandomSampler``.

For each: best search-set PSNR within the budget and the hypervolume of the (bytes, PSNR) front
within the budget (reference point: the budget, 0 dB), against trials and against wall time;
the final best plans are also scored on the held-out prompts. A figure shows the four curves.

    pip install -e ".[bench]"
    python bench/search_efficiency.py [--trials 40] [--seeds 0 1 2] [--budgets hqq4,1.4xhqq4]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

import autoquant
from autoquant._format import human_bytes, table
from autoquant.backends import config_from_dict
from autoquant.scoring.baseline import baseline_recipe
from autoquant.scoring.evaluator import Evaluator
from autoquant.plans.recipe import Recipe
from autoquant.search import Search, SearchConfig, run_search
from autoquant.search.space import load_space

from _common import write_json
from _demo import demo_bench, search_settings

optuna.logging.set_verbosity(optuna.logging.WARNING)


def hypervolume(points: list[tuple[float, float]], budget: float) -> float:
    """Area (MiB x dB) dominated by (bytes <= budget, PSNR >= 0) points, bytes minimized."""
    pts = sorted((b, max(p, 0.0)) for b, p in points if b <= budget)
    area, best = 0.0, 0.0
    # the dominated region is the union of [b, budget] x [0, psnr]: sweep bytes upwards
    for i, (b, p) in enumerate(pts):
        nxt = pts[i + 1][0] if i + 1 < len(pts) else budget
        best = max(best, p)
        area += (nxt - b) * best
    return area / 2**20


def curves(records: list[dict], budget: float) -> list[dict]:
    """Per trial (in order): elapsed s, best PSNR within budget so far, hypervolume so far."""
    out, pts, best = [], [], None
    for r in records:
        if r.get("psnr") is not None and r["bytes"] <= budget:
            pts.append((r["bytes"], r["psnr"]))
            best = r["psnr"] if best is None else max(best, r["psnr"])
        out.append({"trial": len(out) + 1, "elapsed_s": r["elapsed_s"], "best_psnr": best,
                    "hypervolume": hypervolume(pts, budget)})
    return out


def run_autoquant(pipe, clip, settings, budget, trials, seed):
    folder = Path(tempfile.mkdtemp(prefix="eff-autoquant-"))
    start = time.time()
    search = Search(SearchConfig(model="demo", budget=str(budget), space=load_space("default"),
                                 trials=trials, out=folder, settings=settings, clip=clip,
                                 progress=False, seed=seed,
                                 sensitivity="full"), pipe)
    report = run_search(search)
    study = optuna.load_study(study_name=report["study"], storage=f"sqlite:///{folder / 'study.db'}")
    records = []
    for t in sorted(study.trials, key=lambda t: t.number):
        if not t.state.is_finished():
            continue
        done = t.values is not None and t.state == optuna.trial.TrialState.COMPLETE
        records.append({"bytes": t.user_attrs["predicted_bytes"],
                        "psnr": t.values[1] if done else None,
                        "elapsed_s": t.datetime_complete.timestamp() - start,
                        "source": t.user_attrs.get("source")})
    return records, autoquant.load_recipe(folder / "best.yaml"), {
        "sensitivity_s": search.timing["sensitivity_s"]}


def run_optuna(pipe, clip, settings, space, budget, trials, seed, sampler_name,
               generate_infeasible=False):
    """One categorical per layer; what Optuna alone gives. ``generate_infeasible``: score every
    candidate, as a user who lets the constraints only steer the sampler would (the time is
    spent; an infeasible plan's PSNR is still not counted)."""
    ev = Evaluator(pipe, settings, clip=clip, components=["transformer"], progress=False)
    layers = [l for l in autoquant.inventory(pipe) if l.component == "transformer"]
    other = ev.fp_component_bytes - sum(l.bytes for l in layers)
    total_w = sum(l.weight_params for l in layers)
    options = {l.name: [c for c in space.candidates if l.fits(c) is None] for l in layers}

    sampler = (optuna.samplers.TPESampler(seed=seed) if sampler_name == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(directions=["minimize", "maximize", "maximize"], sampler=sampler)
    start = time.time()
    records, best = [], None
    for _ in range(trials):
        trial = study.ask()
        plan = {}
        for l in layers:
            labels = [c.label for c in options[l.name]]
            plan[l.name] = options[l.name][labels.index(trial.suggest_categorical(l.name, labels))]
        nbytes = other + sum(l.bytes if plan[l.name].full_precision
                             else l.nbytes(plan[l.name]) for l in layers)
        fp = sum(l.weight_params for l in layers if plan[l.name].full_precision)
        cons = [nbytes - budget, fp - space.fp_cap * total_w]
        trial.set_constraint("bytes_over_budget", cons[0])
        trial.set_constraint("fp_weights_over_cap", cons[1])
        psnr, feasible = None, max(cons) <= 0
        if not (feasible or generate_infeasible):  # no image for a plan breaking budget or cap
            study.tell(trial, [nbytes, 0.0, 0.0])
        else:
            r = ev.evaluate(Recipe(layers=plan, components=["transformer"]))  # no cache
            study.tell(trial, [nbytes, r.metrics["psnr"]["mean"],
                               r.metrics["clip_fidelity"]["mean"]])
            if feasible:
                psnr = r.metrics["psnr"]["mean"]
                if best is None or psnr > best[0]:
                    best = (psnr, plan)
        records.append({"bytes": nbytes, "psnr": psnr, "elapsed_s": time.time() - start})
    recipe = Recipe(layers=best[1], components=["transformer"]) if best else None
    return records, recipe, {}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(results)
    fig, axes = plt.subplots(len(budgets), 4, figsize=(18, 4 * len(budgets)), squeeze=False)
    colors = {"autoquant": "tab:red", "tpe": "tab:blue", "random": "tab:gray"}
    for row, budget in enumerate(budgets):
        entry = results[budget]
        for run in entry["runs"]:
            c = run["curve"]
            style = dict(color=colors[run["method"]], alpha=0.9 if run["seed"] == 0 else 0.5,
                         label=f"{run['method']} (seed {run['seed']})")
            for col, (x, y) in enumerate([("trial", "best_psnr"), ("elapsed_s", "best_psnr"),
                                          ("trial", "hypervolume"),
                                          ("elapsed_s", "hypervolume")]):
                xs = [p[x] for p in c if p[y] is not None]
                ys = [p[y] for p in c if p[y] is not None]
                axes[row][col].step(xs, ys, where="post", **style)
                axes[row][col].set_xlabel("trials" if x == "trial" else "wall time (s)")
                axes[row][col].set_ylabel("best PSNR in budget (dB)" if y == "best_psnr"
                                          else "hypervolume (MiB x dB)")
        for (name, value), ls in zip(entry["baselines"].items(), (":", "--", "-.")):
            for col in (0, 1):
                axes[row][col].axhline(value, ls=ls, color="k", lw=0.8,
                                       label=f"{name}: {value:.2f} dB" if col == 0 else None)
        axes[row][0].set_title(f"budget {entry['label']} ({human_bytes(entry['budget_bytes'])})")
        handles, labels = axes[row][0].get_legend_handles_labels()
        axes[row][2].legend(handles, labels, fontsize=7, loc="center right",
                            bbox_to_anchor=(1.0, 0.64))  # above the others, below autoquant
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seeds of TPE and random (autoquant runs with the first)")
    ap.add_argument("--budgets", default="hqq4,1.4xhqq4",
                    help="comma-separated: hqq4 (uniform hqq 4-bit's bytes), FxBASE, or bytes")
    ap.add_argument("--json", default="bench/results/search_efficiency.json")
    ap.add_argument("--plot", default="bench/results/search_efficiency.png")
    ap.add_argument("--replot", action="store_true", help="only redraw the figure from --json")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.json).read_text())["results"], Path(args.plot))
        return 0
    pipe, clip, holdout, _ = demo_bench({})
    space = load_space("default")
    settings = search_settings()
    search_ev = Evaluator(pipe, settings, clip=clip, progress=False)  # references made once
    inv = autoquant.inventory(pipe)
    uniform = {n: baseline_recipe(inv, config_from_dict(c), ["transformer"]) for n, c in
               {"hqq4": {"method": "hqq", "bits": 4}, "bnb-nf4": {"method": "bnb", "bits": 4},
                "hqq8": {"method": "hqq", "bits": 8}}.items()}
    base_search = {n: search_ev.evaluate(r, n) for n, r in uniform.items()}
    results, rows = {}, []
    for spec in args.budgets.split(","):
        if spec.endswith("hqq4"):
            factor = float(spec[:-len("xhqq4")] or 1) if "x" in spec else 1.0
            budget = int(factor * base_search["hqq4"].bytes)
        else:
            budget = int(float(spec))
        entry = {"label": spec, "budget_bytes": budget, "runs": [],
                 "baselines": {f"uniform {n} (search set)": r.metrics["psnr"]["mean"]
                               for n, r in base_search.items() if r.bytes <= budget}}
        plan = [("autoquant", args.seeds[0])] + [(m, s) for m in ("tpe", "random")
                                                 for s in args.seeds]
        for method, seed in plan:
            if method == "autoquant":
                records, recipe, extra = run_autoquant(pipe, clip, settings, budget, args.trials,
                                                       seed)
            else:
                records, recipe, extra = run_optuna(pipe, clip, settings, space, budget,
                                                    args.trials, seed, method)
            curve = curves(records, budget)
            last = curve[-1]
            held = holdout.evaluate(recipe, method).metrics["psnr"]["mean"] if recipe else None
            run = {"method": method, "seed": seed, "records": records, "curve": curve,
                   "feasible": sum(1 for r in records if r["bytes"] <= budget),
                   "scored": sum(1 for r in records if r["psnr"] is not None),
                   "best_psnr": last["best_psnr"], "hypervolume": last["hypervolume"],
                   "wall_s": records[-1]["elapsed_s"] if records else None,
                   "holdout_psnr": held, **extra}
            entry["runs"].append(run)
            rows.append([spec, method, str(seed), f"{run['feasible']}/{len(records)}",
                         f"{run['best_psnr']:.2f}" if run["best_psnr"] is not None else "-",
                         f"{run['hypervolume']:.1f}", f"{run['wall_s']:.0f}",
                         f"{held:.2f}" if held is not None else "-"])
            print(rows[-1], flush=True)
        results[spec] = entry
        write_json(args.json, {"results": results})
    print(table(rows, ["budget", "method", "seed", "feasible", "best PSNR (search)",
                       "hypervolume", "wall s", "best on held-out"]))
    verdicts = []
    for spec, entry in results.items():
        ours = next(r for r in entry["runs"] if r["method"] == "autoquant")
        others = [r for r in entry["runs"] if r["method"] != "autoquant"]
        best_other = max((r["best_psnr"] or float("-inf")) for r in others)
        hv_other = max(r["hypervolume"] for r in others)
        # the time autoquant needs to pass the best any baseline reached in all its trials
        when = next((p["elapsed_s"] for p in ours["curve"]
                     if p["best_psnr"] is not None and p["best_psnr"] > best_other), None)
        met = (ours["best_psnr"] or float("-inf")) > best_other and ours["hypervolume"] > hv_other
        verdicts.append({"budget": spec, "best_psnr": ours["best_psnr"],
                         "best_other_psnr": best_other, "hypervolume": ours["hypervolume"],
                         "best_other_hypervolume": hv_other,
                         "autoquant_passes_best_other_at_s": when, "met": met})
        other_text = f"{best_other:.2f} dB" if best_other > float("-inf") else "none in budget"
        print(f"target @ {spec}: autoquant beats TPE and random in best PSNR and hypervolume after "
              f"the same trials -> {ours['best_psnr']:.2f} dB vs {other_text}, HV "
              f"{ours['hypervolume']:.1f} vs {hv_other:.1f}: {'met' if met else 'NOT met'}; "
              f"passes their best after {when if when is None else round(when)} s")
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "trials": args.trials, "seeds": args.seeds,
           "results": results, "target": verdicts}
    write_json(args.json, out)
    plot(results, Path(args.plot))
    print(f"figure: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

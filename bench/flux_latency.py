"""Smaller and faster (the latency issue): step time on the Flux-dev architecture, H100, 1024 px,
batch 1 (4096 image + 512 text tokens), random bf16 weights -- time and bytes only.

    python bench/flux_latency.py --part eager    [--json bench/results/flux_latency_eager.json]
    python bench/flux_latency.py --part compile  [--json bench/results/flux_latency_compile.json]

``eager``: the step of bf16 and of each uniform config (every Linear of the transformer that can
take it); the latency model's table; >= 10 plans drawn by the search (proxy-repaired mutations at
several budgets, the search's own proposal machinery) predicted vs measured; the fastest plan at
the bytes of uniform hqq 4-bit. ``compile``: the same under ``torch.compile`` for bf16 and the
configs with fast compiled kernels, the compile-mode table, and the fastest plans at <= 50% of
bf16's bytes and at hqq4's bytes, predicted and measured; its space ties each layer position across
the blocks of a kind (``BY_POSITION``), so a plan compiles two block graphs. ``compile-slow`` (on a
second GPU beside ``compile``): bf16 and ``--slow-configs`` uniform plans compiled, bf16 compiled
whole with ``--whole-too``.

The fastest plans at 30/40/50% of bf16's bytes and at hqq4's, with int4 x fp8 in the space (mslk-cuda
installed; each plan's recipe, tied by block position, goes into the JSON for
``bench/demo_flux_gpu.py run --plans``):

    python bench/flux_latency.py --part compile --hqq4-bytes 6698977408 --fastest 30%,40%,50%,hqq4 \
        --compiled-configs none,torchao-fp8_dynamic,torchao-fp8_int4,torchao-fp8_int4_plain,bnb4-nf4,hqq4-g64

    CUDA_VISIBLE_DEVICES=0 python bench/flux_latency.py --part compile --hqq4-bytes 6698977408 &
    CUDA_VISIBLE_DEVICES=1 python bench/flux_latency.py --part compile-slow --whole-too \
        --slow-configs hqq4-g64,torchao-int8,torchao-int8_dynamic,hqq8-g64,higgs4-p2-g64
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

import torch

import autoquant
from autoquant.backends.measure import measured_bytes
from autoquant._format import human_bytes, table
from autoquant.scoring.evaluator import generate_images
from autoquant.runtime.latency import compiled, time_call
from autoquant.search import Replay
from autoquant.search._cache import collect_garbage
from autoquant.generation.settings import EvalSettings, prompt_set

from _common import environment, write_json
from _flux import build_pipeline, sync

SPACE = {"format": "autoquant-space/1", "components": ["transformer"], "candidates": [
    {"method": "hqq", "bits": 4, "group_size": 64}, {"method": "hqq", "bits": 8, "group_size": 64},
    {"method": "bnb", "bits": 4, "type": "nf4"}, {"method": "torchao", "type": "int8"},
    {"method": "torchao", "type": "int8_dynamic"}, {"method": "torchao", "type": "fp8_dynamic"},
    {"method": "torchao", "type": "fp8"}, {"method": "higgs", "bits": 4, "p": 2, "group_size": 64},
    {"method": "torchao", "type": "fp8_int4"}, {"method": "torchao", "type": "fp8_int4_plain"},
    {"method": "none"}],
    "tie": ["re:(transformer\\.(?:single_)?transformer_blocks\\.\\d+\\.attn)\\.to_[qkv]",
            "re:(transformer\\.transformer_blocks\\.\\d+\\.attn)\\.add_[qkv]_proj"],
    "fp_cap": 0.2, "objectives": ["bytes", "psnr", "latency"]}
# what runs fast compiled: the table for compile mode is measured for these only (minutes each)
COMPILED = ("none", "torchao-fp8_dynamic", "bnb4-nf4")
# compiled plans: one layer position takes one config across all blocks of a kind, so a plan
# compiles one graph per block kind (2) -- a free mix of configs over 57 blocks compiles one graph
# per distinct block (dozens, ~10 s each); run time is the same either way
BY_POSITION = "re:(transformer\\.(?:single_)?transformer_blocks)\\.\\d+\\.(.*)"


def layer_type(name: str) -> str:
    """A layer's role, for 'configs per layer type' (numbers dropped)."""
    import re

    return re.sub(r"\.\d+\.", ".N.", name.replace("transformer.", "", 1))


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        self.pipe = build_pipeline(self.device, args.small)
        settings = EvalSettings(prompts=prompt_set("flux", "search")[:1], seeds=(0,), steps=4,
                                guidance=3.5, height=args.size, width=args.size, batch_size=1,
                                extra=(("max_sequence_length", 512),))
        self.replay = Replay.capture(self.pipe, "transformer", lambda: generate_images(
            self.pipe, settings, settings.pairs()))
        self.call = self.replay.step_call()
        only = (None if args.part in ("eager", "rest", "compile-slow")
                else args.compiled_configs.split(","))
        runs_here = [c for c in SPACE["candidates"]  # (fp8_dynamic is CUDA-only: a CPU check)
                     if autoquant.get_backend(c["method"]).unavailable_reason(
                         autoquant.config_from_dict(c), self.device) is None]
        space = {**SPACE, "candidates": [c for c in runs_here
                                         if only is None or _label(c) in only]}
        if args.part == "compile":
            space["tie"] = [BY_POSITION]
        self.search = autoquant.Search(autoquant.SearchConfig(
            model="flux-dev-architecture-random", budget="100%",
            space=autoquant.SearchSpace.from_dict(space, name="latency-bench"),
            settings=settings, clip=None, progress=args.part == "compile",  # minutes per bar
            cache_bytes=30 * 2**30,  # the calibration builds every config: room, evicting
            latency="100x", latency_mode="eager" if args.part in ("eager", "rest") else "compile"),
            self.pipe)
        self.space_dict = space
        self.search.replay = self.replay
        self.transformer = self.pipe.transformer
        self.fp_bytes = measured_bytes(self.transformer)
        self.out: dict = {"environment": environment(self.device), "args": vars(args),
                          "tokens": {"image": self.call[1]["hidden_states"].shape[1],
                                     "text": self.call[1]["encoder_hidden_states"].shape[1]},
                          "bf16_bytes": self.fp_bytes}

    def step(self, mode: str, whole: bool = False) -> tuple[float, float]:
        """(median step seconds, seconds spent compiling) of the transformer as it stands
        (``whole``: compiled as one graph rather than block by block)."""
        args, kwargs = self.call
        if mode == "eager":
            return time_call(lambda: self.transformer(*args, **kwargs), self.device, 10), 0.0
        torch._dynamo.reset()
        with compiled(self.transformer, whole) as fn:
            t = time.perf_counter()
            with torch.no_grad():
                fn(*args, **kwargs)
            sync(self.device)
            compile_s = time.perf_counter() - t
            return time_call(lambda: fn(*args, **kwargs), self.device, 10), compile_s

    def bf16_whole(self) -> None:
        """bf16 compiled as one graph (what regional compilation changes; the slow compile)."""
        write_json(self.args.json, self.out)
        step, cs = self.step("compile", whole=True)
        self.out["bf16_compile"]["whole"] = {"step_s": step, "compile_s": cs}
        print(f"bf16 compiled whole: {step * 1e3:.1f} ms (compiled in {cs:.0f} s)", flush=True)

    def uniform(self, mode: str, labels, bf16: bool = True) -> None:
        """Step time and bytes of every uniform config (each layer that can take it)."""
        cache, rows = self.search.cache, self.out.setdefault("uniform", {}).setdefault(mode, {})
        fp = rows["bf16"]["step_s"] if "bf16" in rows else None
        if bf16 or fp is None:
            fp, cs = self.step(mode)
            rows["bf16"] = {"step_s": fp, "bytes": self.fp_bytes, "compile_s": cs}
            print(f"bf16 {mode}: {fp * 1e3:.1f} ms", flush=True)
        by_label = {c.label: c for c in map(autoquant.config_from_dict, SPACE["candidates"])}
        for cfg in (by_label[label] for label in labels):  # in the order asked: slow ones last
            if cfg.full_precision:
                continue
            cache.clear()
            collect_garbage()
            plan = {l.name: cfg for l in self.search.inv if l.component == "transformer"
                    and l.fits(cfg) is None}
            cache.assemble(plan)
            print(f"{cfg.label} {mode}: {len(plan)} layers built, timing", flush=True)
            step, cs = self.step(mode)
            rows[cfg.label] = {"step_s": step, "bytes": measured_bytes(self.transformer),
                               "vs_bf16": step / fp, "compile_s": cs, "layers": len(plan)}
            print(f"{cfg.label} {mode}: {step * 1e3:.1f} ms ({step / fp:.2f}x bf16), "
                  f"{human_bytes(rows[cfg.label]['bytes'])}, compiled in {cs:.0f} s", flush=True)
            write_json(self.args.json, self.out)
            cache.restore()
        cache.clear()

    def latency_model(self, mode: str) -> None:
        t = time.perf_counter()
        info = self.search.measure_latency()
        self.search.use_latency(info)
        if self.search.planner is None:  # fastest_at needs no errors; the planner wants a table
            self.search.use_sensitivity([[0.0] * len(g.options) for g in
                                         self.search.groups.groups], "none")
        self.out.setdefault("table", {})[mode] = {"seconds": time.perf_counter() - t,
                                                  "fp_step_s": info["fp_step_s"],
                                                  "entries_measured": info["entries_measured"],
                                                  "calibration": info["calibration"],
                                                  "uniform_step_s": info["uniform_step_s"]}
        print(f"latency table ({mode}): {info['entries_measured']} entries measured in "
              f"{time.perf_counter() - t:.0f} s; fp step {info['fp_step_s'] * 1e3:.1f} ms",
              flush=True)

    def plans(self, n: int) -> None:
        """>= n plans as the search proposes them (solver plans and proxy-repaired mutations at
        several budgets; a local error table stands in for the sensitivity pass): predicted vs
        measured eager step."""
        search = self.search
        search.use_sensitivity(_random_errors(search), "random stand-in")
        rng, rows = random.Random(0), []
        budgets = ["30%", "40%", "50%", "60%"]
        for i in range(n):
            search.retarget(budgets[i % len(budgets)], search.cfg.out)
            base = search.solve_at(search.budget_bytes)
            choice = base if i < len(budgets) else search.mutate(rng, base)
            plan = search.groups.plan(choice)
            search.cache.clear()  # dropped quantized modules hold memory until collected
            collect_garbage()
            search.cache.assemble(plan)
            measured, _ = self.step("eager")
            predicted = search.plan_latency(choice)
            rows.append({"budget": budgets[i % len(budgets)], "bytes": search.plan_bytes(choice),
                         "predicted_s": predicted, "measured_s": measured,
                         "error": predicted / measured - 1})
            print(f"plan {i}: predicted {predicted * 1e3:.1f} ms, measured "
                  f"{measured * 1e3:.1f} ms ({rows[-1]['error']:+.1%})", flush=True)
            search.cache.restore()
            write_json(self.args.json, self.out | {"plans": {"rows": rows}})
        errs = [abs(r["error"]) for r in rows]
        self.out["plans"] = {"rows": rows, "mean_abs_error": sum(errs) / len(errs),
                             "worst_abs_error": max(errs)}

    def fastest(self, mode: str, budgets: dict[str, float]) -> None:
        """The plan with the smallest predicted step at each byte budget, measured."""
        search = self.search
        out = {}
        for name, nbytes in budgets.items():
            search.retarget(str(int(nbytes)), search.cfg.out)
            choice = search.planner.fastest_at(search.budget_bytes)
            if choice is None:
                out[name] = {"budget_bytes": nbytes, "error": "no plan of the space fits"}
                print(f"fastest at {name}: no plan of the space fits", flush=True)
                continue
            plan = search.groups.plan(choice)
            per_type = Counter(f"{layer_type(n)}: {c.label}" for n, c in plan.items())
            # a compiled step compiles one graph per distinct block: say how many before it runs
            out[name] = {"budget_bytes": nbytes, "predicted_s": search.plan_latency(choice),
                         "block_variants": block_variants(plan),
                         "recipe": by_position(plan),
                         "configs": dict(Counter(c.label for c in plan.values())),
                         "per_layer_type": dict(per_type)}
            print(f"fastest at {name}: predicted {out[name]['predicted_s'] * 1e3:.1f} ms, "
                  f"{out[name]['block_variants']} block variants; {out[name]['configs']}",
                  flush=True)
            write_json(self.args.json, self.out | {"fastest": {mode: out}})
            search.cache.clear()
            collect_garbage()
            search.cache.assemble(plan)
            measured, cs = self.step(mode)
            out[name].update(bytes=measured_bytes(self.transformer), measured_s=measured,
                             compile_s=cs)
            print(f"fastest at {name} ({human_bytes(nbytes)}), {mode}: predicted "
                  f"{out[name]['predicted_s'] * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms; "
                  f"{out[name]['configs']}", flush=True)
            search.cache.restore()
        self.out.setdefault("fastest", {})[mode] = out


def by_position(plan: dict) -> dict:
    """A plan tied by block position (``BY_POSITION``) as recipe layers: one ``re:`` entry per
    position of each block kind, exact names for the other layers."""
    import re

    out = {}
    for name, cfg in sorted(plan.items()):
        m = re.fullmatch(r"(transformer\.(?:single_)?transformer_blocks)\.\d+\.(.+)", name)
        key = (f"re:{re.escape(m.group(1))}\\.\\d+\\.{re.escape(m.group(2))}" if m
               else name)
        if out.setdefault(key, cfg.to_dict()) != cfg.to_dict():
            raise ValueError(f"{name}: the plan is not tied by position")
    return out


def block_variants(plan: dict) -> int:
    """Distinct repeated blocks (their class and their layers' configs) of a plan."""
    import re

    blocks: dict[str, list] = {}
    for name, cfg in sorted(plan.items()):
        m = re.match(r"(transformer\.(?:single_)?transformer_blocks\.\d+)\.(.+)", name)
        if m:
            blocks.setdefault(m.group(1), []).append((m.group(2), cfg.label))
    return len({(k.split(".")[1], tuple(v)) for k, v in blocks.items()})


def _label(entry: dict) -> str:
    return autoquant.config_from_dict(entry).label


def _random_errors(search) -> list[list[float]]:
    """A stand-in for the sensitivity table (fewer bits, more error, with per-group noise):
    enough for the solver to propose the varied plans the search would; quality is not what
    this benchmark measures."""
    rng = random.Random(0)
    return [[0.0 if c.full_precision else 2.0 ** (-c.nominal_bits) * rng.uniform(0.3, 3.0)
             for c in g.options] for g in search.groups.groups]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["eager", "compile", "compile-slow", "rest"],
                    default="eager",
                    help="rest: the eager part without its uniform pass (the latency table, "
                         "plans and fastest plans; needs --hqq4-bytes); compile-slow: only "
                         "bf16 and --slow-configs compiled, and --whole-too (another GPU, "
                         "beside --part compile)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--plans", type=int, default=12)
    ap.add_argument("--hqq4-bytes", type=float, default=None,
                    help="uniform hqq4's measured bytes (from an earlier --part eager run)")
    ap.add_argument("--whole-too", action="store_true",
                    help="compile: also compile bf16 whole (vs block by block)")
    ap.add_argument("--slow-configs", default="",
                    help="compile: also time these configs' uniform plans compiled (labels, comma-"
                         "separated: hqq4-g64,torchao-int8,...)")
    ap.add_argument("--compiled-configs", default=",".join(COMPILED),
                    help="compile: the configs of the compile-mode space (labels)")
    ap.add_argument("--fastest", default="50%,hqq4",
                    help="compile: the fastest plans to measure (N%%: at N%% of bf16's bytes; "
                         "hqq4: at --hqq4-bytes)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a narrow Flux (checking the script)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.json = args.json or f"bench/results/flux_latency_{args.part}.json"
    labels = [_label(c) for c in SPACE["candidates"]]
    unknown = set(filter(None, args.slow_configs.split(","))) - set(labels)
    if unknown:
        ap.error(f"--slow-configs: unknown {sorted(unknown)}; labels: {labels}")
    torch._dynamo.config.cache_size_limit = 64
    b = Bench(args)
    if args.part == "rest":  # the eager model, its plans and fastest plans (no uniform pass)
        b.latency_model("eager")
        write_json(args.json, b.out)
        b.plans(args.plans)
        write_json(args.json, b.out)
        b.fastest("eager", {"hqq4 bytes": args.hqq4_bytes, "50% of bf16": 0.5 * b.fp_bytes})
    elif args.part == "eager":
        b.uniform("eager", [_label(c) for c in SPACE["candidates"]])
        write_json(args.json, b.out)
        b.latency_model("eager")
        write_json(args.json, b.out)
        b.plans(args.plans)
        write_json(args.json, b.out)
        hqq4_bytes = b.out["uniform"]["eager"]["hqq4-g64"]["bytes"]
        b.fastest("eager", {"hqq4 bytes": hqq4_bytes, "50% of bf16": 0.5 * b.fp_bytes})
    elif args.part == "compile-slow":
        b.uniform("compile", args.slow_configs.split(",") if args.slow_configs else [])
        b.out["bf16_compile"] = {"regional": {k: b.out["uniform"]["compile"]["bf16"][k]
                                              for k in ("step_s", "compile_s")}}
        if args.whole_too:
            b.bf16_whole()
    else:
        # bf16 compiled as deployed (block by block) -- and, last, once whole: what regional
        # compilation changes in step time and compile time
        wanted = args.fastest.split(",")
        if wanted:
            fp, cs = b.step("compile")
            b.out["bf16_compile"] = {"regional": {"step_s": fp, "compile_s": cs}}
            print(f"bf16 compiled block by block: {fp * 1e3:.1f} ms (compiled in {cs:.0f} s)",
                  flush=True)
            write_json(args.json, b.out)
        # the compile-mode table's calibration compiles and times each config's uniform plan:
        # those are the uniform compiled steps (no second compile of each)
        b.latency_model("compile")
        info = b.search.latency_info
        fp = info["fp_step_s"]
        b.out.setdefault("uniform", {})["compile"] = {"bf16": {"step_s": fp, "bytes": b.fp_bytes},
            **{k: {"step_s": v, "vs_bf16": v / fp} for k, v in info["uniform_step_s"].items()}}
        for k, v in b.out["uniform"]["compile"].items():
            print(f"{k} compiled: {v['step_s'] * 1e3:.1f} ms", flush=True)
        write_json(args.json, b.out)
        budgets = {f"{w} of bf16": float(w[:-1]) / 100 * b.fp_bytes
                   for w in wanted if w.endswith("%")}
        if args.hqq4_bytes and "hqq4" in wanted:
            budgets["hqq4 bytes"] = args.hqq4_bytes
        b.fastest("compile", budgets)
        write_json(args.json, b.out)
        if args.slow_configs:  # the configs without fast compiled kernels, uniform, compiled
            b.uniform("compile", args.slow_configs.split(","), bf16=False)
        if args.whole_too:  # last: the one slow compile
            b.bf16_whole()
    write_json(args.json, b.out)
    rows = [[k, human_bytes(v["bytes"]) if "bytes" in v else "", f"{v['step_s'] * 1e3:.1f}",
             f"{v.get('vs_bf16', 1):.2f}"] for m in b.out.get("uniform", {}).values()
            for k, v in m.items()]
    print(table(rows, ["plan", "bytes", "step ms", "vs bf16 (same mode)"]))
    if "plans" in b.out:
        p = b.out["plans"]
        print(f"latency model over {len(p['rows'])} plans: mean |error| "
              f"{p['mean_abs_error']:.1%}, worst {p['worst_abs_error']:.1%} (target mean <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

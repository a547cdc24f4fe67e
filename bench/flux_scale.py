"""Scale (the Benchmarks issue, part 3): the search's machinery on the Flux-dev architecture.

    python bench/flux_scale.py [--space default] [--steps 28] [--json bench/results/flux_scale_h100.json]

FluxTransformer2DModel with Flux-dev's published config (11.9B parameters, 504 Linear layers),
randomly initialized in bf16 on the GPU, inside a FluxPipeline whose text encoders are single-layer
stand-ins with Flux's output widths (T5: 512 tokens x 4096, CLIP pooled: 768) and whose VAE has
Flux's architecture (``_flux.py``). Nothing can be downloaded, so the weights are random: memory
and time are meaningful, image quality is not and is never reported. Measured, side by side in
one run:

1. the layer cache for the space: every (layer, config) quantized once -- time per config and in
   total, its bytes by formula, by the tensors the modules hold, and by the CUDA allocator;
2. a 1024 px denoiser step (batch 1, Flux-dev's 4096 image + 512 text tokens) for bf16, each
   uniform config of the space and one mixed plan;
3. one mixed plan: the solver (HiGHS) allocating configs at the bytes of uniform hqq 4-bit, from a
   per-(layer, config) error table measured on random activations (a stand-in for the sensitivity
   pass, see 5), then assembled from the cache; predicted vs measured GPU bytes;
4. one search trial as ``autoquant search`` runs it (assemble, proxy forward, generate, metrics),
   against the pure generation time of the same images;
5. the sensitivity pass: one probe (the denoiser on the captured inputs) timed, times the number
   of probes the space needs -- an extrapolation, marked as such.

``--layers small`` (1 + 2 narrow blocks) with ``--size 256 --device cpu`` is a quick check of the script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import autoquant
from autoquant.backends.measure import measured_bytes
from autoquant._format import human_bytes, table
from autoquant.scoring.evaluator import generate_images
from autoquant.search import Replay
from autoquant.generation.settings import EvalSettings, prompt_set

from _common import environment, write_json
from _flux import allocated, build_pipeline, first_of_batch, step_latency, sync

HEADER = ["plan", "GPU bytes", "build s", "allocator vs formula", "measured vs predicted",
          "1024px step ms", "vs bf16"]


@torch.no_grad()
def local_error(original, module, x) -> float:
    """Relative output error of one layer on random activations (the stand-in proxy)."""
    ref = original(x).float()
    out = module(x).float()
    return ((out - ref).pow(2).sum() / ref.pow(2).sum()).item()


def ratio(measured: int, predicted: int) -> str:
    return f"{measured / predicted - 1:+.2%}" if measured else "-"


class Bench:
    """One run: the pipeline, a Search over it (groups, budget arithmetic, layer cache), the
    captured denoiser inputs, and the results as they come (``out``, saved after each phase)."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.out: dict = {"environment": environment(self.device), "args": vars(args)}
        t0 = time.perf_counter()
        self.pipe = build_pipeline(self.device, args.layers == "small")
        sync(self.device)
        prompts = prompt_set("flux", "search")[:args.images]
        self.settings = EvalSettings(prompts=prompts, seeds=(0,), steps=args.steps, guidance=3.5,
                                     height=args.size, width=args.size, batch_size=args.images,
                                     extra=(("max_sequence_length", 512),))
        self.search = autoquant.Search(autoquant.SearchConfig(
            model="flux-dev-architecture-random", budget="100%",
            space=autoquant.load_space(args.space), settings=self.settings, clip=None,
            progress=False, cache_bytes=float("inf")), self.pipe)
        self.transformer = self.pipe.transformer
        self.layers = [l for l in self.search.inv if l.component == "transformer"]
        self.out["model"] = {"params": sum(p.numel() for p in self.transformer.parameters()),
                             "linear_layers": len(self.layers),
                             "groups": len(self.search.groups.groups),
                             "fixed_layers": len(self.search.groups.fixed),
                             "bf16_bytes": self.search.fp_bytes,
                             "build_s": time.perf_counter() - t0}
        self.rows: list[list[str]] = []

    def save(self) -> None:
        write_json(self.args.json, self.out)

    def capture(self) -> None:
        """The denoiser inputs of the trial's images (as a search captures them), the 1024 px
        step (batch 1) they give, and bf16's latency on it."""
        t = time.perf_counter()
        pairs = self.settings.pairs()
        self.replay = Replay.capture(self.pipe, "transformer",
                                     lambda: generate_images(self.pipe, self.settings, pairs))
        sync(self.device)
        self.out["capture_generation_s"] = time.perf_counter() - t
        call = self.replay.inputs[0]
        self.batch = call[1]["hidden_states"].shape[0] if len(self.replay.inputs) == 1 else 1
        self.step_call = first_of_batch(call, self.batch)
        tokens = self.step_call[1]["hidden_states"].shape[1]
        self.out["step_tokens"] = {"image": tokens,
                                   "text": self.step_call[1]["encoder_hidden_states"].shape[1]}
        self.lat_bf16 = self.latency()
        self.out["latency"] = {"bf16": {"step_s": self.lat_bf16, "bytes": self.search.fp_bytes}}
        self.rows.append(["bf16", human_bytes(self.search.fp_bytes), "-", "-", "-",
                          f"{self.lat_bf16 * 1e3:.1f}", "1.00"])
        print(f"bf16 step ({tokens} image tokens): {self.lat_bf16 * 1e3:.1f} ms", flush=True)
        self.save()

    def latency(self) -> float:
        return step_latency(self.transformer, self.step_call, self.device, self.args.repeats)

    def uniform_configs(self) -> None:
        """Phases 1 + 2: the cache, config by config (one config's modules at a time on the GPU:
        the whole cache is larger than the card), and each uniform plan's step latency."""
        cache, inv, groups = self.search.cache, self.search.inv, self.search.groups
        xs: dict[int, torch.Tensor] = {}
        gen = torch.Generator(device=self.device).manual_seed(0)
        self.local: dict[tuple, float] = {}
        self.out["configs"] = {}
        for cfg in [c for c in self.search.cfg.space.candidates if not c.full_precision]:
            cache.clear()
            m0 = allocated(self.device)
            names = [l.name for g in groups.groups if cfg in g.options for l in g.layers]
            record: dict = {"layers": len(names)}
            try:
                t = time.perf_counter()
                for name in names:
                    cache.module(name, cfg)
                sync(self.device)
                record["build_s"] = time.perf_counter() - t
                record["formula_bytes"] = sum(inv[n].nbytes(cfg) for n in names)
                record["module_bytes"] = sum(measured_bytes(cache.module(n, cfg)) for n in names)
                record["allocator_bytes"] = allocated(self.device) - m0
                t = time.perf_counter()
                for name in names:
                    n_in = inv[name].in_features
                    if n_in not in xs:
                        xs[n_in] = torch.randn(256, n_in, device=self.device,
                                               dtype=torch.bfloat16, generator=gen)
                    self.local[(name, cfg)] = local_error(cache.originals[name],
                                                          cache.module(name, cfg), xs[n_in])
                record["local_error_s"] = time.perf_counter() - t
                t = time.perf_counter()
                cache.assemble({n: cfg for n in names})
                sync(self.device)
                record["assemble_s"] = time.perf_counter() - t
                record["predicted_bytes"] = self.search.fp_bytes - sum(
                    inv[n].bytes for n in names) + record["formula_bytes"]
                record["measured_bytes"] = measured_bytes(self.transformer)
                record["step_s"] = self.latency()
            except (RuntimeError, autoquant.AutoquantError) as e:  # recorded; the others go on
                record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            cache.restore()
            self.out["configs"][cfg.label] = record
            self._row(cfg.label, record, record.get("build_s"))
            self.save()
        cache.clear()
        built = {k: v for k, v in self.out["configs"].items() if "error" not in v}
        self.out["cache"] = {"build_s": sum(v["build_s"] for v in built.values()),
                             "bytes": sum(v["formula_bytes"] for v in built.values()),
                             "configs": len(built),
                             "layer_configs": sum(v["layers"] for v in built.values())}

    def _row(self, label: str, record: dict, build_s) -> None:
        if "error" in record:
            print(f"{label}: {record['error']}", flush=True)
            self.rows.append([label, "-", "-", "-", "-", "failed", "-"])
            return
        self.rows.append([label, human_bytes(record["measured_bytes"]),
                          f"{build_s:.1f}",
                          ratio(record.get("allocator_bytes", 0), record["formula_bytes"]),
                          f"{record['measured_bytes'] / record['predicted_bytes'] - 1:+.2%}",
                          f"{record['step_s'] * 1e3:.1f}", f"{record['step_s'] / self.lat_bf16:.2f}"])
        print(self.rows[-1], flush=True)

    def mixed_plan(self) -> None:
        """Phase 3: one mixed plan at uniform hqq4's bytes, from the local error table."""
        search, groups = self.search, self.search.groups
        table_err = [[sum(self.local.get((l.name, c), float("inf")) for l in g.layers)
                      if not c.full_precision else 0.0 for c in g.options] for g in groups.groups]
        for g, row in enumerate(table_err):  # a config that failed to build is priced out
            for k, v in enumerate(row):
                if v == float("inf"):
                    search.budget.opt_bytes[g][k], row[k] = 10**15, 0.0
        search.use_sensitivity(table_err, "local (random activations)")
        hqq4 = next(v for k, v in self.out["configs"].items() if k.startswith("hqq4"))
        search.retarget(str(hqq4["predicted_bytes"]), search.cfg.out)
        t = time.perf_counter()
        choice = search.solve_at(search.budget_bytes)
        mix: dict = {"budget_bytes": search.budget_bytes, "solve_s": time.perf_counter() - t}
        plan = groups.plan(choice)
        mix["configs"] = {c.label: sum(1 for v in plan.values() if v == c)
                          for c in search.cfg.space.candidates}
        mix["predicted_bytes"] = search.plan_bytes(choice)
        m0 = allocated(self.device)
        t = time.perf_counter()
        search.cache.assemble(plan)  # cold: every module built
        sync(self.device)
        mix["assemble_cold_s"] = time.perf_counter() - t
        mix["allocator_bytes_quantized_layers"] = allocated(self.device) - m0
        mix["formula_bytes_quantized_layers"] = sum(search.inv[n].nbytes(c)
                                                    for n, c in plan.items()
                                                    if not c.full_precision)
        mix["measured_bytes"] = measured_bytes(self.transformer)
        search.cache.restore()
        t = time.perf_counter()
        search.cache.assemble(plan)  # warm: what a trial pays when the cache holds its plan
        sync(self.device)
        mix["assemble_warm_s"] = time.perf_counter() - t
        mix["step_s"] = self.latency()
        self.plan = plan
        self.out["mixed"] = mix
        self._row("mixed (solver @ hqq4 bytes)",
                  {**mix, "allocator_bytes": mix["allocator_bytes_quantized_layers"],
                   "formula_bytes": mix["formula_bytes_quantized_layers"]}, mix["assemble_cold_s"])
        self.save()

    def one_trial(self) -> None:
        """Phase 4: one trial as run_search runs it (plan in the cache), vs pure generation;
        twice, since the first trial of a process also compiles kernels for the new shapes."""
        from autoquant.scoring.clip import _open_clip

        search, cache = self.search, self.search.cache
        cache.restore()
        search.cfg.clip = _open_clip("ViT-B-32", "").to(self.device)  # the metric's cost only
        t = time.perf_counter()
        search._inputs()
        sync(self.device)
        trial: dict = {"references_s": time.perf_counter() - t, "images": len(self.settings.pairs()),
                       "steps": self.args.steps}
        for which in ("first", "steady"):
            try:
                cache.restore()
                t = time.perf_counter()
                cache.assemble(self.plan)
                t_asm = time.perf_counter() - t
                t1 = time.perf_counter()
                search.replay.error()
                sync(self.device)
                t_proxy = time.perf_counter() - t1
                _, gen_s, met_s = search.evaluator.score()
                total = time.perf_counter() - t
                trial[which] = dict(assemble_s=t_asm, proxy_s=t_proxy, generation_s=gen_s,
                                    metrics_s=met_s, total_s=total,
                                    trial_over_generation=total / gen_s,
                                    cold_cache_trial_over_generation=(
                                        total - t_asm + self.out["mixed"]["assemble_cold_s"]) / gen_s)
            except autoquant.AutoquantError as e:  # non-finite images from random weights
                trial["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                break
        cache.restore()
        self.out["trial"] = trial

    def sensitivity_extrapolated(self) -> None:
        """Phase 5: the sensitivity pass, from timed probes."""
        groups, cache = self.search.groups, self.search.cache
        probe_times = []
        for g in groups.groups[:: max(1, len(groups.groups) // 4)][:4]:
            cfg = next(c for c in g.options if not c.full_precision)
            cache.assemble({l.name: cfg for l in g.layers})
            t = time.perf_counter()
            self.replay.error()
            sync(self.device)
            probe_times.append(time.perf_counter() - t)
            cache.restore()
        probe = statistics.median(probe_times)
        probes = {}
        for name in dict.fromkeys([self.args.space, "flux"]):
            other = autoquant.Search(autoquant.SearchConfig(
                model="flux", budget="100%", space=autoquant.load_space(name),
                settings=self.settings, clip=None, progress=False, cache_bytes=1), self.pipe)
            probes[name] = sum(sum(not c.full_precision for c in g.options)
                               for g in other.groups.groups)
        self.out["sensitivity_extrapolated"] = {
            "probe_s": probe, "probe_batch": self.batch, "probes": probes,
            "pass_s": {k: n * probe for k, n in probes.items()}}
        self.save()

    def report(self) -> None:
        out, mix = self.out, self.out["mixed"]
        print(table(self.rows, HEADER))
        c = out["cache"]
        print(f"\ncache for space {self.args.space!r}: {c['layer_configs']} (layer, config) pairs "
              f"in {c['build_s']:.1f} s, {human_bytes(c['bytes'])} in all (bf16 model "
              f"{human_bytes(self.search.fp_bytes)})")
        print(f"mixed plan: solver {mix['solve_s'] * 1e3:.0f} ms, assemble cold "
              f"{mix['assemble_cold_s']:.1f} s / warm {mix['assemble_warm_s'] * 1e3:.1f} ms; "
              f"configs {mix['configs']}")
        built = [v for v in out["configs"].values() if "error" not in v]
        pairs = ([(v["measured_bytes"], v["predicted_bytes"]) for v in built]
                 + [(mix["measured_bytes"], mix["predicted_bytes"])])
        if self.device.type == "cuda":  # the allocator's count exists there only
            pairs += [(mix["allocator_bytes_quantized_layers"],
                       mix["formula_bytes_quantized_layers"])]
            pairs += [(v["allocator_bytes"], v["formula_bytes"]) for v in built]
        worst = max(abs(a / b - 1) for a, b in pairs)
        out["target"] = {"bytes_within_2pct": worst <= 0.02, "worst_bytes_error": worst}
        print(f"target: predicted vs measured GPU bytes within 2% -> worst {worst:.3%}: "
              f"{'met' if worst <= 0.02 else 'NOT met'}")
        trial = out["trial"]
        if "error" in trial:
            print(f"trial: {trial['error']}")
        for which in ("first", "steady"):
            if which in trial:
                tr = trial[which]
                ok = "met" if tr["trial_over_generation"] <= 1.2 else "NOT met"
                print(f"{which} trial ({trial['images']} images x {trial['steps']} steps at "
                      f"{self.args.size} px): {tr['total_s']:.2f} s = assemble "
                      f"{tr['assemble_s']:.3f} + proxy {tr['proxy_s']:.2f} + generation "
                      f"{tr['generation_s']:.2f} + metrics {tr['metrics_s']:.3f}; trial / "
                      f"generation {tr['trial_over_generation']:.3f} (target <= 1.2: {ok}); if "
                      f"the plan had to be built (cold cache) "
                      f"{tr['cold_cache_trial_over_generation']:.2f}")
        s = out["sensitivity_extrapolated"]
        print(f"sensitivity (extrapolated): probe {s['probe_s']:.2f} s at batch "
              f"{s['probe_batch']}; " + "; ".join(
                  f"space {k}: {n} probes ~ {s['pass_s'][k] / 60:.0f} min"
                  for k, n in s["probes"].items()))
        self.save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="default")
    ap.add_argument("--layers", choices=["full", "small"], default="full")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28, help="denoising steps of the trial's images")
    ap.add_argument("--images", type=int, default=2, help="images a trial generates")
    ap.add_argument("--repeats", type=int, default=5, help="timed denoiser steps per config")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--allocator", choices=["expandable", "default"], default="expandable",
                    help="CUDA caching allocator: expandable segments (what the CLI sets) or not")
    ap.add_argument("--json", default="bench/results/flux_scale_h100.json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):  # before anything is allocated; the CLI sets it by env
        torch.cuda.memory._set_allocator_settings(
            f"expandable_segments:{args.allocator == 'expandable'}")
    bench = Bench(args)
    m = bench.out["model"]
    print(f"Flux-dev architecture: {m['params'] / 1e9:.2f}B parameters, {m['linear_layers']} "
          f"Linear, {human_bytes(m['bf16_bytes'])} bf16; space {args.space}: {m['groups']} "
          f"groups", flush=True)
    bench.capture()
    bench.uniform_configs()
    bench.mixed_plan()
    bench.one_trial()
    bench.sensitivity_extrapolated()
    bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())

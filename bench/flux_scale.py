"""Scale (the Benchmarks issue, part 3): the search's machinery on the Flux-dev architecture.

    python bench/flux_scale.py [--space default] [--steps 28] [--json bench/results/flux_scale_h100.json]

FluxTransformer2DModel with Flux-dev's published config (11.9B parameters, 504 Linear layers),
randomly initialized in bf16 on the GPU, inside a FluxPipeline whose text encoders are single-layer
stand-ins with Flux's output widths (T5: 512 tokens x 4096, CLIP pooled: 768) and whose VAE has
Flux's architecture. Nothing can be downloaded, so the weights are random: memory and time are
meaningful, image quality is not and is never reported. Measured, side by side in one run:

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
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoquant  # noqa: E402
from autoquant._bytes import measured_bytes  # noqa: E402
from autoquant._format import human_bytes, table  # noqa: E402
from autoquant.allocate import solve  # noqa: E402
from autoquant.backends.none import NoneConfig  # noqa: E402
from autoquant.evaluator import Evaluator, generate_images  # noqa: E402
from autoquant.sensitivity import (NONE, Groups, LayerCache, capture_denoiser_inputs,  # noqa: E402
                                   denoiser_outputs, output_error)
from autoquant.settings import EvalSettings, prompt_set  # noqa: E402
from autoquant.space import load_space  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flux import flux_transformer  # noqa: E402

FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
FLUX_SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                      max_shift=1.15, use_dynamic_shifting=True, shift=3.0)


def build_pipeline(device: torch.device, small: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from autoquant._tiny import tiny_tokenizer

    # small: a narrow, shallow variant for checking the script on a CPU
    transformer = flux_transformer(device, **(dict(num_layers=1, num_single_layers=2,
                                                   num_attention_heads=4) if small else {}))
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=4096, d_ff=512, d_kv=64, num_layers=1,
                                 num_heads=8, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=2))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=768, intermediate_size=768,
                                        num_hidden_layers=1, num_attention_heads=12,
                                        max_position_embeddings=77, projection_dim=768,
                                        bos_token_id=0, pad_token_id=0, eos_token_id=2))
    vae = AutoencoderKL(**FLUX_VAE)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=clip.eval(), tokenizer=tiny_tokenizer(77),
                        text_encoder_2=t5.eval(), tokenizer_2=tiny_tokenizer(512),
                        transformer=transformer)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(device=device, dtype=torch.bfloat16)
    return pipe


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


@torch.no_grad()
def step_latency(module, call, device, repeats: int) -> float:
    args, kwargs = call
    for _ in range(2):
        module(*args, **kwargs)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        module(*args, **kwargs)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_of_batch(call, batch: int):
    def cut(t):
        return t[:1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t

    args, kwargs = call
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


@torch.no_grad()
def local_error(original, module, x) -> float:
    """Relative output error of one layer on random activations (the stand-in proxy)."""
    ref = original(x).float()
    out = module(x).float()
    return ((out - ref).pow(2).sum() / ref.pow(2).sum()).item()


def ratio(measured: int, predicted: int) -> str:
    return f"{measured / predicted - 1:+.2%}" if measured else "-"


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
    device = torch.device(args.device)
    if device.type == "cuda":  # before anything is allocated; the CLI sets it by environment
        torch.cuda.memory._set_allocator_settings(
            f"expandable_segments:{args.allocator == 'expandable'}")
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or platform.machine(),
                 "torch": torch.__version__, "args": vars(args)}
    import diffusers, hqq, bitsandbytes, torchao  # noqa: E401
    out["versions"] = {"diffusers": diffusers.__version__, "hqq": hqq.__version__,
                       "bitsandbytes": bitsandbytes.__version__, "torchao": torchao.__version__,
                       "autoquant": autoquant.__version__}

    def save():
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    t0 = time.perf_counter()
    pipe = build_pipeline(device, args.layers == "small")
    sync(device)
    transformer = pipe.transformer
    inv = autoquant.inventory(pipe)
    space = load_space(args.space)
    groups = Groups.build(inv, space, ["transformer"])
    layers = [l for l in inv if l.component == "transformer"]
    fp_bytes = measured_bytes(transformer)
    linear_fp = sum(l.bytes for l in layers)
    other = fp_bytes - linear_fp
    weight_params = sum(l.weight_params for l in layers)
    out["model"] = {"params": sum(p.numel() for p in transformer.parameters()),
                    "linear_layers": len(layers), "groups": len(groups.groups),
                    "fixed_layers": len(groups.fixed), "bf16_bytes": fp_bytes,
                    "build_s": time.perf_counter() - t0}
    print(f"Flux-dev architecture: {out['model']['params'] / 1e9:.2f}B parameters, "
          f"{len(layers)} Linear, {human_bytes(fp_bytes)} bf16; space {args.space}: "
          f"{len(groups.groups)} groups", flush=True)

    # the search's settings: two prompts at 1024 px; the proxy inputs captured as a search does
    prompts = prompt_set("flux", "search")[:args.images]
    settings = EvalSettings(prompts=prompts, seeds=(0,), steps=args.steps, guidance=3.5,
                            height=args.size, width=args.size, batch_size=args.images,
                            extra=(("max_sequence_length", 512),))
    pairs = settings.pairs()
    t = time.perf_counter()
    inputs = capture_denoiser_inputs(pipe, "transformer",
                                     lambda: generate_images(pipe, settings, pairs))
    sync(device)
    out["capture_generation_s"] = time.perf_counter() - t
    ref_outputs = denoiser_outputs(pipe, "transformer", inputs)
    batch = inputs[0][1]["hidden_states"].shape[0] if len(inputs) == 1 else 1
    step_call = first_of_batch(inputs[0], batch)
    tokens = step_call[1]["hidden_states"].shape[1]
    out["step_tokens"] = {"image": tokens, "text": step_call[1]["encoder_hidden_states"].shape[1]}
    rows = []
    lat_bf16 = step_latency(transformer, step_call, device, args.repeats)
    out["latency"] = {"bf16": {"step_s": lat_bf16, "bytes": fp_bytes}}
    rows.append(["bf16", human_bytes(fp_bytes), "-", "-", "-", f"{lat_bf16 * 1e3:.1f}", "1.00"])
    print(f"bf16 step ({tokens} image tokens): {lat_bf16 * 1e3:.1f} ms", flush=True)
    save()

    # 1 + 2: the cache, config by config (one config's modules at a time on the GPU: the whole
    # cache is larger than the card), and each uniform plan's step latency
    cache = LayerCache(pipe, inv, device)
    xs: dict[int, torch.Tensor] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    options = [c for c in space.candidates if not isinstance(c, NoneConfig)]
    error: dict[tuple[str, object], float] = {}
    out["configs"] = {}
    for cfg in options:
        cache.clear()
        m0 = allocated(device)
        names = [l.name for g in groups.groups if cfg in g.options for l in g.layers]
        record: dict = {"layers": len(names)}
        try:
            t = time.perf_counter()
            for name in names:
                cache.module(name, cfg)
            sync(device)
            record["build_s"] = time.perf_counter() - t
            record["formula_bytes"] = sum(inv[n].nbytes(cfg, device) for n in names)
            record["module_bytes"] = sum(measured_bytes(cache.module(n, cfg)) for n in names)
            record["allocator_bytes"] = allocated(device) - m0
            t = time.perf_counter()
            for name in names:
                layer = inv[name]
                if layer.in_features not in xs:
                    xs[layer.in_features] = torch.randn(256, layer.in_features, device=device,
                                                        dtype=torch.bfloat16, generator=gen)
                error[(name, cfg)] = local_error(cache.originals[name], cache.module(name, cfg),
                                                 xs[layer.in_features])
            record["local_error_s"] = time.perf_counter() - t
            plan = {l.name: cfg if l.name in names else NONE for l in layers}
            t = time.perf_counter()
            cache.assemble(plan)
            sync(device)
            record["assemble_s"] = time.perf_counter() - t
            predicted = other + record["formula_bytes"] + sum(l.bytes for l in layers
                                                              if l.name not in names)
            record["predicted_bytes"] = predicted
            record["measured_bytes"] = measured_bytes(transformer)
            record["step_s"] = step_latency(transformer, step_call, device, args.repeats)
            cache.restore()
        except Exception as e:  # recorded; the other configs go on
            record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            cache.restore()
        out["configs"][cfg.label] = record
        if "error" in record:
            print(f"{cfg.label}: {record['error']}", flush=True)
            rows.append([cfg.label, "-", "-", "-", "-", "failed", "-"])
        else:
            rows.append([cfg.label, human_bytes(record["measured_bytes"]),
                         f"{record['build_s']:.1f}",
                         ratio(record["allocator_bytes"], record["formula_bytes"]),
                         f"{record['measured_bytes'] / record['predicted_bytes'] - 1:+.2%}",
                         f"{record['step_s'] * 1e3:.1f}", f"{record['step_s'] / lat_bf16:.2f}"])
            print(rows[-1], flush=True)
        save()
    cache.clear()
    built = {k: v for k, v in out["configs"].items() if "error" not in v}
    out["cache"] = {"build_s": sum(v["build_s"] for v in built.values()),
                    "bytes": sum(v["formula_bytes"] for v in built.values()),
                    "configs": len(built), "layer_configs": sum(v["layers"] for v in built.values())}

    # 3: one mixed plan at uniform hqq4's bytes, from the local error table
    usable = [[k for k, c in enumerate(g.options) if isinstance(c, NoneConfig)
               or all((l.name, c) in error for l in g.layers)] for g in groups.groups]
    table_err = [[sum(error[(l.name, c)] for l in g.layers) if not isinstance(c, NoneConfig)
                  else 0.0 for c in g.options] for g in groups.groups]
    opt_bytes = [[g.nbytes(c, device) for c in g.options] for g in groups.groups]
    for g, ok in enumerate(usable):  # a config that failed to build is priced out
        for k in range(len(opt_bytes[g])):
            if k not in ok:
                opt_bytes[g][k] = 10**15
    opt_fp = [[g.weight_params if isinstance(c, NoneConfig) else 0 for c in g.options]
              for g in groups.groups]
    fixed_bytes = other + sum(l.bytes for l in groups.fixed)
    fixed_fp = sum(l.weight_params for l in groups.fixed)
    hqq4 = next(v for k, v in out["configs"].items() if k.startswith("hqq4"))
    budget = hqq4["predicted_bytes"]
    t = time.perf_counter()
    choice = solve(table_err, opt_bytes, opt_fp, budget - fixed_bytes,
                   space.fp_cap * weight_params - fixed_fp)
    solve_s = time.perf_counter() - t
    plan = groups.plan(choice)
    mix: dict = {"budget_bytes": budget, "solve_s": solve_s,
                 "configs": {c.label: sum(1 for v in plan.values() if v == c)
                             for c in space.candidates}}
    mix["predicted_bytes"] = fixed_bytes + sum(opt_bytes[g][k] for g, k in enumerate(choice))
    m0 = allocated(device)
    t = time.perf_counter()
    cache.assemble(plan)  # cold: every module built
    sync(device)
    mix["assemble_cold_s"] = time.perf_counter() - t
    quant_alloc = allocated(device) - m0
    quant_formula = sum(inv[n].nbytes(c, device) for n, c in plan.items()
                        if not isinstance(c, NoneConfig))
    mix["allocator_bytes_quantized_layers"] = quant_alloc
    mix["formula_bytes_quantized_layers"] = quant_formula
    mix["measured_bytes"] = measured_bytes(transformer)
    cache.restore()
    t = time.perf_counter()
    cache.assemble(plan)  # warm: what a trial pays when the cache holds its plan
    sync(device)
    mix["assemble_warm_s"] = time.perf_counter() - t
    mix["step_s"] = step_latency(transformer, step_call, device, args.repeats)
    out["mixed"] = mix
    rows.append(["mixed (solver @ hqq4 bytes)", human_bytes(mix["measured_bytes"]),
                 f"{mix['assemble_cold_s']:.1f}",
                 ratio(quant_alloc, quant_formula),
                 f"{mix['measured_bytes'] / mix['predicted_bytes'] - 1:+.2%}",
                 f"{mix['step_s'] * 1e3:.1f}", f"{mix['step_s'] / lat_bf16:.2f}"])
    print(rows[-1], flush=True)
    save()

    # 4: one trial as run_search runs it (plan in the cache), vs pure generation
    cache.restore()
    from autoquant.clip import _open_clip

    clip = _open_clip("ViT-B-32", "").to(device)  # random weights: the metric's cost, not its value
    t = time.perf_counter()
    ev = Evaluator(pipe, settings, clip=clip, components=["transformer"], progress=False)
    sync(device)
    ref_s = time.perf_counter() - t
    trial: dict = {"references_s": ref_s, "images": len(pairs), "steps": args.steps}
    # twice: the first trial of a process also compiles kernels for the new shapes (Triton,
    # cuBLAS heuristics); the second is what every later trial costs
    for which in ("first", "steady"):
        try:
            cache.restore()
            t = time.perf_counter()
            cache.assemble(plan)
            t_asm = time.perf_counter() - t
            t1 = time.perf_counter()
            output_error(pipe, "transformer", inputs, ref_outputs)
            sync(device)
            t_proxy = time.perf_counter() - t1
            _, gen_s, met_s = ev.score()
            total = time.perf_counter() - t
            trial[which] = dict(assemble_s=t_asm, proxy_s=t_proxy, generation_s=gen_s,
                                metrics_s=met_s, total_s=total,
                                trial_over_generation=total / gen_s,
                                cold_cache_trial_over_generation=(
                                    total - t_asm + mix["assemble_cold_s"]) / gen_s)
        except Exception as e:  # e.g. non-finite images from random weights: recorded
            trial["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            break
    cache.restore()
    out["trial"] = trial

    # 5: the sensitivity pass, extrapolated from timed probes
    probe_times = []
    sample = groups.groups[:: max(1, len(groups.groups) // 4)][:4]
    for g in sample:
        cfg = next(c for c in g.options if not isinstance(c, NoneConfig))
        cache.assemble({l.name: cfg for l in g.layers})
        t = time.perf_counter()
        output_error(pipe, "transformer", inputs, ref_outputs)
        sync(device)
        probe_times.append(time.perf_counter() - t)
        cache.restore()
    probe = statistics.median(probe_times)
    probes = {name: sum(len([c for c in g.options if not isinstance(c, NoneConfig)])
                        for g in Groups.build(inv, load_space(name), ["transformer"]).groups)
              for name in dict.fromkeys([args.space, "flux"])}
    out["sensitivity_extrapolated"] = {
        "probe_s": probe, "probe_batch": batch, "probes": probes,
        "pass_s": {k: n * probe for k, n in probes.items()}}
    save()

    print(table(rows, ["plan", "GPU bytes", "build s", "allocator vs formula",
                       "measured vs predicted", "1024px step ms", "vs bf16"]))
    c = out["cache"]
    print(f"\ncache for space {args.space!r}: {c['layer_configs']} (layer, config) pairs in "
          f"{c['build_s']:.1f} s, {human_bytes(c['bytes'])} in all (bf16 model "
          f"{human_bytes(fp_bytes)})")
    print(f"mixed plan: solver {mix['solve_s'] * 1e3:.0f} ms, assemble cold "
          f"{mix['assemble_cold_s']:.1f} s / warm {mix['assemble_warm_s'] * 1e3:.1f} ms; "
          f"configs {mix['configs']}")
    pairs_ = ([(v["measured_bytes"], v["predicted_bytes"]) for v in built.values()]
              + [(mix["measured_bytes"], mix["predicted_bytes"])])
    if device.type == "cuda":  # the allocator's count exists there only
        pairs_ += [(quant_alloc, quant_formula)] + [(v["allocator_bytes"], v["formula_bytes"])
                                                    for v in built.values()]
    worst = max(abs(a / b - 1) for a, b in pairs_)
    out["target"] = {"bytes_within_2pct": worst <= 0.02, "worst_bytes_error": worst}
    print(f"target: predicted vs measured GPU bytes within 2% -> worst {worst:.3%}: "
          f"{'met' if worst <= 0.02 else 'NOT met'}")
    if "error" in trial:
        print(f"trial: {trial['error']}")
    for which in ("first", "steady"):
        if which not in trial:
            continue
        tr = trial[which]
        print(f"{which} trial ({trial['images']} images x {trial['steps']} steps at {args.size} "
              f"px): {tr['total_s']:.2f} s = assemble {tr['assemble_s']:.3f} + proxy "
              f"{tr['proxy_s']:.2f} + generation {tr['generation_s']:.2f} + metrics "
              f"{tr['metrics_s']:.3f}; trial / generation {tr['trial_over_generation']:.3f} "
              f"(target <= 1.2: {'met' if tr['trial_over_generation'] <= 1.2 else 'NOT met'});"
              f" if the plan had to be built (cold cache) "
              f"{tr['cold_cache_trial_over_generation']:.2f}")
    s = out["sensitivity_extrapolated"]
    print(f"sensitivity (extrapolated): probe {probe:.2f} s at batch {batch}; "
          + "; ".join(f"space {k}: {n} probes ~ {s['pass_s'][k] / 60:.0f} min"
                      for k, n in probes.items()))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

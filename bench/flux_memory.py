"""A Flux-dev search inside a GPU memory cap (issue 16): the Flux-dev-architecture pipeline with
full-size text encoders (T5-XXL v1.1 and CLIP-L, random weights from their published configs),
1024 px, budget 30%, anchored sensitivity. Each mode runs in its own process (its own reference
cache, so every phase is really done):

    python bench/flux_memory.py --mode uncapped --json bench/results/flux_memory_uncapped_h100.json
    python bench/flux_memory.py --mode capped --gpu-memory 24GiB \\
        --compare bench/results/flux_memory_uncapped_h100.json \\
        --json bench/results/flux_memory_24gib_h100.json
    python bench/flux_memory.py --mode capped --gpu-memory 16GiB \\
        --table-from bench/results/flux_memory_uncapped_h100.json \\
        --json bench/results/flux_memory_16gib_h100.json
    python bench/flux_memory.py --mode offload --json bench/results/flux_offload_h200.json

``capped`` enforces the cap with ``torch.cuda.set_per_process_memory_fraction`` (what
``--gpu-memory`` does) and reports ``max_memory_allocated`` and the reserved peak. ``--compare``:
the uncapped run's table and seed plans -- are the seeds the same given the same table?
``offload``: one full-precision denoiser step with the weights on the CPU, streamed by
autoquant's layer streaming vs diffusers' group offloading (block and leaf level, CUDA-stream
prefetch), and resident.

The bench space ties every layer of a block (57 groups + the protected ones) so that a run fits
the device time of one session; the flux space's 323 groups cost the same per group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI does

import torch  # noqa: E402

from _common import write_json  # noqa: E402
from _flux import block_space, build_pipeline, flux_transformer  # noqa: E402

SPACE = block_space([
    "{method: hqq, bits: 3, group_size: 64}",
    "{method: hqq, bits: 4, group_size: 64}",
    "{method: bnb, bits: 4, type: nf4}",
    "{method: torchao, type: int8}",
    "{method: none}",
], "[bytes, psnr, clip_fidelity]",
    "bench space - Flux with every layer of a block tied (the memory bench)")


def _seeds(search) -> list[dict]:
    return [{"source": s, "bytes": search.plan_bytes(c), "configs": search.groups.labels(c)}
            for s, c in search.seeds()]


def run_search_mode(args) -> dict:
    from autoquant.scoring.clip import _open_clip
    from autoquant.search import Search, SearchConfig, run_search
    from autoquant.generation.settings import EvalSettings, prompt_set
    from autoquant.search.space import load_space

    os.environ["AUTOQUANT_CACHE"] = tempfile.mkdtemp(prefix="aq-cache-")  # every phase done
    t0 = time.perf_counter()
    pipe = build_pipeline(torch.device("cpu"), args.layers == "small", encoders="full")
    build_s = time.perf_counter() - t0
    space_file = Path(tempfile.mkdtemp()) / "flux-blocks.yaml"
    space_file.write_text(SPACE)
    settings = EvalSettings(prompts=prompt_set("flux", "search")[:2], seeds=(0,),
                            steps=args.steps, guidance=3.5, height=args.size, width=args.size,
                            batch_size=2, extra=(("max_sequence_length", 512),))
    clip = _open_clip("ViT-B-32", "").to("cuda")  # random weights: the metric's cost only
    cap = args.gpu_memory if args.mode == "capped" else None
    t0 = time.perf_counter()
    search = Search(SearchConfig(model="flux-dev-architecture-random", budget=args.budget,
                                 space=load_space(str(space_file)), trials=args.trials,
                                 out=Path(tempfile.mkdtemp(prefix="flux-memory-")),
                                 settings=settings, clip=clip, progress=True,
                                 sensitivity="anchored", device="cuda", gpu_memory=cap), pipe)
    placed_s = time.perf_counter() - t0
    print(f"placed in {placed_s:.1f} s: {search.memory.placement}", flush=True)
    reused = None
    if args.table_from:
        reused = json.loads(Path(args.table_from).read_text())
        search.use_sensitivity(reused["table"], reused["sensitivity_mode"])
    t0 = time.perf_counter()
    search.prepare()
    prepare_s = time.perf_counter() - t0
    print(f"prepared in {prepare_s:.1f} s: {search.timing}", flush=True)
    t0 = time.perf_counter()
    report = run_search(search)
    trials_s = time.perf_counter() - t0
    out = {"mode": args.mode, "gpu_memory": cap, "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "args": vars(args), "pipeline_build_s": build_s,
           "placement_s": placed_s, "prepare_s": prepare_s, "trials_s": trials_s,
           "phases": {k: v for k, v in search.timing.items() if k.endswith("_s")},
           "sensitivity_mode": search.sensitivity_mode,
           "sensitivity_reused_from": args.table_from, "groups": len(search.groups.groups),
           "budget_bytes": search.budget_bytes, "fp_bytes": search.fp_bytes,
           "memory": report.get("memory"), "cache": report["cache"],
           "trials": report["trials"], "trial_timing": report["trial_timing"],
           "trials_detail": [{k: t.get(k) for k in ("trial", "state", "source", "values",
                                                    "pruned_at")}
                             for t in report["trials_detail"]],
           "best": report.get("best"), "table": search.error, "seeds": _seeds(search)}
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        rel = max((abs(a - b) / max(abs(b), 1e-12) for ra, rb in zip(search.error,
                                                                        other["table"])
                   for a, b in zip(ra, rb)), default=0.0)
        own_seeds_same = out["seeds"] == other["seeds"]
        search.use_sensitivity(other["table"], other["sensitivity_mode"])
        out["compare"] = {"with": args.compare, "table_max_relative_difference": rel,
                          "seeds_same_with_own_tables": own_seeds_same,
                          "seeds_same_with_the_same_table": _seeds(search) == other["seeds"],
                          "seeds": len(other["seeds"])}
    return out


def _step_inputs(size: int, device):
    tokens = (size // 16) ** 2
    g = torch.Generator().manual_seed(0)
    bf = dict(dtype=torch.bfloat16)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g, **bf).to(device),
                encoder_hidden_states=torch.randn(1, 512, 4096, generator=g, **bf).to(device),
                pooled_projections=torch.randn(1, 768, generator=g, **bf).to(device),
                timestep=torch.tensor([0.5], **bf).to(device),
                img_ids=torch.zeros(tokens, 3, **bf).to(device),
                txt_ids=torch.zeros(512, 3, **bf).to(device),
                guidance=torch.tensor([3.5], **bf).to(device), return_dict=False)


def run_offload_mode(args) -> dict:
    """One full-precision step, weights from the CPU: autoquant's layer streaming vs diffusers'
    group offloading; resident for scale."""
    from diffusers.hooks import apply_group_offloading

    from autoquant.runtime.streaming import LayerStreamer
    from autoquant.runtime.latency import time_call

    device = torch.device("cuda")
    small = dict(num_layers=1, num_single_layers=2, num_attention_heads=4) \
        if args.layers == "small" else {}
    kwargs = _step_inputs(args.size, device)
    rows = {}

    def measure(name, model, extra=None):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            s = time_call(lambda: model(**kwargs), device, repeats=args.repeats, warmup=1)
        rows[name] = {"step_s": s, "gpu_bytes_before": base,
                      "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                      **(extra or {})}
        print(name, rows[name], flush=True)

    model = flux_transformer("cpu", **small)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    others = set(linears)
    streamer = LayerStreamer(device, depth=args.depth)
    streamer.attach(linears)
    for sub in model.modules():
        if sub not in others:
            sub._apply(lambda t: t.to(device), recurse=False)
    measure(f"autoquant layer streaming (depth {args.depth})", model,
            {"window_bytes": streamer.planned_window_bytes})
    streamer.detach(device=device)
    measure("resident (whole model on the GPU)", model)
    del model, streamer, linears, others
    torch.cuda.empty_cache()
    for kind in ("block_level", "leaf_level"):
        model = flux_transformer("cpu", **small)
        extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        t0 = time.perf_counter()
        apply_group_offloading(model, onload_device=device, offload_device="cpu",
                               offload_type=kind, use_stream=True, **extra)
        measure(f"diffusers group offloading {kind}, use_stream", model,
                {"setup_s": time.perf_counter() - t0})
        del model
        torch.cuda.empty_cache()
    return {"mode": "offload", "device": torch.cuda.get_device_name(), "size": args.size,
            "tokens": (args.size // 16) ** 2, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["uncapped", "capped", "offload"], required=True)
    ap.add_argument("--gpu-memory", default="24GiB")
    ap.add_argument("--budget", default="30%")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--layers", choices=["full", "small"], default="full")
    ap.add_argument("--compare", default=None, help="the uncapped run's JSON")
    ap.add_argument("--table-from", default=None, help="reuse this run's sensitivity table")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    if args.mode == "offload":
        out = run_offload_mode(args)
    else:
        try:
            out = run_search_mode(args)
        except Exception as e:  # a refusal or an OOM is a result too
            import traceback

            out = {"mode": args.mode, "gpu_memory": args.gpu_memory,
                   "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc().splitlines()[-14:]}
            print("\n".join(out["traceback"]), flush=True)
            print(out["error"], flush=True)
            if torch.cuda.is_available():
                out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    write_json(args.json, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("table", "trial_timing",
                                                                "trials_detail", "seeds")},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plans faster than bf16 (the fp8 / speed issue): one denoiser step of the Flux-dev
architecture (random bf16 weights, 1024 px: 4,096 image + 512 text tokens, batch 1) per plan
and ``torch.compile`` mode, in one process so that every ratio shares a GPU.

    python bench/flux_speed.py [--plans bf16,fp8_row,...] [--modes default,reduce-overhead]
                               [--attention native,_native_cudnn] [--profile]
                               [--json bench/results/flux_speed_h100.json]

``--attention``: diffusers' attention backends to time each plan under
(``model.set_attention_backend``; ``native`` is SDPA's own choice, FlashAttention-2 on Hopper;
``_native_cudnn`` pins SDPA's cuDNN kernel; ``sage1``: SageAttention 1 from PyPI, Triton, through
diffusers' Triton sage slot). ``--profile``: one compiled step per row under
``torch.profiler``, its GPU time split into GEMMs, attention, fused (Triton) kernels and the rest.

Plans (each Linear of the transformer that takes the config): ``bf16``; ``fp8_row``
(torchao fp8_dynamic: activations per token, weights per channel); ``fp8_tensor``
(fp8_dynamic_tensor); ``int8_dyn``, ``int8_wo``; ``fp8_50`` (fp8_row with the three layers
that tip it over 50% of bf16's bytes in nf4, the earlier run's fastest 50% plan); ``fp8_int4``,
``fp8_int4_plain`` (int4 weights x fp8 activations, mslk's kernels; x_embedder in nf4);
``hqq4``, ``nf4``.
Compiled block by block, as ``autoquant apply --compile`` does.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402
from _flux import flux_transformer  # noqa: E402

import autoquant  # noqa: E402
from autoquant.backends.measure import measured_bytes  # noqa: E402
from autoquant.runtime.latency import compiled  # noqa: E402

NF4 = {"method": "bnb", "bits": 4, "type": "nf4"}
PLANS = {
    "bf16": None,
    "fp8_row": {"default": {"method": "torchao", "type": "fp8_dynamic"}},
    "fp8_tensor": {"default": {"method": "torchao", "type": "fp8_dynamic_tensor"}},
    "fp8_50": {"default": {"method": "torchao", "type": "fp8_dynamic"},
               "layers": {"norm_out.linear": NF4,
                          "re:time_text_embed\\.(timestep|guidance)_embedder\\.linear_2": NF4}},
    "fp8_tensor_50": {"default": {"method": "torchao", "type": "fp8_dynamic_tensor"},
                      "layers": {"norm_out.linear": NF4,
                                 "re:time_text_embed\\.(timestep|guidance)_embedder\\.linear_2":
                                 NF4}},
    # int4 weights x fp8 activations; x_embedder (64 inputs, under the group of 128) in nf4
    "fp8_int4": {"default": {"method": "torchao", "type": "fp8_int4"},
                 "layers": {"x_embedder": NF4}},
    "fp8_int4_plain": {"default": {"method": "torchao", "type": "fp8_int4_plain"},
                       "layers": {"x_embedder": NF4}},
    "int8_dyn": {"default": {"method": "torchao", "type": "int8_dynamic"}},
    "int8_wo": {"default": {"method": "torchao", "type": "int8"}},
    "hqq4": {"default": {"method": "hqq", "bits": 4, "group_size": 64}},
    "nf4": {"default": NF4},
}


def inputs(device):
    gen = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.bfloat16)  # noqa
    return dict(hidden_states=r(1, 4096, 64), encoder_hidden_states=r(1, 512, 4096),
                pooled_projections=r(1, 768), timestep=torch.full((1,), 0.5, device=device),
                guidance=torch.full((1,), 3.5, device=device),
                img_ids=torch.zeros(4096, 3, device=device),
                txt_ids=torch.zeros(512, 3, device=device), return_dict=False)


def timed(fn, kw, n=10) -> float:
    for _ in range(3):
        fn(**kw)
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(**kw)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2] / 1e3


#: kernel-name fragments -> the part of a step they are (first match wins)
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention", "_attn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "scaled_mm", "f8i4", "sm90_", "cublas",
              "matmul")),
    ("fused (triton)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, parts in KERNEL_KINDS:
        if any(p in low for p in parts):
            return kind
    return "other"


def profiled(fn, kw) -> dict:
    """One step's GPU time by kind of kernel (ms) and the ten costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn(**kw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(**kw)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = ev.time_range.elapsed_us() / 1e3
        kinds[kernel_kind(ev.name)] = kinds.get(kernel_kind(ev.name), 0.0) + ms
        per_kernel[ev.name] = per_kernel.get(ev.name, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:10]
    return {"by_kind_ms": {k: round(v, 3) for k, v in sorted(kinds.items())},
            "total_ms": round(sum(kinds.values()), 3),
            "top_kernels_ms": [[n[:120], round(v, 3)] for n, v in top]}


#: the SageAttention 1 stand-in's slot in diffusers' registry (diffusers' own sage backends
#: want the CUDA build, sageattention >= 2.1.1, which PyPI does not have)
SAGE1_SLOT = "_sage_qk_int8_pv_fp16_triton"


def _register_sage1() -> None:
    """Bench only: diffusers' Triton sage slot runs the PyPI ``sageattention`` 1.0.6 (Triton;
    Q, K int8 per block, P and V fp16), whose ``sageattn`` takes the same arguments."""
    import diffusers.models.attention_dispatch as dispatch
    from sageattention import sageattn

    name = dispatch.AttentionBackendName(SAGE1_SLOT)

    def sage1(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, return_lse=False, _parallel_config=None):
        if attn_mask is not None or return_lse:
            raise ValueError("sage1: no mask, no lse")
        return sageattn(query, key, value, tensor_layout="NHD", is_causal=is_causal,
                        sm_scale=scale)

    dispatch._AttentionBackendRegistry._backends[name] = sage1
    dispatch._AttentionBackendRegistry._constraints[name] = []
    dispatch._CAN_USE_SAGE_ATTN = True


def set_attention(model, backend: str) -> None:
    if backend == "sage1":
        _register_sage1()
        backend = SAGE1_SLOT
    model.set_attention_backend(backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--modes", default="eager,default,reduce-overhead")
    ap.add_argument("--attention", default="native",
                    help="diffusers attention backends, comma-separated (native, _native_cudnn, ...)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default="bench/results/flux_speed_h100.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    kw = inputs(device)
    out = {"environment": environment(device), "rows": []}
    model = flux_transformer(device)
    fp_bytes = measured_bytes(model)
    base = None
    for name in args.plans.split(","):
        spec = PLANS[name]
        t0 = time.perf_counter()
        if spec is not None:
            try:
                autoquant.apply_recipe(model, autoquant.Recipe.from_dict(
                    {"format": "autoquant-recipe/1", **spec}), device=device, progress=False,
                    keep_originals=True)
            except Exception as e:  # noqa: BLE001 -- a plan this GPU cannot run: recorded
                print(f"{name}: skipped ({type(e).__name__}: {str(e)[:200]})", flush=True)
                out["rows"].append({"plan": name, "skipped": f"{type(e).__name__}: {e}"[:300]})
                continue
        build_s = time.perf_counter() - t0
        for attention in args.attention.split(","):
            set_attention(model, attention)
            label = name if attention == "native" else f"{name}+{attention.strip('_')}"
            row = {"plan": label, "attention": attention, "bytes": measured_bytes(model),
                   "vs_bf16_bytes": measured_bytes(model) / fp_bytes, "build_s": build_s}
            with torch.no_grad():
                for mode in args.modes.split(","):
                    try:
                        if mode == "eager":
                            row["eager_s"] = timed(model, kw)
                        else:
                            torch._dynamo.reset()
                            with compiled(model, mode=mode) as fn:
                                t0 = time.perf_counter()
                                fn(**kw)
                                torch.cuda.synchronize()
                                row[f"{mode}_compile_s"] = time.perf_counter() - t0
                                row[f"{mode}_s"] = timed(fn, kw)
                                if args.profile and mode == "default":
                                    row["profile"] = profiled(fn, kw)
                    except Exception as e:  # noqa: BLE001
                        row[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{label} {mode}: " + (f"{row[f'{mode}_s'] * 1e3:.1f} ms" if
                          f"{mode}_s" in row else row.get(f"{mode}_error", "")[:200]),
                          flush=True)
                    if "profile" in row and mode == "default":
                        print(f"  {label} profile: {row['profile']['by_kind_ms']}", flush=True)
            if name == "bf16" and attention == "native":
                base = row
            if base is not None:
                for mode in args.modes.split(","):
                    if f"{mode}_s" in row and "default_s" in base:
                        row[f"{mode}_vs_bf16_compiled"] = row[f"{mode}_s"] / base["default_s"]
            out["rows"].append(row)
            write_json(args.json, out)
        set_attention(model, "native")
        if spec is not None:
            autoquant.revert(model)
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    print()
    for row in out["rows"]:
        if "skipped" in row:
            print(f"{row['plan']:>22}: skipped")
            continue
        cells = [f"{m} {row[m + '_s'] * 1e3:7.1f} ms" + (
            f" ({row[m + '_vs_bf16_compiled']:.2f}x)" if m + "_vs_bf16_compiled" in row else "")
            for m in args.modes.split(",") if m + "_s" in row]
        print(f"{row['plan']:>22}: {row['vs_bf16_bytes']:.3f} of bf16's bytes; "
              + "; ".join(cells))
    write_json(args.json, out)


if __name__ == "__main__":
    main()

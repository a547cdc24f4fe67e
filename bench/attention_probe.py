"""Attention kernels at Flux-dev's shape (the fp8 / speed issue): one joint attention of a
1024 px step -- batch 1, 24 heads, 4,608 tokens (4,096 image + 512 text), head dim 128, bf16 --
through each kernel the GPU machine can run, timed alone, with its TFLOP/s and its error
against float32 attention.

    python bench/attention_probe.py [--tokens 4608] [--json bench/results/attention_probe.json]

Kernels: SDPA's FlashAttention-2 (``flash``, what SDPA picks on Hopper), cuDNN's fused
attention (``cudnn``), memory-efficient (``efficient``), FlexAttention compiled (``flex``), and
SageAttention 1 (``sage1``: the PyPI ``sageattention`` 1.0.6 -- Triton, Q and K in int8 per
block, P and V in fp16) where it is installed. A step has 57 such attentions (19 double + 38
single blocks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402
from flux_speed import timed  # noqa: E402  (CUDA-event median)

BLOCKS_PER_STEP = 57


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q, k, v)


def _sage1():
    from sageattention import sageattn

    return lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)


KERNELS = {
    "flash": lambda: _sdpa(SDPBackend.FLASH_ATTENTION),
    "cudnn": lambda: _sdpa(SDPBackend.CUDNN_ATTENTION),
    "efficient": lambda: _sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "flex": _flex,
    "sage1": _sage1,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--json", default="bench/results/attention_probe.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    shape = (1, args.heads, args.tokens, args.head_dim)
    # activations with Flux-like spread: unit normal plus a few large channels
    q, k, v = (torch.randn(shape, generator=gen, device=device) for _ in range(3))
    q[..., :4] *= 8
    k[..., :4] *= 8
    ref = F.scaled_dot_product_attention(q, k, v)  # float32: the reference
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    flop = 4 * args.tokens * args.tokens * args.head_dim * args.heads
    out = {"environment": environment(device), "shape": list(shape), "rows": []}
    for name in args.kernels.split(","):
        row = {"kernel": name}
        try:
            fn = KERNELS[name]()
            with torch.no_grad():
                o = fn(q, k, v)
                row["error"] = float((o.float() - ref).norm() / ref.norm())
                row["s"] = timed(lambda: fn(q, k, v), {}, n=20)
            row["tflops"] = flop / row["s"] / 1e12
            row["per_step_ms"] = row["s"] * BLOCKS_PER_STEP * 1e3
        except Exception as e:  # noqa: BLE001 -- a kernel this GPU cannot run: recorded
            row["skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
        out["rows"].append(row)
        print(row, flush=True)
        write_json(args.json, out)
    base = next((r for r in out["rows"] if r["kernel"] == "flash" and "s" in r), None)
    print(f"\n{'kernel':>10} {'ms':>8} {'TFLOP/s':>8} {'x57 (a step)':>12} {'vs flash':>8} error")
    for r in out["rows"]:
        if "s" not in r:
            print(f"{r['kernel']:>10}: skipped ({r['skipped'][:100]})")
            continue
        if base:
            r["vs_flash"] = r["s"] / base["s"]
        print(f"{r['kernel']:>10} {r['s'] * 1e3:8.3f} {r['tflops']:8.0f} "
              f"{r['per_step_ms']:10.1f} ms {r.get('vs_flash', float('nan')):8.2f} "
              f"{r['error']:.2e}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()

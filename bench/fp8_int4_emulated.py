"""demo-flux's quality under ``torchao fp8_int4`` / ``fp8_int4_plain`` (and ``fp8_dynamic``, the
check) **emulated on the CPU**: the same quantizers' arithmetic (mslk's and torchao's, written
out in PyTorch: weights to fp8 per row, then 4-bit per group of 128 with fp8 group scales;
activations to fp8 per row) with the GEMM done in float32. Not the shipped kernels: a
prediction of what the GPU run (``bench/demo_flux_gpu.py run``) measures, for when no GPU is to
be had. ``fp8_dynamic`` is emulated the same way, to compare with its measured GPU PSNR.

    python bench/fp8_int4_emulated.py [--prompts 32] [--plans bench/results/flux_latency_fastest_h100.json]
        [--json bench/results/fp8_int4_emulated_cpu.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402
from demo_flux_gpu import _images, _pipe, fastest_recipes  # noqa: E402

import autoquant  # noqa: E402
from autoquant.backends.torchao import (FP8_INT4_GROUP as GROUP, fp8_aware_int4_codes,  # noqa: E402
                                        fp8_int4_kernel_values, fp8_rows)

def int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mslk's ``int4_row_quantize``: symmetric 4-bit per group of 128 along ``in`` (scale =
    max(|group|, 1e-6) / 8, codes round(w / scale) in [-8, 7]); float32 scales [out, groups]."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-6) / 8
    return (g / scale).round().clamp(-8, 7), scale


def fp8_int4_weight(w: torch.Tensor) -> torch.Tensor:
    """The preshuffled path (``quantize_int4_preshuffle(dtype="fp8")``): fp8 per row first, the
    fp8 values to 4 bits, each group scale cast to fp8 (the codes keep the float32 scale's
    rounding), dequantized as row_scale * code * fp8(group scale)."""
    wq, row_scale = fp8_rows(w)
    q, scale = int4_groups(wq.float())
    return (q * scale.to(torch.float8_e4m3fn).float()).reshape(w.shape) * row_scale[:, None]


def fp8_int4_weight_fp8_product(w: torch.Tensor) -> torch.Tensor:
    """The preshuffled path as a mixed-input fp8 GEMM would run it: each 4-bit code times its
    fp8 group scale rounded to e4m3 (the tensor core's operand type) before the GEMM."""
    wq, row_scale = fp8_rows(w)
    q, scale = int4_groups(wq.float())
    w8 = (q * scale.to(torch.float8_e4m3fn).float()).to(torch.float8_e4m3fn).float()
    return w8.reshape(w.shape) * row_scale[:, None]


def fp8_int4_weight_fp8_aware(w: torch.Tensor) -> torch.Tensor:
    """What the preshuffled kernel computes (code x fp8 group scale rounded to e4m3) with each
    code chosen for the value the kernel will use, as autoquant's fp8_int4 quantizer chooses
    them (:func:`autoquant.backends.torchao.fp8_aware_int4_codes`)."""
    wq, row_scale = fp8_rows(w)
    n, k = w.shape
    _, scale = int4_groups(wq.float())
    s8 = scale.reshape(n, k // GROUP).to(torch.float8_e4m3fn)
    codes = fp8_aware_int4_codes(w.float() / row_scale[:, None], s8)
    return fp8_int4_kernel_values(codes, s8) * row_scale[:, None]


def fp8_int4_plain_weight(w: torch.Tensor) -> torch.Tensor:
    """The plain path (``Int4Tensor.from_hp`` for fp8 activations): 4 bits per group straight
    from the weight, scales in the weight's dtype."""
    q, scale = int4_groups(w)
    return (q * scale.to(w.dtype).float()).reshape(w.shape)


def fp8_weight(w: torch.Tensor) -> torch.Tensor:
    wq, scale = fp8_rows(w)
    return wq.float() * scale[:, None]


WEIGHTS = {"fp8_int4": fp8_int4_weight, "fp8_int4_plain": fp8_int4_plain_weight,
           "fp8_dynamic": fp8_weight}


class Emulated(nn.Module):
    """fp8 activations per row x a dequantized weight, float32 GEMM, bf16 out (+ bias)."""

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        self.weight = nn.Parameter(WEIGHTS[kind](linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        xq, xs = fp8_rows(flat)
        y = ((xq.float() * xs[:, None]) @ self.weight.t()).to(x.dtype)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y + self.bias if self.bias is not None else y


def emulate(model: nn.Module, recipe: dict) -> int:
    """Swap in emulated layers where ``recipe`` puts a config (resolved as ``apply_recipe``
    resolves it: exact names, then ``re:``, then the default where the layer takes it)."""
    plan = autoquant.Recipe.from_dict(recipe).resolve(autoquant.inventory(model))
    for name, cfg in plan.configs.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, Emulated(getattr(owner, leaf), cfg.type))
    return len(plan.configs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embeds", default="out/demo_flux_embeds.pt")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--plans", default=None)
    ap.add_argument("--types", default="fp8_dynamic,fp8_int4,fp8_int4_plain")
    ap.add_argument("--product", choices=("float", "fp8", "fp8-aware"), default="float",
                    help="fp8_int4's code x group scale: exact (float), rounded to e4m3 (fp8), "
                         "or rounded with codes chosen for the rounded products (fp8-aware)")
    ap.add_argument("--json", default="bench/results/fp8_int4_emulated_cpu.json")
    args = ap.parse_args()
    if args.product != "float":
        WEIGHTS["fp8_int4"] = {"fp8": fp8_int4_weight_fp8_product,
                               "fp8-aware": fp8_int4_weight_fp8_aware}[args.product]
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    device, dtype = torch.device("cpu"), torch.bfloat16
    e = torch.load(args.embeds)
    e = {k: (v[: args.prompts] if k != "prompts" else v[: args.prompts]) for k, v in e.items()}
    t0 = time.perf_counter()
    reference = _images(_pipe(device, dtype), e, device, dtype)
    print(f"bf16 reference: {len(reference)} images in {time.perf_counter() - t0:.0f} s",
          flush=True)
    plans = {f"{t} (emulated)": {"format": "autoquant-recipe/1",
                                 "default": {"method": "torchao", "type": t}}
             for t in args.types.split(",") if t}
    if args.plans:
        plans.update(fastest_recipes(args.plans, "emulated"))
    rows = []
    for label, recipe in plans.items():
        pipe = _pipe(device, dtype)
        n = emulate(pipe.transformer, recipe)
        images = _images(pipe, e, device, dtype)
        mse = ((images - reference) ** 2).flatten(1).mean(1).clamp(min=1e-20)
        psnr = 10 * torch.log10(1 / mse)
        row = {"config": label, "layers": n, "recipe": recipe, "psnr": float(psnr.mean()),
               "psnr_worst": float(psnr.min()),
               "ssim": float(ssim(images, reference, data_range=1.0))}
        rows.append(row)
        print(f"{label}: {n} layers, PSNR {row['psnr']:.2f} dB (worst {row['psnr_worst']:.2f}), "
              f"SSIM {row['ssim']:.4f}", flush=True)
        write_json(args.json, {"environment": environment(device), "emulated": True,
                               "prompts": e["prompts"], "rows": rows})


if __name__ == "__main__":
    main()

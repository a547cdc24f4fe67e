"""Probe (tried, not shipped): would a calibrated quantizer help autoquant's data-free hqq layers?
Two variants, each simulated (the effective weight in place of the layer) and scored on the
held-out set; calibration inputs = each layer's inputs while the full-precision demo generates the
search prompts:

- ``activation-scaled`` (AWQ's idea): the weight is scaled per input channel by s = mean|x|^alpha,
  quantized by hqq, divided by s; alpha per layer from {0, .25, .5, .75, 1} by the output error on
  sampled inputs (alpha 0 = plain hqq). A deployment would hold s and scale x at run time.
- ``gptq``: GPTQ's column-by-column rounding with error feedback through the inverse Hessian
  (X^T X, 1% damping), min-max asymmetric grid per group of 64 -- the same storage as hqq's
  (codes + one scale and zero per group).

    python bench/calibrated_probe.py                     # uniform hqq4 + protect
    python bench/calibrated_probe.py --recipe best.yaml  # a searched plan: its hqq layers
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

import autoquant
from autoquant.backends import config_from_dict, quantize_layer
from autoquant.scoring.baseline import baseline_recipe
from autoquant.scoring.evaluator import generate_images

from _common import write_json
from _demo import demo_bench, search_settings

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def input_stats(pipe, layers: dict[str, nn.Linear]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (mean |x| per input channel, up to 2048 sampled input rows)."""
    sums = {n: [0.0, 0, [], 0.0] for n in layers}
    gen = torch.Generator().manual_seed(0)

    def hook(name):
        def f(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = sums[name]
            s[0] = s[0] + x.abs().sum(0)
            s[1] += x.shape[0]
            s[2].append(x[torch.randint(0, x.shape[0], (min(64, x.shape[0]),), generator=gen)])
            s[3] = s[3] + x.T.double() @ x.double()
        return f
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        s = search_settings()
        generate_images(pipe, s, s.pairs())
    finally:
        for h in handles:
            h.remove()
    return {n: ((v[0] / v[1]).clamp(min=1e-5), torch.cat(v[2])[:2048], (v[3] / v[1]).float())
            for n, v in sums.items()}


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, block: int = 128) -> torch.Tensor:
    """GPTQ (Frantar et al.) with an asymmetric min-max grid per group of ``group`` inputs; the
    dequantized weight."""
    w = w.clone()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += 0.01 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    top = 2 ** bits - 1
    scale = zero = None
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, err1, h1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:  # the group's grid from its (error-updated) weights
                g = w1[:, i:i + group] if i + group <= i2 - i1 else w[:, i1 + i:i1 + i + group]
                lo, hi = g.min(1).values.clamp(max=0), g.max(1).values.clamp(min=0)
                scale = ((hi - lo) / top).clamp(min=1e-8)
                zero = torch.round(-lo / scale)
            col = w1[:, i]
            qc = (torch.clamp(torch.round(col / scale) + zero, 0, top) - zero) * scale
            q[:, i1 + i] = qc
            e = (col - qc) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


def effective(linear: nn.Linear, cfg, scale: torch.Tensor) -> torch.Tensor:
    """The weight ``linear`` acts with once its weight * scale is quantized by ``cfg``, / scale."""
    w = linear.weight.detach().float() * scale
    shell = nn.Linear(linear.in_features, linear.out_features, bias=False,
                      dtype=linear.weight.dtype).requires_grad_(False)
    shell.weight.data.copy_(w.to(linear.weight.dtype))
    q = quantize_layer(shell, cfg, torch.device("cpu"))
    with torch.no_grad():
        return q(torch.eye(linear.in_features, dtype=linear.weight.dtype)).T.float() / scale


def build(fp: nn.Module, plan: dict, stats: dict, alphas) -> tuple[nn.Module, dict]:
    """``alphas``: activation scaling over that grid; ``"gptq"``: GPTQ rounding."""
    model = copy.deepcopy(fp)
    chosen = {}
    for name, cfg in plan.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        orig = getattr(owner, leaf)
        if cfg.full_precision:
            continue
        if cfg.method != "hqq":  # other methods as they are
            setattr(owner, leaf, quantize_layer(copy.deepcopy(orig), cfg, torch.device("cpu")))
            continue
        mean, x, h = stats[name]
        w = orig.weight.detach().float()
        if alphas == "gptq":
            chosen[name] = 1.0
            orig.weight.data.copy_(gptq(w, h, cfg.bits, cfg.group_size).to(orig.weight.dtype))
            continue
        ref = x @ w.T
        best = None
        for a in alphas:
            s = mean ** a
            s = s / (s.max() * s.min()).sqrt()
            wq = effective(orig, cfg, s)
            err = ((x @ wq.T - ref) ** 2).mean().item()
            if best is None or err < best[0]:
                best = (err, a, wq)
        chosen[name] = best[1]
        orig.weight.data.copy_(best[2].to(orig.weight.dtype))
    return model, chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=None, help="a searched plan (default: hqq4 + protect)")
    ap.add_argument("--json", default="bench/results/calibrated_probe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe, clip, holdout, _ = demo_bench({})
    fp = pipe.transformer
    inv = autoquant.inventory(pipe)
    recipe = (autoquant.load_recipe(args.recipe) if args.recipe else baseline_recipe(
        inv, config_from_dict({"method": "hqq", "bits": 4, "group_size": 64}), ["transformer"],
        protect="default"))
    plan = {n.split(".", 1)[1]: c for n, c in recipe.resolve(inv).configs.items()
            if n.startswith("transformer.")}
    layers = {n: fp.get_submodule(n) for n, c in plan.items() if c.method == "hqq"}
    stats = input_stats(pipe, layers)
    out = {"recipe": args.recipe or "hqq4 + protect", "rows": {}}
    for label, alphas in (("as planned", (0.0,)), ("activation-scaled", ALPHAS),
                          ("gptq", "gptq")):
        model, chosen = build(fp, plan, stats, alphas)
        pipe.transformer = model
        try:
            metrics, _, _ = holdout.score()
        finally:
            pipe.transformer = fp
        out["rows"][label] = {"psnr": metrics["psnr"]["mean"],
                              "clip_fidelity": metrics["clip_fidelity"]["mean"],
                              "scaled_layers": sum(a > 0 for a in chosen.values()),
                              "hqq_layers": len(chosen)}
        print(f"{label}: {metrics['psnr']['mean']:.2f} dB held-out, "
              f"{out['rows'][label]['scaled_layers']}/{len(chosen)} hqq layers scaled", flush=True)
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

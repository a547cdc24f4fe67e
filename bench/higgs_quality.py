"""HIGGS vs HQQ on real trained weights and on the demo's images (the HIGGS issue).

1. Relative weight MSE, ||W - Q(W)||^2 / ||W||^2 summed over layers, on the demo denoiser and the
   MiniLM text encoder, at 2/3/4 bits, with bits per weight (bytes x 8 / weights) of each config:
   HIGGS p=1 and p=2 at group 64, HQQ at group 64 (its bytes) and at group 128 (fewer bytes).
2. Demo, held-out prompts: PSNR and CLIP fidelity of uniform higgs 3/4 vs hqq 3/4 over the
   denoiser, with bytes.

    python bench/higgs_quality.py [--json bench/results/higgs_quality.json]
"""

from __future__ import annotations

import argparse
import sys

import torch

import autoquant
from autoquant._format import human_bytes, table
from autoquant.backends import config_from_dict, get_backend
from autoquant.scoring.baseline import baseline_recipe

from _common import write_json


def dequantized_weight(module, cfg, layer) -> torch.Tensor:
    """The weight a quantized layer multiplies with (through its own forward on the identity)."""
    eye = torch.eye(layer.in_features, dtype=torch.float32)
    with torch.no_grad():
        out = module(eye.to(layer.dtype))
        if getattr(module, "bias", None) is not None:
            out = out - module.bias.to(out.dtype)
    return out.float().t()


def weight_mse(modules: dict, inv, cfg) -> tuple[float, float]:
    backend = get_backend(cfg.method)
    num = den = nbytes = params = 0.0
    for name, lin in modules.items():
        layer = inv[name]
        if layer.fits(cfg):
            continue
        q = backend.quantize(lin, cfg, torch.device("cpu"))
        w = lin.weight.detach().float()
        wq = dequantized_weight(q, cfg, layer)
        num += (w - wq).pow(2).sum().item()
        den += w.pow(2).sum().item()
        # bytes as a bf16 pipeline holds them (the weights are quantized from fp32 copies here
        # only so the reconstruction error is measured without bf16 rounding), bias excluded
        nbytes += backend.nbytes(cfg, layer.out_features, layer.in_features, False,
                                 torch.bfloat16, torch.device("cpu"))
        params += layer.weight_params
    return num / den, 8 * nbytes / params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/results/higgs_quality.json")
    args = ap.parse_args(argv)
    pipe = autoquant.load_pipeline("demo", dtype="float32")
    inv = autoquant.inventory(pipe)
    results: dict = {"weight_mse": {}, "demo": {}}
    rows = []
    for comp in ("transformer", "text_encoder"):
        mods = {l.name: getattr(pipe, comp).get_submodule(l.path) for l in inv
                if l.component == comp}
        for bits in (2, 3, 4):
            for entry in ({"method": "higgs", "bits": bits, "p": 1},
                          {"method": "higgs", "bits": bits, "p": 2},
                          {"method": "hqq", "bits": bits, "group_size": 64},
                          {"method": "hqq", "bits": bits, "group_size": 128}):
                cfg = config_from_dict(entry)
                mse, bpw = weight_mse(mods, inv, cfg)
                results["weight_mse"].setdefault(comp, {})[cfg.label] = {"rel_mse": mse, "bpw": bpw}
                rows.append([comp, str(bits), cfg.label, f"{bpw:.3f}", f"{mse:.5f}"])
    print(table(rows, ["weights", "bits", "config", "bits/weight (bf16 scales)",
                       "rel. MSE"]))
    demo = autoquant.load_pipeline("demo")
    ev = autoquant.Evaluator(demo, autoquant.EvalSettings.for_model("demo", "holdout"),
                             clip=autoquant.load_clip("demo"), progress=False)
    dinv = autoquant.inventory(demo)
    rows = []
    for entry in ({"method": "hqq", "bits": 4}, {"method": "higgs", "bits": 4, "p": 2},
                  {"method": "higgs", "bits": 4, "p": 1}, {"method": "hqq", "bits": 3},
                  {"method": "higgs", "bits": 3, "p": 2}, {"method": "higgs", "bits": 3, "p": 1}):
        cfg = config_from_dict(entry)
        r = ev.evaluate(baseline_recipe(dinv, cfg, ["transformer"]), cfg.label)
        results["demo"][cfg.label] = {"bytes": r.bytes, "bits_per_weight": r.bits_per_weight,
                                      "psnr": r.metrics["psnr"]["mean"],
                                      "clip_fidelity": r.metrics["clip_fidelity"]["mean"]}
        rows.append([cfg.label, human_bytes(r.bytes), f"{r.bits_per_weight:.2f}",
                     f"{r.metrics['psnr']['mean']:.2f}", f"{r.metrics['clip_fidelity']['mean']:.4f}"])
    print()
    print(table(rows, ["uniform (denoiser)", "bytes", "bits/w", "PSNR (holdout)", "CLIP fid"]))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

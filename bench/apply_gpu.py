"""Apply recipes to the Flux-dev architecture straight onto a GPU from CPU weights, layer by layer,
and measure peak GPU memory against the quantized size.

    python bench/apply_gpu.py [--recipes hqq4,bnb-nf4] [--layers full|small] [--json F]

The model is FluxTransformer2DModel with Flux-dev's published config (11.9B parameters, 504 Linear
layers), randomly initialized in bf16 on the CPU (no weights can be downloaded here): memory and
time are meaningful, quality is not.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

import autoquant
from autoquant.backends.measure import measured_bytes
from autoquant._format import human_bytes, table

from _common import write_json
from _flux import flux_transformer

RECIPES = {
    "hqq4": {"default": {"method": "hqq", "bits": 4, "group_size": 64}},
    "bnb-nf4": {"default": {"method": "bnb", "bits": 4, "type": "nf4"}},
    "torchao-int8": {"default": {"method": "torchao", "type": "int8"}},
    "mixed": {"default": {"method": "hqq", "bits": 4, "group_size": 64},
              "layers": {"re:single_transformer_blocks\\.\\d+\\.proj_mlp": {"method": "hqq",
                                                                            "bits": 3},
                         "re:transformer_blocks\\.\\d+\\.ff\\.net\\.2": {"method": "bnb",
                                                                         "bits": 4},
                         "re:.*norm.*linear": {"method": "torchao", "type": "int8"},
                         "proj_out": {"method": "none"}}},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="hqq4,bnb-nf4,mixed")
    ap.add_argument("--layers", choices=["full", "small"], default="full",
                    help="small: 2 + 4 blocks, for a quick check")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    config = dict(num_layers=2, num_single_layers=4) if args.layers == "small" else {}
    device = torch.device("cuda")
    rows, records = [], []
    for name in args.recipes.split(","):
        t0 = time.perf_counter()
        model = flux_transformer("cpu", **config)  # on the CPU: applied from there
        t_build = time.perf_counter() - t0
        inv = autoquant.inventory(model)
        params = sum(p.numel() for p in model.parameters())
        fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        recipe = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1", **RECIPES[name]})
        gc.collect()  # the previous recipe's model must be gone before the baseline is read
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        summary = autoquant.apply_recipe(model, recipe, device=device, progress=False)
        torch.cuda.synchronize()
        t_apply = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
        held = torch.cuda.memory_allocated() - base
        assert base < 64 * 2**20, f"{base} bytes were still allocated before this recipe"
        on_gpu = measured_bytes(model, device)
        rec = {"recipe": name, "params": params, "linear_layers": len(inv),
               "fp_bytes": fp_bytes, "build_s": t_build, "apply_s": t_apply,
               "linear_bytes_after": summary.bytes_after,
               "linear_bytes_predicted": summary.predicted_bytes_after,
               "model_bytes_on_gpu": on_gpu, "allocated_after": held, "peak_allocated": peak,
               "peak_over_quantized": peak / on_gpu}
        records.append(rec)
        rows.append([name, f"{params / 1e9:.2f}B", str(len(inv)), human_bytes(fp_bytes),
                     human_bytes(on_gpu), human_bytes(summary.predicted_bytes_after),
                     human_bytes(summary.bytes_after), human_bytes(peak),
                     f"{peak / on_gpu:.3f}", f"{t_apply:.1f}"])
        print(rows[-1], flush=True)
        del model, summary
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(table(rows, ["recipe", "params", "Linear", "bf16 size", "on GPU after",
                       "Linear formula", "Linear measured", "peak GPU", "peak/after",
                       "apply s"]))
    if args.json:
        write_json(args.json, {"config": config, "rows": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())

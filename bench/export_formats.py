"""Each export format and each method it holds, on ``demo-flux`` (CPU): bytes on disk, load
time with the consumer's own loader, the loaded model's images against autoquant's own layers
(identical, or PSNR), and the held-out fidelity its model card reports.

    python bench/export_formats.py [--json bench/results/export_formats.json]

Formats: ``diffusers`` (a folder: ``DiffusionPipeline``/``from_pretrained`` of the quantized
denoiser, torchao plans; the denoiser as one GGUF file for GGUF plans) and ``gguf`` (one file,
diffusers names, ``from_single_file`` + ``GGUFQuantizationConfig``) and ``comfy`` (a ComfyUI
checkpoint, read as ComfyUI's loader builds its layers: comfy-kitchen's layouts, dequantized).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import autoquant
from autoquant._format import human_bytes, table
from autoquant.export.comfy import export_comfy, linear_bytes, load_comfy
from autoquant.export.diffusers import export_diffusers, load_component
from autoquant.export.gguf import export_gguf, load_gguf
from autoquant.scoring.evaluator import evaluate_replaced

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402

MODEL = "demo-flux"
#: GGUF files keep these in the model's dtype, as the files people download do
KEEP = {"re:transformer\\.(x_embedder|context_embedder|proj_out)": {"method": "none"},
        "re:transformer\\.(time_text_embed|norm_out)\\..*": {"method": "none"}}


def uniform(spec: dict, keep: bool = False) -> autoquant.Recipe:
    return autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"], "model": {"id": MODEL},
        "default": spec, "layers": KEEP if keep else {}})


def mixed() -> autoquant.Recipe:
    """A plan of the kind a torchao search returns: intx4 in the blocks' MLPs, int8 elsewhere,
    the embedders in full precision."""
    return autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"], "model": {"id": MODEL},
        "default": {"method": "torchao", "type": "int8"},
        "layers": {**KEEP, "re:transformer\\..*(ff\\.net\\.|ff_context\\.net\\.|proj_mlp).*":
                   {"method": "torchao", "type": "intx", "bits": 4, "group_size": 64}}})


CASES = [
    ("diffusers", "torchao-int8", uniform({"method": "torchao", "type": "int8"})),
    ("diffusers", "torchao-int8_dynamic", uniform({"method": "torchao", "type": "int8_dynamic"})),
    ("diffusers", "torchao-fp8", uniform({"method": "torchao", "type": "fp8"})),
    ("diffusers", "torchao-intx4-g64", uniform({"method": "torchao", "type": "intx", "bits": 4,
                                                "group_size": 64})),
    ("diffusers", "torchao mixed (int8 + intx4 MLPs)", mixed()),
    ("diffusers", "gguf-Q4_K (+ keep list)", uniform({"method": "gguf", "type": "Q4_K"}, True)),
    ("gguf", "gguf-Q4_K (+ keep list)", uniform({"method": "gguf", "type": "Q4_K"}, True)),
    ("gguf", "gguf-Q8_0 (+ keep list)", uniform({"method": "gguf", "type": "Q8_0"}, True)),
    ("comfy", "torchao-int8", uniform({"method": "torchao", "type": "int8"})),
    ("comfy", "torchao-int8_dynamic", uniform({"method": "torchao", "type": "int8_dynamic"})),
    ("comfy", "torchao-fp8 (near-exact)", uniform({"method": "torchao", "type": "fp8"})),
    ("comfy-awq", "hqq4-g64 (near-exact)", uniform({"method": "hqq", "bits": 4,
                                                    "group_size": 64})),
]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/export_formats.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = autoquant.load_pipeline(MODEL)  # the demo's dtype on a CPU
    clip = autoquant.load_clip("demo")
    holdout = autoquant.Evaluator(pipe, autoquant.EvalSettings.for_model(MODEL, "holdout"),
                                  clip=clip, progress=False)
    rows, out = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (fmt, label, recipe) in enumerate(CASES):
            t0 = time.perf_counter()
            if fmt == "diffusers":
                target = Path(tmp) / f"folder{i}"
                export_diffusers(pipe, recipe, target, progress=False)
                export_s = time.perf_counter() - t0
                on_disk = sum(f.stat().st_size for f in (target / "transformer").rglob("*")
                              if f.is_file())
                t0 = time.perf_counter()
                loaded = load_component(target, "transformer", pipe.transformer)
            elif fmt.startswith("comfy"):
                target = Path(tmp) / f"file{i}.safetensors"
                export_comfy(pipe, recipe, target, progress=False,
                             target="awq" if fmt == "comfy-awq" else "stable")
                export_s = time.perf_counter() - t0
                on_disk = target.stat().st_size
                t0 = time.perf_counter()
                loaded = load_comfy(target, pipe)
            else:
                target = Path(tmp) / f"file{i}.gguf"
                export_gguf(pipe, recipe, target, names="diffusers", progress=False)
                export_s = time.perf_counter() - t0
                on_disk = target.stat().st_size
                t0 = time.perf_counter()
                loaded = load_gguf(target, pipe)
            load_s = time.perf_counter() - t0
            # the loaded model's images vs autoquant's own layers, on the held-out set
            scored = holdout.evaluate(recipe, label)
            own = holdout.last_images.clone()
            extra = ({"linear_bytes": linear_bytes(target, loaded)} if fmt.startswith("comfy")
                     else {})
            result = evaluate_replaced(holdout, "transformer", loaded, label, **extra)
            theirs = holdout.last_images
            identical = torch.equal(own, theirs)
            m = result.to_dict()
            row = {"format": fmt, "plan": label, "transformer_bytes_on_disk": on_disk,
                   "predicted_bytes": scored.bytes, "export_s": export_s, "load_s": load_s,
                   "identical_to_autoquant": identical,
                   "psnr_vs_autoquant": _psnr(own, theirs),
                   "psnr": m["psnr"], "psnr_worst": m["psnr_worst"], "ssim": m["ssim"],
                   "clip_fidelity": m["clip_fidelity"], "scored_psnr": scored.to_dict()["psnr"],
                   "images": result.images}
            out.append(row)
            rows.append([fmt, label, human_bytes(on_disk), f"{export_s:.1f}", f"{load_s:.2f}",
                         "identical" if identical else f"{row['psnr_vs_autoquant']:.1f} dB",
                         f"{row['psnr']:.2f}", f"{row['ssim']:.4f}",
                         f"{row['clip_fidelity']:.4f}"])
            print(table(rows[-1:], ["format", "plan", "denoiser on disk", "export s", "load s",
                                    "vs autoquant", "PSNR", "SSIM", "CLIP fid."]), flush=True)
    print()
    print(table(rows, ["format", "plan", "denoiser on disk", "export s", "load s",
                       "vs autoquant", "PSNR", "SSIM", "CLIP fid."]))
    write_json(args.json, {"environment": environment(), "model": MODEL,
                           "images": out[0]["images"], "rows": out})


if __name__ == "__main__":
    main()

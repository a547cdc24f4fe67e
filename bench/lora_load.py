"""A LoRA trained on full precision, saved in diffusers' format, loaded on each method's layers
of the demo-flux pipeline: image PSNR of LoRA-on-quantized against LoRA-on-full-precision (and
of the quantized plan alone against full precision), load time, and whether diffusers' own
``pipe.load_lora_weights`` takes the layers too.

    python bench/lora_load.py [--json bench/results/lora_load_cpu.json]

The LoRA (rank 16 on every attention and MLP Linear of the blocks) is trained for 30 steps on
the full-precision denoiser towards its own output nudged by noise (a fine-tune that changes
the images, not one that destroys them), saved with ``save_lora_weights`` and its config, then
loaded with ``autoquant.plans.lora.load_lora_weights`` onto the pipeline with those Linears
quantized. Images: the holdout prompts, seed 0, the model's generation settings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import autoquant
from autoquant._format import table
from autoquant.generation.settings import prompt_set
from autoquant.models.builtin import builtin
from autoquant.plans.lora import add_lora, load_lora_weights, lora_config

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402
from lora_train import LAYERS, METHODS, TARGETS, denoiser_batch  # noqa: E402

MODEL = "demo-flux"


def _images(pipe, prompts, device):
    gen = builtin(MODEL).generation
    out = []
    for i in range(0, len(prompts), 4):
        gens = [torch.Generator(device).manual_seed(0) for _ in prompts[i:i + 4]]
        with torch.no_grad():
            out.append(pipe(list(prompts[i:i + 4]), generator=gens, output_type="pt",
                            **gen).images.float().cpu())
    return torch.cat(out)


def _psnr(a, b) -> float:
    return 10 * torch.log10(1 / ((a - b) ** 2).mean().clamp(min=1e-20)).item()


def _train(pipe, folder: Path, device, steps: int) -> None:
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model = add_lora(pipe, lora_config(r=16, lora_alpha=16, target_modules=TARGETS))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    batch = {k: v.to(device) for k, v in denoiser_batch(gen).items()}
    with torch.no_grad():
        target = model(**batch).sample + 0.3 * torch.randn(4, 16, 64, generator=gen).to(device)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(**batch).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    type(pipe).save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(
        model), transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    model.requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--json", default="bench/results/lora_load_cpu.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    prompts = prompt_set(MODEL, "holdout")[: args.prompts]
    folder = Path(tempfile.mkdtemp(prefix="lora-"))
    pipe = autoquant.load_pipeline(MODEL, dtype="float32").to(dev)
    reference = _images(pipe, prompts, dev)
    _train(pipe, folder, dev, args.train_steps)
    with_lora = _images(pipe, prompts, dev)
    effect = _psnr(with_lora, reference)
    print(f"the LoRA on full precision: PSNR {effect:.2f} dB against no LoRA", flush=True)
    rows, out = [], []
    for label, spec in METHODS.items():
        if spec is None:
            continue
        pipe = autoquant.load_pipeline(MODEL, dtype="float32")
        try:
            autoquant.apply_recipe(pipe, autoquant.Recipe.from_dict(
                {"format": "autoquant-recipe/1", "components": ["transformer"],
                 "layers": {f"re:transformer\\.{LAYERS[3:]}": spec}}),
                device=args.device, progress=False)
        except Exception as e:  # noqa: BLE001 -- a method this machine cannot run: say why
            print(f"{label}: skipped ({type(e).__name__}: {str(e)[:120]})", flush=True)
            out.append({"method": label, "skipped": f"{type(e).__name__}: {e}"[:300]})
            continue
        pipe.to(dev)
        quantized = _images(pipe, prompts, dev)
        t0 = time.perf_counter()
        load_lora_weights(pipe, str(folder))
        load_s = time.perf_counter() - t0
        lora_q = _images(pipe, prompts, dev)
        try:
            fuse = "fused"
            pipe.fuse_lora()
        except ValueError as e:
            fuse = "refused" if "re-quantize" in str(e) else f"error: {e}"[:80]
        pipe.unload_lora_weights()
        native = autoquant.load_pipeline(MODEL, dtype="float32")
        autoquant.apply_recipe(native, autoquant.Recipe.from_dict(
            {"format": "autoquant-recipe/1", "components": ["transformer"],
             "layers": {f"re:transformer\\.{LAYERS[3:]}": spec}}), device=args.device,
            progress=False)
        try:
            native.to(dev).load_lora_weights(str(folder))
            same = torch.equal(_images(native, prompts, dev), lora_q)
            diffusers_own = "yes, identical" if same else "yes, different images"
        except Exception as e:  # noqa: BLE001 -- what diffusers' own loader says, recorded
            diffusers_own = f"no ({type(e).__name__})"
        row = {"method": label, "psnr_lora_quantized_vs_lora_fp": _psnr(lora_q, with_lora),
               "psnr_quantized_vs_fp": _psnr(quantized, reference),
               "psnr_lora_effect_on_quantized": _psnr(lora_q, quantized),
               "load_s": load_s, "fuse_lora": fuse, "pipe_load_lora_weights": diffusers_own}
        out.append(row)
        rows.append([label, f"{row['psnr_lora_quantized_vs_lora_fp']:.2f}",
                     f"{row['psnr_quantized_vs_fp']:.2f}", f"{load_s:.2f}", fuse, diffusers_own])
        print(table(rows[-1:], ["method", "LoRA-q vs LoRA-fp dB", "q vs fp dB", "load s",
                                "fuse_lora", "pipe.load_lora_weights"]), flush=True)
    print()
    print(table(rows, ["method", "LoRA-q vs LoRA-fp dB", "q vs fp dB", "load s", "fuse_lora",
                       "pipe.load_lora_weights"]))
    write_json(args.json, {"environment": environment(dev), "device": args.device,
                           "prompts": list(prompts), "lora_effect_psnr": effect,
                           "train_steps": args.train_steps, "rows": out})


if __name__ == "__main__":
    main()

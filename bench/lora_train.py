"""LoRA training on quantized layers (QLoRA style) of the demo-flux denoiser: steps per second
and peak memory per method, and the loss after 20 steps.

    python bench/lora_train.py [--device cuda] [--json bench/results/lora_train_cpu.json]

The denoiser alone (loaded from the shipped weights with diffusers), every attention and MLP
Linear of its blocks quantized, a rank-16 adapter on them; one step = forward + backward +
AdamW on a batch of 4 random latents against a fixed target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import autoquant
from autoquant._format import table
from autoquant.models.zoo.flux import FLUX_DIR
from autoquant.plans.lora import add_lora, lora_config

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402

LAYERS = ("re:(transformer_blocks|single_transformer_blocks)\\..*"
          "(to_q|to_k|to_v|to_out\\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|ff\\.net\\.0\\.proj|"
          "ff\\.net\\.2|ff_context\\.net\\.0\\.proj|ff_context\\.net\\.2|proj_mlp)")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
           "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
           "proj_mlp"]
METHODS = {"bf16 / fp32 (no quantization)": None,
           "hqq 4-bit g64": {"method": "hqq", "bits": 4, "group_size": 64},
           "torchao int8": {"method": "torchao", "type": "int8"},
           "torchao intx4 g64": {"method": "torchao", "type": "intx", "bits": 4, "group_size": 64},
           "gguf Q4_K": {"method": "gguf", "type": "Q4_K"},
           "higgs 4-bit": {"method": "higgs", "bits": 4},
           "bnb nf4": {"method": "bnb", "type": "nf4"}}


def denoiser_batch(gen: torch.Generator) -> dict:
    """4 random latents of demo-flux's denoiser (16 image and 16 text tokens) at t = 0.5."""
    return dict(hidden_states=torch.randn(4, 16, 64, generator=gen),
                timestep=torch.full((4,), 0.5),
                encoder_hidden_states=torch.randn(4, 16, 384, generator=gen),
                pooled_projections=torch.randn(4, 384, generator=gen),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(16, 3))


def flux_dev_batch(gen: torch.Generator) -> dict:
    """One 512 px latent of Flux-dev's denoiser (1,024 image and 256 text tokens)."""
    return dict(hidden_states=torch.randn(1, 1024, 64, generator=gen),
                timestep=torch.full((1,), 0.5), guidance=torch.full((1,), 3.5),
                encoder_hidden_states=torch.randn(1, 256, 4096, generator=gen),
                pooled_projections=torch.randn(1, 768, generator=gen),
                img_ids=torch.zeros(1024, 3), txt_ids=torch.zeros(256, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="bench/results/lora_train_cpu.json")
    ap.add_argument("--flux-dev", action="store_true",
                    help="the Flux-dev architecture (random bf16 weights, GPU) instead of "
                         "demo-flux's denoiser: 512 px (1,024 image + 256 text tokens), batch 1")
    ap.add_argument("--methods", default=None, help="labels to run, comma-separated")
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    dev = torch.device(args.device)
    if dev.type == "cuda":
        # cuDNN's attention backward on the H100 (torch 2.11) gave NaN gradients for every
        # method here, full precision included, and then failed outright (mha_graph.execute):
        # the flash / efficient kernels instead
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows, out = [], []
    chosen = args.methods.split(",") if args.methods else list(METHODS)
    for label, spec in ((k, v) for k, v in METHODS.items() if k in chosen):
        if args.flux_dev:
            from _flux import flux_transformer

            model = flux_transformer(dev)
        else:
            model = FluxTransformer2DModel.from_pretrained(FLUX_DIR / "transformer",
                                                           torch_dtype=dtype)
        try:
            if spec is not None:
                autoquant.apply_recipe(model, autoquant.Recipe.from_dict(
                    {"format": "autoquant-recipe/1", "layers": {LAYERS: spec}}),
                    device=args.device, progress=False)
            model.to(dev).requires_grad_(False)
            add_lora(model, lora_config(r=16, lora_alpha=16, target_modules=TARGETS))
        except Exception as e:  # noqa: BLE001 -- a method this machine cannot run: say why
            print(f"{label}: skipped ({type(e).__name__}: {str(e)[:120]})", flush=True)
            out.append({"method": label, "skipped": f"{type(e).__name__}: {e}"[:300]})
            continue
        model.to(dev)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(params, lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        batch = flux_dev_batch(gen) if args.flux_dev else denoiser_batch(gen)
        batch = {k: v.to(dev, dtype if v.is_floating_point() and k != "timestep" else v.dtype)
                 for k, v in batch.items()}
        target = torch.randn(batch["hidden_states"].shape, generator=gen).to(dev, dtype)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        losses, t0 = [], None
        for step in range(args.steps + 2):  # two warm-up steps, not timed
            if step == 2:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(model(**batch).sample.float(), target.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        sps = args.steps / (time.perf_counter() - t0)
        # peak GPU memory per method; a CPU process's peak RSS only grows, so it is not per method
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        row = {"method": label, "steps_per_s": sps, "loss_first": losses[0],
               "loss_last": losses[-1], "peak_cuda_allocated_bytes": peak}
        out.append(row)
        rows.append([label, f"{sps:.2f}", f"{losses[0]:.4f}", f"{losses[-1]:.4f}",
                     f"{peak / 2**20:.0f} MiB" if peak is not None else "-"])
        print(table(rows[-1:], ["method", "steps/s", "loss first", "loss last", "peak"]),
              flush=True)
        del model, opt, params
        import gc

        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(table(rows, ["method", "steps/s", "loss first", "loss last", "peak"]))
    write_json(args.json, {"environment": environment(dev), "device": args.device,
                           "steps": args.steps, "rows": out})


if __name__ == "__main__":
    main()

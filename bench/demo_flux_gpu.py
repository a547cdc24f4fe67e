"""demo-flux's quality under configs that only run on a GPU (fp8 activations, ...): held-out
PSNR / SSIM of each uniform config against the model in bf16, on the GPU machine, which lacks
the MiniLM text encoder -- so the prompts are encoded here first.

    python bench/demo_flux_gpu.py embed                 # here: writes /out/demo_flux_embeds.pt
    python bench/demo_flux_gpu.py run --embeds /out/demo_flux_embeds.pt \
        --json bench/results/demo_flux_gpu_quality.json # on the GPU (carry out/)

``embed`` runs demo-flux's own text encoders on the holdout prompts (and the empty negative
prompt) and checks, on the CPU, that the pipeline fed those embeddings makes the images the
pipeline makes from the prompts. ``run`` builds the pipeline without text encoders (the
denoiser and VAE from the shipped weights), makes bf16's images, then each config's (every
Linear of the denoiser that takes it; the model's own held-out settings, seed 0).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402

#: fp8_int4 with mslk's own codes, round(w / scale) (torchao's quantizer; autoquant's before it
#: chose codes for the kernel's rounded products): the comparison, in the same call
MSLK_CODES = "torchao fp8_int4 with mslk's round-to-nearest codes"

CONFIGS = {
    "torchao fp8_dynamic (per row)": {"method": "torchao", "type": "fp8_dynamic"},
    "torchao fp8_dynamic_tensor": {"method": "torchao", "type": "fp8_dynamic_tensor"},
    "torchao fp8 (weight-only)": {"method": "torchao", "type": "fp8"},
    "torchao fp8_int4 (int4 weights x fp8 activations)": {"method": "torchao",
                                                          "type": "fp8_int4"},
    MSLK_CODES: {"method": "torchao", "type": "fp8_int4"},
    "torchao fp8_int4_plain": {"method": "torchao", "type": "fp8_int4_plain"},
    "torchao int8_dynamic": {"method": "torchao", "type": "int8_dynamic"},
    "torchao int8 (weight-only)": {"method": "torchao", "type": "int8"},
    "hqq 4-bit g64": {"method": "hqq", "bits": 4, "group_size": 64},
    "bnb nf4": {"method": "bnb", "type": "nf4"},
}


def _generation():
    from autoquant.models.builtin import builtin

    gen = dict(builtin("demo-flux").generation)
    gen["true_cfg_scale"] = gen.pop("guidance_scale")
    gen.pop("max_sequence_length", None)
    return gen


def embed(args) -> None:
    import autoquant
    from autoquant.generation.settings import prompt_set

    pipe = autoquant.load_pipeline("demo-flux", dtype="float32")
    prompts = list(prompt_set("demo-flux", "holdout"))[: args.prompts]
    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=16)
        ne, npooled, _ = pipe.encode_prompt([""] * len(prompts), [""] * len(prompts),
                                            max_sequence_length=16)
    out = {"prompts": prompts, "prompt_embeds": pe, "pooled_prompt_embeds": pooled,
           "negative_prompt_embeds": ne, "negative_pooled_prompt_embeds": npooled}
    gen = _generation()
    check = slice(0, 2)
    with torch.no_grad():
        direct = pipe(prompts[check], generator=[torch.Generator().manual_seed(0)] * 2,
                      output_type="pt").images
        fed = pipe(prompt_embeds=pe[check], pooled_prompt_embeds=pooled[check],
                   negative_prompt_embeds=ne[check], negative_pooled_prompt_embeds=npooled[check],
                   generator=[torch.Generator().manual_seed(0)] * 2, output_type="pt",
                   **gen).images
    print("embeddings reproduce the pipeline's images:", torch.equal(direct, fed),
          f"(max diff {float((direct - fed).abs().max()):.2e})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out}")


def _pipe(device, dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers import FluxTransformer2DModel

    from autoquant.models.zoo.flux import FLUX_DIR

    transformer = FluxTransformer2DModel.from_pretrained(FLUX_DIR / "transformer",
                                                         torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(FLUX_DIR / "vae", torch_dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(FLUX_DIR / "scheduler")
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _images(pipe, e, device, dtype):
    gen = _generation()
    n = len(e["prompts"])
    out = []
    for i in range(0, n, 8):
        s = slice(i, i + 8)
        k = len(e["prompts"][s])
        with torch.no_grad():
            out.append(pipe(**{key: e[key][s].to(device, dtype) for key in (
                "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                "negative_pooled_prompt_embeds")},
                generator=[torch.Generator(device).manual_seed(0) for _ in range(k)],
                output_type="pt", **gen).images.float().cpu())
    return torch.cat(out)


def transferred(recipe_layers: dict, names: set) -> dict:
    """A Flux-dev plan tied by block position (``bench/flux_latency.py``'s ``by_position``:
    ``re:`` entries per position of each block kind, exact names for the rest, all under
    ``transformer.``) as a recipe for demo-flux's transformer, the same architecture with fewer,
    narrower blocks: each position's config on every block of its kind, the other layers by
    name (Flux-dev's guidance embedder, which demo-flux lacks, dropped)."""
    layers = {}
    for key, cfg in recipe_layers.items():
        if key.startswith("re:"):
            layers["re:" + key[3:].removeprefix("transformer\\.")] = cfg
        elif key.removeprefix("transformer.") in names:
            layers[key.removeprefix("transformer.")] = cfg
    return {"format": "autoquant-recipe/1", "layers": layers}


def fastest_recipes(path: str, label: str = "Flux-dev plan") -> dict:
    """``{"fastest at <budget> (<label>)": demo-flux recipe}`` from ``bench/flux_latency.py
    --part compile``'s JSON (the plans it measured, carried over by :func:`transferred`)."""
    import json

    from diffusers import FluxTransformer2DModel

    from autoquant.models.zoo.flux import FLUX_DIR

    names = {n for n, m in FluxTransformer2DModel.from_pretrained(
        FLUX_DIR / "transformer").named_modules() if isinstance(m, torch.nn.Linear)}
    fastest = json.loads(Path(path).read_text())["fastest"]["compile"]
    return {f"fastest at {budget} ({label})": transferred(row["recipe"], names)
            for budget, row in fastest.items() if "recipe" in row}


def _plans(args) -> dict:
    """``{label: recipe}``: each uniform config, then the fastest plans of --plans."""
    out = {label: {"format": "autoquant-recipe/1", "default": cfg}
           for label, cfg in CONFIGS.items() if args.configs is None or label in args.configs}
    return {**out, **(fastest_recipes(args.plans) if args.plans else {})}


@contextlib.contextmanager
def _mslk_codes():
    """autoquant's fp8_int4 quantizer swapped for mslk's ``quantize_int4_preshuffle`` (torchao's)."""
    from unittest import mock

    from autoquant.backends import torchao as backend

    def mslk_preshuffled(w):
        from mslk.quantize.shuffle import quantize_int4_preshuffle

        qdata, (group_scale, row_scale) = quantize_int4_preshuffle(w, dtype="fp8")
        return backend.bf16_preshuffled_class()(qdata, group_scale, [1, backend.FP8_INT4_GROUP],
                                                list(w.shape), None, row_scale)

    with mock.patch.object(backend, "_fp8_aware_preshuffled", mslk_preshuffled):
        yield


def run(args) -> None:
    import autoquant
    from autoquant.scoring.clip import load_clip
    from autoquant.scoring.metrics import clip_features
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    device, dtype = torch.device(args.device), torch.bfloat16
    e = torch.load(args.embeds)
    pipe = _pipe(device, dtype)
    reference = _images(pipe, e, device, dtype)
    clip = load_clip("demo", device)  # the demo's own CLIP, as bench/demo_flux.py scores
    ref_feats = clip_features(clip, reference.to(device))
    rows = []
    for label, recipe in _plans(args).items():
        pipe = _pipe(device, dtype)
        try:
            with _mslk_codes() if label == MSLK_CODES else contextlib.nullcontext():
                autoquant.apply_recipe(pipe.transformer, autoquant.Recipe.from_dict(recipe),
                                       device=device, progress=False)
        except Exception as err:  # noqa: BLE001 -- a config this machine cannot run: recorded
            rows.append({"config": label, "skipped": f"{type(err).__name__}: {err}"[:300]})
            print(f"{label}: skipped ({type(err).__name__}: {str(err)[:160]})", flush=True)
            continue
        images = _images(pipe, e, device, dtype)
        mse = ((images - reference) ** 2).flatten(1).mean(1).clamp(min=1e-20)
        psnr = (10 * torch.log10(1 / mse))
        row = {"config": label, "recipe": recipe, "psnr": float(psnr.mean()),
               "psnr_worst": float(psnr.min()),
               "ssim": float(ssim(images, reference, data_range=1.0)),
               "clip_fidelity": float((clip_features(clip, images.to(device)) * ref_feats)
                                      .sum(-1).mean())}
        rows.append(row)
        print(f"{label}: PSNR {row['psnr']:.2f} dB (worst {row['psnr_worst']:.2f}), SSIM "
              f"{row['ssim']:.4f}, CLIP fidelity {row['clip_fidelity']:.4f}", flush=True)
    write_json(args.json, {"environment": environment(device), "prompts": e["prompts"],
                           "reference": "demo-flux in bf16 on this GPU", "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("embed")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--out", default="out/demo_flux_embeds.pt")
    p = sub.add_parser("run")
    p.add_argument("--embeds", default="out/demo_flux_embeds.pt")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="bench/results/demo_flux_gpu_quality.json")
    p.add_argument("--configs", type=lambda t: t.split(","), default=None,
                   help="comma-separated labels of CONFIGS to run (default: all)")
    p.add_argument("--plans", default=None,
                   help="bench/flux_latency.py --part compile's JSON: its fastest plans too")
    args = ap.parse_args()
    embed(args) if args.part == "embed" else run(args)


if __name__ == "__main__":
    main()

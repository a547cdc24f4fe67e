"""``autoquant`` command line: ``inspect``, ``apply``, ``evaluate``, ``baseline`` ``search``, ``report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from ._errors import AutoquantError
from ._format import human_bytes, table


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="built-in name (demo, tiny-flux, tiny-sd), local diffusers folder, or hub id")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype (default bfloat16)")
    p.add_argument("--revision", default=None, help="hub revision")


def cmd_inspect(args) -> int:
    from .inventory import inventory
    from .pipelines import load_pipeline

    pipe = load_pipeline(args.model, dtype=args.dtype, revision=args.revision)
    inv = inventory(pipe)
    data = inv.to_dict()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    rows = []
    for layer in data["layers"]:
        unusable = layer["unusable"]
        rows.append([layer["name"], "x".join(map(str, layer["shape"])), f"{layer['params']:,}",
                     human_bytes(layer["bytes"]),
                     "all" if not unusable else "not: " + ", ".join(sorted(unusable))])
    if not args.totals_only:
        print(table(rows, ["layer", "shape", "params", "bytes", "methods"]))
        print()
    comp_rows = [[name, str(c["linear_layers"]), f"{c['linear_params']:,}",
                  human_bytes(c["linear_bytes"]), f"{c['params']:,}", human_bytes(c["bytes"])]
                 for name, c in data["components"].items()]
    print(table(comp_rows, ["component", "Linear layers", "Linear params", "Linear bytes",
                            "all params", "all bytes"]))
    print(f"\nfingerprint {data['fingerprint']}; {len(rows)} quantizable layers. "
          f"'not: ...' lists configs a layer cannot take (see --json for the reasons).")
    return 0


def cmd_apply(args) -> int:
    from .apply import apply_recipe
    from .persist import save_quantized
    from .pipelines import load_pipeline
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)  # validated before any model is loaded
    pipe = load_pipeline(args.model, dtype=args.dtype, revision=args.revision)
    summary = apply_recipe(pipe, recipe, device=args.device, progress=not args.json)
    result = {"summary": summary.to_dict()}
    if args.save:
        result["saved"] = str(save_quantized(pipe, args.save))
    if args.prompt:
        import torch

        from .pipelines import generation_defaults

        kwargs = generation_defaults(args.model)
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
        if args.steps:
            kwargs["num_inference_steps"] = args.steps
        if args.size:
            kwargs.update(height=args.size, width=args.size)
        image = pipe(args.prompt, **kwargs).images[0]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        result["image"] = str(out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(summary.table())
        if "saved" in result:
            print(f"saved to {result['saved']} (load with autoquant.load_quantized)")
        if "image" in result:
            print(f"image written to {result['image']}")
    return 0


def _settings(args):
    from .settings import EvalSettings

    return EvalSettings.for_model(args.model, args.prompt_set, args.prompts, args.seeds,
                                  args.steps, args.guidance, args.size, args.batch_size)


def _clip(args, device):
    if args.no_clip:
        return None
    from .clip import load_clip

    spec = args.clip or ("demo" if args.model == "demo" else None)
    if spec is None:
        raise AutoquantError(f"no default CLIP for {args.model}: pass --clip ARCH/TAG (e.g. "
                             f"ViT-B-32/laion2b_s34b_b79k), a local ARCH/checkpoint, or --no-clip")
    return load_clip(spec, device)


def cmd_evaluate(args) -> int:
    from .evaluator import Evaluator
    from .pipelines import load_pipeline
    from .recipe import load_recipe
    from .references import ReferenceCache

    recipe = load_recipe(args.recipe) if args.recipe else None  # validated before loading
    settings = _settings(args)
    pipe = load_pipeline(args.model, dtype=args.dtype, revision=args.revision)
    if args.device:
        pipe.to(args.device)
    clip = _clip(args, args.device or "cpu")
    evaluator = Evaluator(pipe, settings, clip=clip, components=args.components,
                          cache=ReferenceCache(args.cache_dir) if args.cache_dir else None,
                          progress=not args.json)
    label = Path(args.recipe).stem if args.recipe else "full precision"
    result = evaluator.evaluate(recipe, label=label)
    if args.json:
        out = result.to_dict()
        out["settings"] = settings.to_dict()
        out["references_generated"] = evaluator.references_generated
        print(json.dumps(out, indent=1))
    else:
        print(result.table())
    return 0


def cmd_baseline(args) -> int:
    from .backends import config_from_dict
    from .baseline import baseline_recipe
    from .evaluator import default_components
    from .inventory import inventory
    from .pipelines import load_pipeline

    entry = {"method": args.method}
    if args.bits is not None:
        entry["bits"] = args.bits
    for option in args.options or []:
        key, sep, value = option.partition("=")
        if not sep:
            raise AutoquantError(f"--options takes key=value pairs, got {option!r}")
        entry[key] = yaml.safe_load(value)
    try:
        config = config_from_dict(entry)
    except Exception as e:
        raise AutoquantError(str(e)) from e
    pipe = load_pipeline(args.model, dtype=args.dtype, revision=args.revision)
    inv = inventory(pipe)
    components = args.components or default_components(pipe)
    recipe = baseline_recipe(inv, config, components, args.protect,
                             model=getattr(pipe, "_autoquant_source", None))
    plan = recipe.resolve(inv)
    path = recipe.save(args.out)
    layers = [l for l in inv if l.component in components]
    fp = sum(l.weight_params for l in layers if l.name not in plan.configs
             or plan.configs[l.name].method == "none")
    total = sum(l.weight_params for l in layers)
    info = {"recipe": str(path), "config": config.to_dict(), "components": components,
            "layers": len(layers), "protected": sum(1 for c in plan.configs.values()
                                                    if c.method == "none"),
            "skipped": plan.skipped, "fp_share": fp / total,
            "predicted_bytes": sum(l.nbytes(plan.configs[l.name]) if l.name in plan.configs
                                   else l.bytes for l in layers)}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"wrote {path}: {config.label} on {len(layers)} layers of {', '.join(components)}; "
              f"{info['protected']} protected, {len(plan.skipped)} cannot take it; "
              f"full-precision share {info['fp_share']:.1%}; Linear bytes "
              f"{human_bytes(info['predicted_bytes'])}")
    return 0


def cmd_search(args) -> int:
    from .pipelines import load_pipeline
    from .search import Search, SearchConfig, run_search
    from .settings import EvalSettings
    from .space import load_space, parse_budget

    parse_budget(args.budget)  # a malformed budget fails before anything loads
    space = load_space(args.space, allow_fp_cap_above_default=args.allow_fp_cap)
    pipe = load_pipeline(args.model, dtype=args.dtype, revision=args.revision)
    settings = EvalSettings.for_model(args.model, "search", args.prompts, args.seeds, args.steps,
                                      args.guidance, args.size, args.batch_size)
    clip = _clip(args, args.device or "cpu")
    cfg = SearchConfig(model=args.model, budget=args.budget, space=space, trials=args.trials,
                       timeout=args.timeout, storage=args.storage, study=args.study,
                       out=Path(args.out), device=args.device, resume=args.resume,
                       seed=args.seed, settings=settings, clip=clip, progress=not args.json,
                       cache_bytes=None if args.cache_gib is None else args.cache_gib * 2**30,
                       sensitivity=args.sensitivity)
    search = Search(cfg, pipe)
    report = run_search(search)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1, default=str))
        return 0
    print(f"budget {args.budget} = {human_bytes(search.budget_bytes)} of the searched components "
          f"({', '.join(search.groups.components)}; full precision {human_bytes(search.fp_bytes)});"
          f" {len(search.groups.groups)} groups; trials {report['trials']}")
    print(report["table"])
    if "best" in report:
        b = report["best"]
        print(f"\nbest within budget: trial {b['trial']}, {human_bytes(b['bytes'])} "
              f"(whole pipeline {human_bytes(b['pipeline_bytes'])}), PSNR {b['psnr']:.2f} dB, "
              f"CLIP fidelity {b['clip_fidelity']:.4f}")
        print(f"recipe: {b['recipe']}\napply it: autoquant apply --model {args.model} "
              f"--recipe {b['recipe']} --prompt \"...\" --out image.png")
    else:
        print("no trial finished within the budget")
    return 0


def cmd_report(args) -> int:
    from . import explore

    view = explore.open_study(args.out, args.storage, args.study, args.artifacts)
    path = explore.write_report(view, args.html or Path(args.out or ".") / "report.html")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, self-contained: opens offline)")
    return 0


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=None, help="prompts file, one per line")
    p.add_argument("--prompt-set", default="holdout", choices=["search", "holdout"],
                   help="built-in prompt set when --prompts is not given (default holdout)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--size", type=int, default=None, help="image height and width")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip", default=None,
                   help="CLIP for fidelity: demo, ARCH/TAG or ARCH/checkpoint (default: the model's)")
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP metrics")
    p.add_argument("--device", default=None, help="evaluate on this device (e.g. cuda)")
    p.add_argument("--components", nargs="+", default=None,
                   help="components whose bytes count (default: the denoiser)")
    p.add_argument("--cache-dir", default=None,
                   help="reference image cache (default $AUTOQUANT_CACHE/references)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoquant",
        description="Per-layer, cross-backend quantization of diffusion pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the quantizable layers of a pipeline")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--totals-only", action="store_true", help="only the per-component totals")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("apply", help="apply a recipe to a pipeline")
    _add_model(p)
    p.add_argument("--recipe", required=True, help="recipe YAML (format autoquant-recipe/1)")
    p.add_argument("--device", default=None,
                   help="quantize layer by layer onto this device (e.g. cuda)")
    p.add_argument("--save", default=None, help="save the quantized pipeline to this folder")
    p.add_argument("--prompt", default=None, help="generate one image with this prompt")
    p.add_argument("--out", default="autoquant.png", help="where the image goes")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (model default)")
    p.add_argument("--size", type=int, default=None, help="image height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("evaluate", help="score a recipe's images against full precision")
    _add_model(p)
    p.add_argument("--recipe", default=None, help="recipe to evaluate (default: full precision)")
    _add_eval_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("search", help="search per-layer plans under a memory budget")
    _add_model(p)
    p.add_argument("--budget", required=True,
                   help="bytes of the searched components (6GB, 5.5GiB), a share of full "
                        "precision (35%%) or bits per weight (4.25bpw)")
    p.add_argument("--space", default="default",
                   help="search space: a name in search_spaces/ or a YAML path")
    p.add_argument("--allow-fp-cap", action="store_true",
                   help="allow a space's fp_cap above 0.20")
    p.add_argument("--trials", type=int, default=30, help="trials in the study (in total)")
    p.add_argument("--timeout", type=float, default=None, help="seconds")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: sqlite in --out)")
    p.add_argument("--study", default=None, help="study name")
    p.add_argument("--out", default="autoquant-search")
    p.add_argument("--resume", action="store_true", help="continue an existing study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=None, help="search prompts file (default: built-in set)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--clip", default=None)
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--sensitivity", default="auto", choices=["auto", "full", "anchored"],
                   help="full: replay the denoiser for every (layer group, config); anchored: "
                        "once per group (large models); auto: full if it takes <= 10 min")
    p.add_argument("--cache-gib", type=float, default=None,
                   help="GiB the quantized-layer cache may hold (default: half the free memory)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="write a self-contained HTML report of a search")
    p.add_argument("--out", default=None, help="the search's --out folder")
    p.add_argument("--storage", default=None, help="or an Optuna storage URL ...")
    p.add_argument("--study", default=None, help="... and the study name")
    p.add_argument("--artifacts", default=None, help="artifact folder (default OUT/artifacts)")
    p.add_argument("--html", default=None, help="where the report goes (default OUT/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("baseline", help="write a uniform recipe (one config for every layer)")
    _add_model(p)
    p.add_argument("--method", required=True)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--options", nargs="*", default=None,
                   help="method options as key=value (group_size=128 type=fp4 ...)")
    p.add_argument("--protect", default="none", choices=["none", "default"],
                   help="default: keep embedders and the final projection in full precision")
    p.add_argument("--components", nargs="+", default=None, help="default: the denoiser")
    p.add_argument("--out", required=True, help="where the recipe goes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_baseline)
    return parser


def _quiet_libraries() -> None:
    """Import-time chatter of torch/torchao/bitsandbytes/diffusers is not for CLI users
    (set AUTOQUANT_VERBOSE=1 to see it)."""
    import logging
    import os

    if os.environ.get("AUTOQUANT_VERBOSE"):
        return
    for name in ("torch.utils._pytree", "bitsandbytes", "diffusers", "transformers", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    import os

    # Quantized layers are many mid-sized tensors; the default CUDA allocator hands out whole
    # blocks when the remainder is < 1 MiB, which costs 2-4% over the bytes the tensors hold
    # (bench/flux_scale.py). Expandable segments split at 512 B. A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except AutoquantError as e:
        print(f"autoquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``autoquant`` command line: ``inspect`` and ``apply`` (search, evaluate, baseline and report
arrive with their features)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except AutoquantError as e:
        print(f"autoquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``autoquant`` command line: ``search``, ``apply``, ``evaluate``, ``baseline``, ``inspect``,
``report``.

Arguments are parsed and checked -- budgets, spaces, recipes, output folders, devices, storage
URLs -- before torch or a model is imported, so a mistake is reported in a moment. Errors are one
line (``--debug`` shows the traceback); the exit code is 2 for bad input, 1 for a failure while
running, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ._errors import AutoquantError, InputError

COMMANDS = ("search", "apply", "evaluate", "baseline", "inspect", "report")


# -- checks that need no model -----------------------------------------------------------------
def _writable_folder(path: str, what: str) -> Path:
    """``path`` as a folder we can write into: created if missing, and a file written there
    and removed (the only test that holds for root, read-only mounts and full disks)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {path}: a file is in the way; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".autoquant-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} {path}: cannot write there ({e.strerror or e}); pick another "
                         f"folder") from None
    return p


def _writable_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{what} {path}: a folder is in the way; give a file name")
    _writable_folder(str(p.parent), what)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _check_device(spec: str | None) -> None:
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {spec!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is visible on this machine; leave "
                             f"out --device to run on the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"--device {spec}: autoquant runs on cpu or cuda")


def _settings(args, prompt_set: str):
    from .settings import EvalSettings

    return EvalSettings.for_model(args.model, prompt_set, args.prompts, args.seeds, args.steps,
                                  args.guidance, args.size, args.batch_size)


def _clip(args, device):
    if args.no_clip:
        return None
    from .builtin_models import default_clip
    from .clip import load_clip

    spec = args.clip or default_clip(args.model)
    if spec is None:
        raise InputError(f"no default CLIP for {args.model}: pass --clip ARCH/TAG (e.g. "
                         f"ViT-B-32/laion2b_s34b_b79k), a local ARCH/checkpoint, or --no-clip")
    return load_clip(spec, device)


def _load(args):
    from .pipelines import load_pipeline

    return load_pipeline(args.model, dtype=args.dtype, revision=args.revision,
                         device=getattr(args, "device", None))


# -- commands ----------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    import torch

    from ._format import human_bytes, table
    from .backends import get_backend, methods
    from ._inventory import inventory

    device = torch.device(args.device or "cpu")
    pipe = _load(args)
    inv = inventory(pipe)
    data = inv.to_dict()
    configs = [c for m in methods() for c in get_backend(m).configs()]
    not_here = {c.label: r for c in configs
                if (r := get_backend(c.method).unavailable_reason(c, device))}
    data["unavailable_here"] = not_here
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    rows = []
    for layer in data["layers"]:
        unusable = sorted(set(layer["unusable"]) - set(not_here))
        rows.append([layer["name"], "x".join(map(str, layer["shape"])), f"{layer['params']:,}",
                     human_bytes(layer["bytes"]),
                     "all" if not unusable else "not: " + ", ".join(unusable)])
    if not args.totals_only:
        print(table(rows, ["layer", "shape", "params", "bytes", "configs it can take"]))
        print()
    comp_rows = [[name, str(c["linear_layers"]), f"{c['linear_params']:,}",
                  human_bytes(c["linear_bytes"]), f"{c['params']:,}", human_bytes(c["bytes"])]
                 for name, c in data["components"].items()]
    print(table(comp_rows, ["component", "Linear layers", "Linear params", "Linear bytes",
                            "all params", "all bytes"]))
    print(f"\nfingerprint {data['fingerprint']}; {len(rows)} quantizable layers. 'all' = every "
          f"config that runs on {device.type}; 'not: ...' lists the configs a layer's shape "
          f"cannot take (--json gives the reasons).")
    if not_here:
        print(f"cannot run on {device.type} at all: " +
              "; ".join(f"{k} ({v})" for k, v in not_here.items()))
    return 0


def cmd_apply(args) -> int:
    from .apply import apply_recipe
    from .persist import save_quantized
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)  # validated before any model is loaded
    if args.save:
        _writable_folder(args.save, "--save")
    if args.prompt:
        _writable_file(args.out, "--out")
    _check_device(args.device)
    pipe = _load(args)
    summary = apply_recipe(pipe, recipe, device=args.device, progress=not args.json)
    result = {"summary": summary.to_dict()}
    if args.compile:
        from .apply import compile_pipeline

        result["compiled"] = compile_pipeline(pipe)
    if args.save:
        result["saved"] = str(save_quantized(pipe, args.save))
    if args.prompt:
        import torch

        from .builtin_models import generation_defaults

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


def cmd_evaluate(args) -> int:
    from .evaluator import Evaluator
    from .recipe import load_recipe
    from .references import ReferenceCache

    recipe = load_recipe(args.recipe) if args.recipe else None  # validated before loading
    settings = _settings(args, args.prompt_set)
    if args.cache_dir:
        _writable_folder(args.cache_dir, "--cache-dir")
    _check_device(args.device)
    pipe = _load(args)
    if args.device:
        pipe.to(args.device)
    clip = _clip(args, args.device or "cpu")
    evaluator = Evaluator(pipe, settings, clip=clip, components=args.components,
                          cache=ReferenceCache(args.cache_dir) if args.cache_dir else None,
                          progress=not args.json, compile=args.compile)
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
    import yaml

    from ._format import human_bytes
    from .backends import config_from_dict
    from .baseline import baseline_recipe
    from .evaluator import default_components
    from ._inventory import inventory

    entry = {"method": args.method}
    if args.bits is not None:
        entry["bits"] = args.bits
    for option in args.options or []:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise InputError(f"--options takes key=value pairs, got {option!r}")
        entry[key] = yaml.safe_load(value)
    try:
        config = config_from_dict(entry)
    except TypeError as e:  # a dataclass given a value it cannot hold
        raise InputError(f"--method {args.method}: {e}") from None
    _writable_file(args.out, "--out")
    pipe = _load(args)
    inv = inventory(pipe)
    components = args.components or default_components(pipe)
    from ._state import source_of

    source = source_of(pipe)
    recipe = baseline_recipe(inv, config, components, args.protect,
                             model=source.to_dict() if source else None)
    plan = recipe.resolve(inv)
    path = recipe.save(args.out)
    layers = [l for l in inv if l.component in components]
    fp = sum(l.weight_params for l in layers if l.name not in plan.configs
             or plan.configs[l.name].full_precision)
    total = sum(l.weight_params for l in layers)
    info = {"recipe": str(path), "config": config.to_dict(), "components": components,
            "layers": len(layers), "protected": sum(1 for c in plan.configs.values()
                                                    if c.full_precision),
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


def _stop_on_signals():
    """Ctrl-C or SIGTERM: finish the current trial, write the outputs, stop. A second Ctrl-C
    stops at once (the running trial is recorded as interrupted)."""
    import signal
    import threading

    stop = threading.Event()

    def handler(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{signal.Signals(signum).name}: stopping after the current trial "
              f"(Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return stop, previous


def _devices(spec: str) -> list[str]:
    """``--devices cuda:0,cuda:1`` (any device, repeated for several workers on one) or ``all``
    (every CUDA GPU here)."""
    if spec == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise InputError("--devices all: no CUDA GPU is visible on this machine")
        return [f"cuda:{i}" for i in range(n)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise InputError(f"--devices {spec!r}: list devices, e.g. cuda:0,cuda:1, or say all")
    for d in devices:
        _check_device(d)
    return devices


def _precheck(args, storage, space, settings) -> None:
    """Joining a study with other settings is refused before any model is loaded."""
    from .builtin_models import default_clip
    from .pipelines import dtype_name, parse_dtype
    from .search._study import default_study_name, precheck

    clip = None if args.no_clip else (args.clip or default_clip(args.model))
    mine = settings.to_dict()
    mine.pop("batch_size")
    precheck(storage, default_study_name(args.model, args.budget, args.study), {
        "model": args.model, "budget": str(args.budget), "space": space.to_dict(),
        "objectives": [o for o in space.objectives if o != "clip_fidelity" or clip],
        "settings": mine, "clip": clip,
        "dtype": dtype_name(parse_dtype(args.dtype, args.device or
                                        (args.devices or "cpu").split(",")[0]))})


def cmd_search(args) -> int:
    from .space import load_space, parse_budget

    parse_budget(args.budget)  # a malformed budget fails before anything loads
    space = load_space(args.space, allow_fp_cap_above_default=args.allow_fp_cap)
    settings = _settings(args, "search")
    out = _writable_folder(args.out, "--out")
    if args.artifacts:
        _writable_folder(args.artifacts, "--artifacts")
    if args.devices and args.device:
        raise InputError("give --device (this process) or --devices (one worker each), not both")
    devices = _devices(args.devices) if args.devices else None
    _check_device(args.device)
    from .search import Search, SearchConfig, run_search
    from .search._study import open_storage

    storage = open_storage(args.storage, out)  # a bad URL or a missing driver: said now
    _precheck(args, storage, space, settings)
    if devices:
        from .search._workers import run_workers

        return run_workers(args, devices, out)
    pipe = _load(args)
    clip = _clip(args, args.device or "cpu")
    cfg = SearchConfig(model=args.model, budget=args.budget, space=space, trials=args.trials,
                       timeout=args.timeout, storage=args.storage, study=args.study, out=out,
                       device=args.device, resume=args.resume, seed=args.seed, settings=settings,
                       clip=clip, progress=not args.json,
                       cache_bytes=None if args.cache_gib is None else args.cache_gib * 2**30,
                       sensitivity=args.sensitivity, artifacts=args.artifacts,
                       latency=args.latency, latency_mode=args.latency_mode)
    search = Search(cfg, pipe)
    stop, previous = _stop_on_signals()
    try:
        report = run_search(search, stop)
    finally:
        import signal

        for s, h in previous.items():
            signal.signal(s, h)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1, default=str))
        return 0
    _print_search(args, search, report)
    return 0


def _print_search(args, search, report) -> None:
    from ._format import human_bytes
    from .settings import prompt_set

    t = report["trials"]
    parts = [f"{t['complete']} complete", f"{t['pruned']} pruned", f"{t['fail']} failed"]
    if t.get("running"):
        parts.append(f"{t['running']} still running elsewhere")
    if t.get("waiting"):
        parts.append(f"{t['waiting']} queued")
    print(f"budget {args.budget} = {human_bytes(search.budget_bytes)} of the searched components "
          f"({', '.join(search.groups.components)}; full precision {human_bytes(search.fp_bytes)});"
          f" {len(search.groups.groups)} groups; trials: {', '.join(parts)}")
    for f in report["failed"]:
        print(f"  trial {f['trial']} failed: {f['reason']}")
    print(report["table"])
    if "best" in report:
        b = report["best"]
        scores = ", ".join(f"step {b[k] * 1e3:.2f} ms" if k == "latency" else f"{k} {b[k]:.4g}"
                           for k in search.objectives[1:])
        print(f"\nbest within budget: trial {b['trial']}, {human_bytes(b['bytes'])} "
              f"(whole pipeline {human_bytes(b['pipeline_bytes'])}), {scores}")
        prompt = prompt_set(args.model, "holdout")[-1]
        print(f"recipe: {b['recipe']}\napply it: autoquant apply --model {args.model} "
              f"--recipe {b['recipe']} --prompt \"{prompt}\" --out image.png")
    else:
        print("no trial finished within the budget")


def cmd_report(args) -> int:
    from . import explore

    if args.out is None and args.storage is None:
        raise InputError("give the search's --out folder, or --storage URL --study NAME")
    html = Path(args.html) if args.html else Path(args.out or ".") / "report.html"
    _writable_file(str(html), "--html")
    view = explore.open_study(args.out, args.storage, args.study, args.artifacts)
    path = explore.write_report(view, html)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, self-contained: opens offline)")
    return 0


# -- the parser --------------------------------------------------------------------------------
def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="built-in name (demo, tiny-flux, tiny-sd), local diffusers folder, or hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype; auto: bfloat16 on a GPU or a CPU with bf16 instructions, "
                        "float32 on other CPUs (where bf16 is emulated and ~5x slower)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")


def _add_eval_options(p: argparse.ArgumentParser, prompt_set: bool = True,
                      batch_size: int = 8) -> None:
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts file, one prompt per line (default: the model's built-in set)")
    if prompt_set:
        p.add_argument("--prompt-set", default="holdout", choices=["search", "holdout"],
                       help="built-in prompt set when --prompts is not given (default holdout)")
    p.add_argument("--seeds", type=_seed, nargs="+", default=None,
                   help="one image per prompt and seed (default: the set's seeds)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (model default)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (model default)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="image height and width in pixels")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size,
                   help=f"images generated at once (default {batch_size}; never changes an image)")
    p.add_argument("--clip", default=None,
                   help="CLIP for fidelity: demo, ARCH/TAG or ARCH/checkpoint (default: the model's)")
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP metrics")
    p.add_argument("--device", default=None, help="run on this device: cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="autoquant",
        description="Per-layer, cross-backend quantization of diffusion pipelines.")
    parser.add_argument("--version", action="version", version=f"autoquant {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and the libraries' own messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("search", help="search per-layer plans under a memory budget")
    _add_model(p)
    p.add_argument("--budget", required=True,
                   help="bytes of the searched components (6GB, 5.5GiB), a share of full "
                        "precision (35%%) or bits per weight (4.25bpw)")
    p.add_argument("--space", default="default",
                   help="search space: default, hqq-only, low-bit, flux, sd3, sdxl, or a YAML file")
    p.add_argument("--allow-fp-cap", action="store_true",
                   help="allow a space's fp_cap above 0.20")
    p.add_argument("--trials", type=_positive_int, default=30,
                   help="trials the study should hold in total, over every worker (default 30)")
    p.add_argument("--timeout", type=_positive_float, default=None,
                   help="stop this worker after this many seconds")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by the workers (default: SQLite in --out); "
                        "postgresql://user@host/db needs pip install \"autoquant[postgres]\"")
    p.add_argument("--study", default=None,
                   help="study name (default: autoquant-MODEL-BUDGET); a worker with the same "
                        "settings joins it")
    p.add_argument("--out", default="autoquant-search",
                   help="folder for study.db, artifacts, best.yaml, pareto/ and report.json")
    p.add_argument("--artifacts", default=None, metavar="DIR",
                   help="artifact folder every worker of the study can reach (default OUT/artifacts)")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="one worker process per device on this machine, sharing the study: "
                        "cuda:0,cuda:1,... or all")
    p.add_argument("--resume", action="store_true",
                   help="continue a study that must exist (without it, an existing study with "
                        "the same settings is joined or continued anyway)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the proposals (default 0)")
    _add_eval_options(p, prompt_set=False, batch_size=20)
    p.add_argument("--sensitivity", default="auto", choices=["auto", "full", "anchored"],
                   help="full: replay the denoiser for every (layer group, config); anchored: "
                        "once per group (12x fewer on the demo, plans as good); auto: full if it takes <= 30 s")
    p.add_argument("--latency", default=None, metavar="LIMIT",
                   help="search step time too, within LIMIT: 1.0x (full precision's step) or "
                        "150ms; a space with a latency objective searches it without a limit")
    p.add_argument("--latency-mode", default="eager", choices=["eager", "compile"],
                   help="time steps as deployed: eager, or under torch.compile")
    p.add_argument("--cache-gib", type=_positive_float, default=None,
                   help="GiB the quantized-layer cache may hold (default: half the free memory)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("apply", help="apply a recipe to a pipeline")
    _add_model(p)
    p.add_argument("--recipe", required=True, help="recipe YAML (format autoquant-recipe/1)")
    p.add_argument("--device", default=None,
                   help="quantize layer by layer onto this device (cpu, cuda, cuda:N)")
    p.add_argument("--save", default=None, help="save the quantized pipeline to this folder")
    p.add_argument("--compile", action="store_true",
                   help="run the denoiser under torch.compile (faster steps after a first slow one)")
    p.add_argument("--prompt", default=None, help="generate one image with this prompt")
    p.add_argument("--out", default="autoquant.png", help="where the image goes")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (model default)")
    p.add_argument("--size", type=_positive_int, default=None, help="image height and width")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the image's noise")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("evaluate", help="score a recipe's images against full precision")
    _add_model(p)
    p.add_argument("--recipe", default=None, help="recipe to evaluate (default: full precision)")
    _add_eval_options(p)
    p.add_argument("--components", nargs="+", default=None,
                   help="components whose bytes count (default: the denoiser)")
    p.add_argument("--compile", action="store_true",
                   help="generate with the denoiser under torch.compile (as deployed)")
    p.add_argument("--cache-dir", default=None,
                   help="reference image cache (default $AUTOQUANT_CACHE/references)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("baseline", help="write a uniform recipe (one config for every layer)")
    _add_model(p)
    p.add_argument("--method", required=True, choices=["hqq", "bnb", "torchao", "higgs", "none"],
                   help="quantization method")
    p.add_argument("--bits", type=_positive_int, default=None,
                   help="bits (the method's default if absent)")
    p.add_argument("--options", nargs="*", default=None, metavar="KEY=VALUE",
                   help="method options (group_size=128 type=fp4 ...)")
    p.add_argument("--protect", default="none", choices=["none", "default"],
                   help="default: keep embedders and the final projection in full precision")
    p.add_argument("--components", nargs="+", default=None, help="default: the denoiser")
    p.add_argument("--out", required=True, help="where the recipe goes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("inspect", help="list the quantizable layers of a pipeline")
    _add_model(p)
    p.add_argument("--device", default=None, help="say which configs run on this device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--totals-only", action="store_true", help="only the per-component totals")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="write a self-contained HTML report of a search")
    p.add_argument("--out", default=None, help="the search's --out folder")
    p.add_argument("--storage", default=None, help="or an Optuna storage URL ...")
    p.add_argument("--study", default=None, help="... and the study name")
    p.add_argument("--artifacts", default=None, help="artifact folder (default OUT/artifacts)")
    p.add_argument("--html", default=None, help="where the report goes (default OUT/report.html)")
    p.set_defaults(func=cmd_report)
    return parser


@contextlib.contextmanager
def _stdout_is_ours(debug: bool):
    """While a command runs, file descriptor 1 goes to /dev/null (stderr with --debug) and
    Python's ``sys.stdout`` to the real stdout: native code that prints there (HiGHS' solver
    notes) cannot corrupt ``--json`` output or the tables. The command line only: the library
    never touches descriptors."""
    try:
        sys.stdout.flush()
        if sys.stdout.fileno() != 1:
            raise ValueError("stdout is not descriptor 1")
        real = os.dup(1)
    except (OSError, ValueError, AttributeError):  # stdout is captured or redirected in-process
        yield
        return
    sink = os.open(os.devnull, os.O_WRONLY) if not debug else os.dup(2)
    saved_stdout = sys.stdout
    os.dup2(sink, 1)
    sys.stdout = os.fdopen(os.dup(real), "w", buffering=1)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout.close()
        sys.stdout = saved_stdout
        os.dup2(real, 1)
        os.close(real)
        os.close(sink)


def main(argv: list[str] | None = None) -> int:
    # Quantized layers are many mid-sized tensors; the default CUDA allocator hands out whole
    # blocks when the remainder is < 1 MiB, which costs 2-4% over the bytes the tensors hold
    # (bench/flux_scale.py). Expandable segments split at 512 B. A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from ._quiet import quiet_libraries

    quiet_libraries(args.debug)
    try:
        with _stdout_is_ours(args.debug):
            return args.func(args)
    except AutoquantError as e:
        if args.debug:
            raise
        print(f"autoquant {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"autoquant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``autoquant`` command line: ``search``, ``apply``, ``evaluate``, ``baseline``, ``inspect``,
``report``.

Arguments are parsed and checked -- budgets, spaces, recipes, output folders, devices, storage
URLs -- before torch or a model is imported, so a mistake is reported in a moment. Errors are one
line (``--debug`` shows the traceback); the exit code is 2 for bad input, 1 for a failure while
running, 130 after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .._errors import AutoquantError, InputError
from .checks import check_device, devices_list, image_format, writable_file, writable_folder
from .parser import build_parser

COMMANDS = ("search", "apply", "evaluate", "baseline", "inspect", "report", "export")


# -- checks that need no model -----------------------------------------------------------------
def _settings(args, prompt_set: str):
    from ..generation.settings import EvalSettings

    return EvalSettings.for_model(args.model, prompt_set, args.prompts, args.seeds, args.steps,
                                  args.guidance, args.size, args.batch_size)


def _clip(args, device):
    if args.no_clip:
        return None
    from ..models.builtin import default_clip
    from ..scoring.clip import load_clip

    spec = args.clip or default_clip(args.model)
    if spec is None:
        raise InputError(f"no default CLIP for {args.model}: pass --clip ARCH/TAG (e.g. "
                         f"ViT-B-32/laion2b_s34b_b79k), a local ARCH/checkpoint, or --no-clip")
    return load_clip(spec, device)


def _load(args):
    from ..models.pipelines import load_pipeline

    return load_pipeline(args.model, dtype=args.dtype, revision=args.revision,
                         device=getattr(args, "device", None))


# -- commands ----------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    import torch

    from .._format import human_bytes, table
    from ..backends import get_backend, methods
    from ..models.inventory import inventory

    if args.methods or args.spaces:
        return _inspect_registry(args)
    if not args.model:
        raise InputError("inspect needs --model MODEL (a built-in name, a folder or a hub id), "
                         "or --methods / --spaces")
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


def _inspect_registry(args) -> int:
    """``inspect --methods`` / ``--spaces``: what the backend registry and the shipped spaces
    hold, read from them (nothing here knows a method by name)."""
    from .._format import table
    from ..backends import describe
    from ..search.space import load_space, spaces

    data = {}
    if args.methods:
        data["methods"] = describe()
    if args.spaces:
        data["spaces"] = {name: [c.label for c in load_space(name).candidates]
                          for name in spaces()}
    if args.json:
        print(json.dumps(data, indent=1, default=str))
        return 0
    if args.methods:
        rows = [[m["method"], ", ".join(f"{k}={v['default']}" for k, v in m["fields"].items()),
                 m["package"] or "-", m["version"] or ("not installed" if m["package"] else "-"),
                 {True: "yes", False: "no"}.get(m["calibrated"], m["calibrated"]),
                 ", ".join(sorted({f for fs in m["formats"].values() for f in fs}))]
                for m in data["methods"]]
        print(table(rows, ["method", "options (defaults)", "package", "version", "calibrates",
                           "exports to"]))
    if args.spaces:
        if args.methods:
            print()
        print(table([[n, ", ".join(c)] for n, c in data["spaces"].items()],
                    ["space", "candidates"]))
    return 0


def cmd_apply(args) -> int:
    from ..plans.apply import apply_recipe
    from ..plans.persist import save_quantized
    from ..plans.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # validated before any model is loaded
    if args.compile_mode != "default" and not args.compile:
        raise InputError("--compile-mode applies with --compile")
    if args.attention:
        from ..runtime.attention import backend_value

        backend_value(args.attention, args.device)
    if args.save:
        writable_folder(args.save, "--save")
    if args.prompt:
        writable_file(args.out, "--out")
    check_device(args.device)
    pipe = _load(args)
    summary = apply_recipe(pipe, recipe, device=args.device, progress=not args.json)
    result = {"summary": summary.to_dict()}
    if args.attention:  # before --compile, which traces the kernel chosen
        from ..runtime.attention import set_attention

        set_attention(pipe, args.attention)
        result["attention"] = args.attention
    if args.compile:
        from ..runtime.compile import compile_pipeline

        result["compiled"] = compile_pipeline(pipe, mode=args.compile_mode)
    if args.save:
        result["saved"] = str(save_quantized(pipe, args.save))
    if args.prompt:
        import torch

        from ..models.builtin import generation_defaults

        kwargs = generation_defaults(args.model)
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
        if args.steps:
            kwargs["num_inference_steps"] = args.steps
        if args.size:
            kwargs.update(height=args.size, width=args.size)
        image = pipe(args.prompt, **kwargs).images[0]
        out = Path(args.out)
        from .. import _atomic

        with _atomic.atomic_path(out) as tmp:
            image.save(tmp, format=image_format(out))
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


def cmd_export(args) -> int:
    from ..plans.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # validated before any model loads
    if args.push_to_hub:
        from ..export.hub import check_repo_id

        check_repo_id(args.push_to_hub)
    elif args.private:
        raise InputError("--private applies with --push-to-hub")
    if not args.model:
        args.model = (recipe.model or {}).get("id")
        if not args.model:
            raise InputError("the recipe names no model: give --model")
    if args.format == "diffusers":
        return _export_diffusers(args, recipe)
    if args.format == "comfy":
        return _export_comfy(args, recipe)
    return _export_gguf(args, recipe)


def _pushed(args, info: dict) -> dict | None:
    """``--push-to-hub``: upload what was written (``info["path"]``) with its card."""
    if not args.push_to_hub:
        return None
    from ..export.hub import push_to_hub

    info["hub"] = push_to_hub(info["path"], args.push_to_hub, private=args.private)
    return info["hub"]


def _export_gguf(args, recipe) -> int:
    if args.device:
        raise InputError("--device applies to --format diffusers (a GGUF file is quantized "
                         "on the CPU)")
    from ..export.gguf import export_gguf

    writable_file(args.out, "--out")
    pipe = _load(args)
    names = args.names or ("bfl" if type(getattr(pipe, args.component, None)).__name__
                           == "FluxTransformer2DModel" else "diffusers")
    info = export_gguf(pipe, recipe, args.out, component=args.component, names=names,
                       requantize=args.requantize, progress=not args.json)
    info["card"] = _gguf_card(args, pipe, recipe, names)
    hub = _pushed(args, info)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    from .._format import human_bytes

    for layer, how in info["requantized"].items():
        print(f"mapped {layer}: {how}")
    types = ", ".join(f"{n} {k}" for k, n in sorted(info["types"].items()))
    print(f"wrote {info['path']}: {human_bytes(info['bytes'])}, {info['tensors']} tensors "
          f"({types}), {names} names")
    if names == "diffusers":
        print("load it with diffusers: FluxTransformer2DModel.from_single_file(path, "
              "quantization_config=GGUFQuantizationConfig(...), config=...); score it with "
              f"autoquant evaluate --model {args.model} --gguf {info['path']}")
    print(f"model card: {info['card']}" if info["card"] else
          "model card not written: the folder has a README.md autoquant did not write")
    if hub:
        print(f"uploaded {len(hub['files'])} file(s) to {hub['url']}")
    return 0


def _gguf_card(args, pipe, recipe, names: str) -> str | None:
    """The card beside a GGUF file: ``README.md`` of its folder, unless that folder has one
    autoquant did not write (returns the card's path, or None)."""
    from ..export.card import card_beside, write_card
    from ..export.gguf import FORMAT as GGUF
    from ..models.builtin import stock_generation

    card = card_beside(args.out)
    if card is None:
        return None
    folder = card.parent
    file = Path(args.out).name
    cls = type(getattr(pipe, args.component)).__name__
    call = "".join(f", {k}={v!r}" for k, v in stock_generation(args.model).items())
    snippet = [f"# ComfyUI: copy {file} to models/unet and load it with ComfyUI-GGUF's "
               f"'Unet Loader (GGUF)'; stable-diffusion.cpp: --diffusion-model {file}"] \
        if names == "bfl" else [f"# diffusers names: for diffusers only (ComfyUI-GGUF refuses "
                                f"such files)"]
    snippet += ["import torch",
                f"from diffusers import DiffusionPipeline, {cls}, GGUFQuantizationConfig", "",
                f"{args.component} = {cls}.from_single_file(",
                f"    {file!r}, quantization_config=GGUFQuantizationConfig("
                f"compute_dtype=torch.bfloat16),",
                f"    torch_dtype=torch.bfloat16)  # add config=<the base model's {args.component}"
                f" folder> offline",
                f"pipe = DiffusionPipeline.from_pretrained({str(args.model)!r}, "
                f"{args.component}={args.component}, torch_dtype=torch.bfloat16)",
                f"image = pipe(\"a prompt\"{call}).images[0]"]
    command = (f"autoquant evaluate --model {args.model} --gguf {args.out}" if names == "diffusers"
               else f"autoquant export --recipe {args.recipe} --format {GGUF} --names diffusers "
                    f"--out scored.{GGUF} && autoquant evaluate --model {args.model} --gguf "
                    f"scored.{GGUF}")
    write_card(folder, pipe, recipe, library=GGUF, fmt=GGUF, snippet="\n".join(snippet),
               command=command, with_recipe=False)
    return str(card)


def _score_export(args, pipe, settings, component: str, loaded, info: dict, device: str,
                  **replaced) -> tuple[dict, tuple]:
    """The held-out fidelity of an export (``loaded``: its ``component`` as its consumer loads
    it), for its card; sets ``info["fidelity"]``. Returns (fidelity, (references, images))."""
    from ..scoring.evaluator import Evaluator, evaluate_replaced

    evaluator = Evaluator(pipe, settings, clip=_clip(args, device), components=[component],
                          progress=not args.json)
    result = evaluate_replaced(evaluator, component, loaded, Path(args.out).name, **replaced)
    fidelity = {**result.to_dict(), "images": result.images}
    info["fidelity"] = {k: fidelity[k] for k in ("psnr", "psnr_worst", "ssim",
                                                 "clip_fidelity", "images") if k in fidelity}
    return fidelity, (evaluator.references, evaluator.last_images)


def _print_fidelity(what: str, info: dict) -> None:
    if "fidelity" in info:
        f = info["fidelity"]
        print(f"held-out fidelity of {what}: PSNR {f['psnr']:.2f} dB"
              + (f", SSIM {f['ssim']:.4f}" if "ssim" in f else "")
              + (f", CLIP fidelity {f['clip_fidelity']:.4f}" if "clip_fidelity" in f else ""))


def _export_comfy(args, recipe) -> int:
    from .._format import human_bytes
    from ..export.card import card_beside, write_card
    from ..export.comfy import comfy_snippet, export_comfy, linear_bytes, load_comfy, requirement

    if args.names or args.requantize or args.device:
        raise InputError("--names, --requantize and --device do not apply to --format comfy "
                         "(BFL names, made on the CPU)")
    writable_file(args.out, "--out")
    settings = None if args.no_score else _settings(args, args.prompt_set)
    pipe = _load(args)
    # its plan's refusals come before anything is made or written
    info = export_comfy(pipe, recipe, args.out, component=args.component,
                        target=args.comfy_target, progress=not args.json)
    fidelity, images = None, None
    if settings is not None:  # the card's fidelity: the file as ComfyUI's layouts read it
        loaded = load_comfy(args.out, pipe, args.component)
        fidelity, images = _score_export(args, pipe, settings, args.component, loaded, info,
                                         "cpu", linear_bytes=linear_bytes(args.out, loaded))
    card = card_beside(args.out)
    info["card"] = None
    if card is not None:
        command = (f"autoquant evaluate --model {args.model} --comfy {args.out} "
                   f"--prompt-set {args.prompt_set}")
        write_card(card.parent, pipe, recipe, library="comfyui", fmt="comfy",
                   snippet=comfy_snippet(Path(args.out).name), fidelity=fidelity,
                   command=command, images=images, with_recipe=False,
                   requires=requirement(info["comfyui"]), near=len(info["near_exact"]))
        info["card"] = str(card)
    hub = _pushed(args, info)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for layer, how in info["near_exact"].items():
        print(f"mapped {layer}: {how}")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["formats"].items()))
    print(f"wrote {info['path']}: {human_bytes(info['bytes'])}, {info['tensors']} tensors "
          f"({kinds} quantized), BFL names; loads in {requirement(info['comfyui'])}")
    _print_fidelity("the file as ComfyUI's layouts read it", info)
    print(f"model card: {info['card']}" if info["card"] else
          "model card not written: the folder has a README.md autoquant did not write")
    if hub:
        print(f"uploaded {len(hub['files'])} file(s) to {hub['url']}")
    return 0


def _export_diffusers(args, recipe) -> int:
    from .._format import human_bytes
    from ..export.card import write_card
    from ..export.diffusers import check_replaceable, export_diffusers, load_component
    from ..export.gguf import FORMAT as GGUF
    from ..models.builtin import stock_generation

    if args.names or args.requantize or args.component != "transformer":
        raise InputError(f"--names, --requantize and --component apply to --format {GGUF}; "
                         f"the diffusers format writes every component")
    writable_folder(str(Path(args.out).resolve().parent), "--out")
    check_replaceable(Path(args.out))  # before any model loads
    settings = None if args.no_score else _settings(args, args.prompt_set)
    check_device(args.device)
    pipe = _load(args)
    info = export_diffusers(pipe, recipe, args.out, device=args.device,
                            progress=not args.json, call=stock_generation(args.model))
    if settings is not None:  # the card's fidelity: the folder as diffusers loads it
        from ..scoring.evaluator import default_components

        name = default_components(pipe)[0]
        loaded = load_component(args.out, name, pipe.components[name])
        fidelity, images = _score_export(args, pipe, settings, name, loaded, info,
                                         args.device or "cpu")
        command = (f"autoquant evaluate --model {args.model} --diffusers {args.out} "
                   f"--prompt-set {args.prompt_set}")
        write_card(Path(args.out), pipe, recipe, library="diffusers", fmt="diffusers",
                   snippet=info["snippet"], fidelity=fidelity, command=command,
                   images=images)
    hub = _pushed(args, info)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for name, c in info["components"].items():
        if c["layers"]:
            print(f"{name}: {c['layers']} quantized layers ({c['how']}), "
                  f"{human_bytes(c['bytes'])}")
    _print_fidelity("the folder as diffusers loads it", info)
    print(f"wrote {info['path']}: {info['pipeline']} folder, {human_bytes(info['bytes'])}, "
          f"with its model card (README.md). Load it with diffusers:\n{info['snippet']}")
    if hub:
        print(f"uploaded {len(hub['files'])} file(s) to {hub['url']}")
    return 0


def cmd_evaluate(args) -> int:
    from ..plans.recipe import load_recipe
    from ..scoring.evaluator import Evaluator, evaluation_memory
    from ..scoring.references import ReferenceCache

    if sum(bool(x) for x in (args.gguf, args.recipe, args.diffusers, args.comfy)) > 1:
        raise InputError("give only one of --recipe, --gguf, --diffusers and --comfy")
    if args.comfy and not Path(args.comfy).is_file():
        raise InputError(f"--comfy {args.comfy}: no such file")
    if args.diffusers and not Path(args.diffusers).is_dir():
        raise InputError(f"--diffusers {args.diffusers}: no such folder")
    if args.gguf and not Path(args.gguf).is_file():
        raise InputError(f"--gguf {args.gguf}: no such file")
    recipe = load_recipe(args.recipe) if args.recipe else None  # validated before loading
    settings = _settings(args, args.prompt_set)
    if args.cache_dir:
        writable_folder(args.cache_dir, "--cache-dir")
    gpu_memory = _gpu_memory(args)
    check_device(args.device)
    pipe = _load(args)
    memory = None
    if gpu_memory is not None:
        memory = evaluation_memory(pipe, args.device, gpu_memory, recipe, args.components)
    elif args.device:
        pipe.to(args.device)
    loaded = None
    if args.gguf:  # read and checked before any image is made
        from ..export.gguf import load_gguf
        from ..scoring.evaluator import default_components

        loaded = load_gguf(args.gguf, pipe, (args.components or default_components(pipe))[0])
    elif args.diffusers:
        from ..export.diffusers import load_component
        from ..scoring.evaluator import default_components

        name = (args.components or default_components(pipe))[0]
        loaded = load_component(args.diffusers, name, pipe.components[name])
    elif args.comfy:
        from ..export.comfy import load_comfy
        from ..scoring.evaluator import default_components

        loaded = load_comfy(args.comfy, pipe, (args.components or default_components(pipe))[0])
    clip = _clip(args, args.device or "cpu")
    evaluator = Evaluator(pipe, settings, clip=clip, components=args.components,
                          cache=ReferenceCache(args.cache_dir) if args.cache_dir else None,
                          progress=not args.json, compile=args.compile, memory=memory)
    if loaded is not None:
        from ..scoring.evaluator import evaluate_replaced

        extra = {}
        if args.comfy:
            from ..export.comfy import linear_bytes

            extra["linear_bytes"] = linear_bytes(args.comfy, loaded)
        result = evaluate_replaced(evaluator, evaluator.components[0], loaded,
                                   Path(args.gguf or args.diffusers or args.comfy).name, **extra)
    else:
        label = Path(args.recipe).stem if args.recipe else "full precision"
        result = evaluator.evaluate(recipe, label=label)
    if args.json:
        out = result.to_dict()
        out["settings"] = settings.to_dict()
        out["references_generated"] = evaluator.references_generated
        if memory is not None:
            out["memory"] = memory.to_dict()
        print(json.dumps(out, indent=1))
    else:
        print(result.table())
        if memory is not None:
            from .._format import human_bytes

            peaks = memory.to_dict()
            print(f"{memory.describe()}; peak {human_bytes(peaks['peak_allocated_bytes'])} "
                  f"allocated, {human_bytes(peaks['peak_reserved_bytes'])} reserved")
    return 0


def _gpu_memory(args) -> int | None:
    """``--gpu-memory``, checked before any model loads."""
    if getattr(args, "gpu_memory", None) is None:
        return None
    from ..runtime.memory import parse_memory

    if not (args.device or "").startswith("cuda"):
        raise InputError("--gpu-memory bounds a CUDA device's memory: give --device cuda too")
    return parse_memory(args.gpu_memory)


def cmd_baseline(args) -> int:
    import yaml

    from .._format import human_bytes
    from ..backends import config_from_dict
    from ..models.inventory import inventory
    from ..scoring.baseline import baseline_recipe
    from ..scoring.evaluator import default_components

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
    writable_file(args.out, "--out")
    pipe = _load(args)
    inv = inventory(pipe)
    components = args.components or default_components(pipe)
    from ..models.source import source_of

    source = source_of(pipe)
    recipe = baseline_recipe(inv, config, components, args.protect,
                             model=source.to_dict() if source else None)
    plan = recipe.resolve(inv)
    path = recipe.save(args.out)
    layers = [l for l in inv if l.component in components]
    info = {"recipe": str(path), "config": config.to_dict(), "components": components,
            "layers": len(layers), "protected": sum(1 for c in plan.configs.values()
                                                    if c.full_precision),
            "skipped": plan.skipped, "fp_share": plan.fp_share(components),
            "predicted_bytes": plan.linear_bytes(components)}
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


def _precheck(args, storage, space, settings) -> None:
    """Joining a study with other settings is refused before any model is loaded."""
    from ..models.builtin import default_clip
    from ..models.pipelines import dtype_name, parse_dtype
    from ..search._study import default_study_name, precheck

    clip = None if args.no_clip else (args.clip or default_clip(args.model))
    mine = settings.to_dict()
    precheck(storage, default_study_name(args.model, args.budget, args.study), {
        "model": args.model, "budget": str(args.budget), "space": space.to_dict(),
        "objectives": [o for o in space.objectives if o != "clip_fidelity" or clip],
        "settings": mine, "clip": clip,
        "dtype": dtype_name(parse_dtype(args.dtype, args.device or
                                        (args.devices or "cpu").split(",")[0]))})


def cmd_search(args) -> int:
    from ..search.space import load_space, parse_budget

    parse_budget(args.budget)  # a malformed budget fails before anything loads
    space = load_space(args.space, allow_fp_cap_above_default=args.allow_fp_cap)
    if args.export:
        from ..backends import get_backend

        foreign = [c.label for c in space.candidates
                   if args.export not in get_backend(c.method).formats(c)]
        if foreign:
            raise InputError(f"--export {args.export}: a {args.export} file cannot hold the "
                             f"space's {', '.join(foreign)}; search a space of its types "
                             f"(--space {args.export})")
        holders = {get_backend(c.method).formats(c)[args.export] for c in space.candidates
                   if not c.full_precision}
        if args.export == "diffusers" and len(holders) > 1:
            raise InputError(f"--export diffusers: the space mixes methods one diffusers "
                             f"component cannot hold together ({', '.join(sorted(holders))}); "
                             f"search a space of one of them")
    settings = _settings(args, "search")
    out = writable_folder(args.out, "--out")
    if args.artifacts:
        from ..search import _artifacts

        location = _artifacts.normalize(args.artifacts, out)
        if _artifacts.is_remote(location):
            _artifacts.check_available(location)
        else:
            writable_folder(location, "--artifacts")
    if args.devices and args.device:
        raise InputError("give --device (this process) or --devices (one worker each), not both")
    devices = devices_list(args.devices) if args.devices else None
    if args.gpu_memory is not None:
        from ..runtime.memory import parse_memory

        parse_memory(args.gpu_memory)  # malformed: said before anything loads
        if not (args.device or args.devices or "").startswith("cuda") and args.devices != "all":
            raise InputError("--gpu-memory bounds a CUDA device's memory: give --device cuda "
                             "(or --devices) too")
    check_device(args.device)
    from ..search import Search, SearchConfig, run_search
    from ..search._study import open_storage

    storage = open_storage(args.storage, out)  # a bad URL or a missing driver: said now
    _precheck(args, storage, space, settings)
    if devices:
        from ..search._workers import run_workers

        return run_workers(args, devices, out)
    pipe = _load(args)
    clip = _clip(args, args.device or "cpu")
    cfg = SearchConfig(model=args.model, budget=args.budget, space=space, trials=args.trials,
                       timeout=args.timeout, storage=args.storage, study=args.study, out=out,
                       device=args.device, resume=args.resume, seed=args.seed, settings=settings,
                       clip=clip, progress=not args.json,
                       cache_bytes=None if args.cache_gib is None else args.cache_gib * 2**30,
                       sensitivity=args.sensitivity, artifacts=args.artifacts,
                       latency=args.latency, latency_mode=args.latency_mode,
                       gpu_memory=args.gpu_memory)
    search = Search(cfg, pipe)
    stop, previous = _stop_on_signals()
    try:
        report = run_search(search, stop)
    finally:
        import signal

        for s, h in previous.items():
            signal.signal(s, h)
    if args.export and "best" in report:
        report["export"] = _export_best(args, pipe, report["best"]["recipe"])
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1, default=str))
        return 0
    _print_search(args, search, report)
    if "export" in report:
        e = report["export"]
        types = ", ".join(f"{n} {k}" for k, n in sorted(e["types"].items()))
        print(f"exported: {e['path']} ({e['bytes']:,} bytes; {types}; {e['names']} names)")
    return 0


def _export_best(args, pipe, recipe_path: str) -> dict:
    """``search --export``: the best plan as a file (or folder), from the original weights."""
    from ..export.gguf import export_gguf
    from ..plans.recipe import load_recipe

    if args.export == "diffusers":
        from ..export.diffusers import export_diffusers
        from ..models.builtin import stock_generation

        info = export_diffusers(pipe, load_recipe(recipe_path),
                                Path(recipe_path).with_name("best-diffusers"),
                                device=args.device, progress=not args.json,
                                call=stock_generation(args.model))
        return {**info, "types": {c["how"]: c["layers"] for c in info["components"].values()
                                  if c["layers"]}, "names": "diffusers"}

    comp = "transformer"
    names = "bfl" if type(getattr(pipe, comp, None)).__name__ == "FluxTransformer2DModel" \
        else "diffusers"
    out = Path(recipe_path).with_suffix(f".{args.export}")
    return export_gguf(pipe, load_recipe(recipe_path), out, component=comp, names=names,
                       progress=not args.json)


def _print_search(args, search, report) -> None:
    from .._format import human_bytes
    from ..generation.settings import prompt_set

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
    if "memory" in report:
        m = report["memory"]
        print(f"{search.memory.describe()}; peak {human_bytes(m['peak_allocated_bytes'])} "
              f"allocated, {human_bytes(m['peak_reserved_bytes'])} reserved")
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
    from .. import explore

    if args.out is None and args.storage is None:
        raise InputError("give the search's --out folder, or --storage URL --study NAME")
    html = Path(args.html) if args.html else Path(args.out or ".") / "report.html"
    writable_file(str(html), "--html")
    view = explore.open_study(args.out, args.storage, args.study, args.artifacts)
    path = explore.write_report(view, html)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, self-contained: opens offline)")
    return 0


# -- the parser --------------------------------------------------------------------------------
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
    args = build_parser({"search": cmd_search, "apply": cmd_apply, "evaluate": cmd_evaluate,
                         "baseline": cmd_baseline, "inspect": cmd_inspect,
                         "report": cmd_report, "export": cmd_export}).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    verbose = os.environ.get("AUTOQUANT_VERBOSE")
    if args.debug:  # the library's own quieting (imports, loading, generation) off too
        os.environ["AUTOQUANT_VERBOSE"] = "1"
    try:
        return _run(args)
    finally:
        if verbose is None:
            os.environ.pop("AUTOQUANT_VERBOSE", None)
        else:
            os.environ["AUTOQUANT_VERBOSE"] = verbose


def _run(args) -> int:
    from .._paths import cache_dir as check_cache_dir
    from .._quiet import quiet_libraries

    quiet_libraries(args.debug)
    try:
        check_cache_dir()
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
    except Exception as e:  # a machine's fault (disk, network, database): one line, exit 1
        line = _machine_fault(e)
        if line is None or args.debug:
            raise
        print(f"autoquant {args.command}: error: {line}", file=sys.stderr)
        return 1


def _machine_fault(e: BaseException) -> str | None:
    """One line for a fault of the machine rather than of autoquant (None: a bug, re-raised)."""
    import errno

    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        hint = {errno.ENOSPC: "the disk is full: free space or write elsewhere; nothing "
                              "written before was lost",
                errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
                errno.EROFS: "the filesystem is read-only: write elsewhere",
                errno.EACCES: "permission denied: write elsewhere or fix the permissions",
                errno.EFBIG: "the file is too large for this filesystem: write elsewhere"
                }.get(e.errno, "")
        return f"{e.strerror or e}{where}" + (f"; {hint}" if hint else "")
    modules = {type(x).__module__.split(".")[0] for x in type(e).__mro__}
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "sqlalchemy" in modules or "optuna" in modules and "storage" in type(e).__name__.lower():
        return (f"the study's storage failed: {first[:300]} -- check --storage (the database "
                f"is reachable, not damaged, and yours)")
    if "botocore" in modules or "boto3" in modules:
        return (f"the artifact store failed: {first[:300]} -- check --artifacts and the AWS_* "
                f"settings (endpoint, credentials)")
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

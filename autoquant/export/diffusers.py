"""Write a recipe as a diffusers folder: ``DiffusionPipeline.from_pretrained(folder)`` loads it.

The folder names **stock** diffusers and transformers classes only (autoquant's demo pipelines
are subclasses; the folder names the diffusers class they extend), so loading it needs no
autoquant. Each component is written by its own ``save_pretrained``; a component with quantized
layers is made by the consumer's code itself:

- layers of a backend that diffusers quantizes itself (``formats``: ``"diffusers":
  QUANTIZATION_CONFIG``; torchao's ``TorchAoConfig(FqnToConfig({layer: config}))``, one config
  per layer, built by the very function autoquant's layers are built with, so the codes are
  bit-identical to the scored ones) and full-precision ones beside them: the full-precision
  component is staged, loaded back by diffusers with the backend's
  :meth:`~autoquant.backends.Backend.diffusers_config`, and saved with ``safe_serialization``.
- GGUF layers (the denoiser only): the component as one GGUF file with diffusers names
  (:func:`autoquant.export.gguf.export_gguf`) beside its ``config.json``; loaded with
  ``from_single_file(file, config=folder, quantization_config=GGUFQuantizationConfig(...))`` and
  passed to the pipeline's ``from_pretrained`` (the two lines are in the folder's model card).

What one component cannot hold -- layers of other methods, or torchao and GGUF layers mixed --
is refused before anything is written, with the blocking layers and the formats that could hold
them. Quantized layers of a transformers model (a text encoder) are refused too: transformers'
torchao loader did not load its own per-module (``FqnToConfig``) save back (transformers 5.25).
Loading needs ``torch_dtype`` (the model card says which): diffusers' torchao loader takes
bfloat16 when none is given.

The folder is written whole beside the target and swapped in (:func:`autoquant._atomic.
replace_folder`); it also holds ``recipe.yaml`` (the plan) and ``autoquant_export.json`` (what
was written), which mark a folder an export may replace.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__, _atomic
from .card import write_card
from .gguf import FORMAT as GGUF
from .._errors import InputError
from .._progress import tqdm
from ..backends import QUANTIZATION_CONFIG, full_precision, get_backend
from ..models.inventory import components_of, inventory
from ..plans.recipe import Recipe

#: this writer's format, as backends name it in ``Backend.formats``
FORMAT = "diffusers"
RECORD = "autoquant_export.json"
#: how a component's quantized layers are held (``Backend.formats(cfg)["diffusers"]``): diffusers
#: makes them from the backend's quantization config; one GGUF file; as they are
DTYPE = "dtype"
GGUF_FILE = f"diffusion_pytorch_model.{GGUF}"


@dataclasses.dataclass
class ComponentPlan:
    """How one component is written: ``holder`` is ``dtype`` (as it is), the GGUF format, or
    the method whose ``diffusers_config`` diffusers quantizes it with."""
    name: str
    holder: str
    configs: dict[str, Any]  # module path -> QuantConfig of its quantized layers


def stock_class(obj: Any) -> type:
    """The first class of ``obj``'s that diffusers or transformers defines (what a folder may
    name: loading it must not need autoquant)."""
    for cls in type(obj).__mro__:
        if cls.__module__.split(".")[0] in ("diffusers", "transformers", "tokenizers"):
            return cls
    raise InputError(f"{type(obj).__name__} is not a diffusers or transformers class; the "
                     f"diffusers format can only name those")


def _holders_of(cfg) -> dict[str, str]:
    return get_backend(cfg.method).formats(cfg)


def _formats_for(configs) -> list[str]:
    """The export formats that hold every one of ``configs`` exactly."""
    sets = [set(_holders_of(c)) for c in configs]
    return sorted(set.intersection(*sets)) if sets else []


def plan_folder(pipe: Any, recipe: Recipe) -> list[ComponentPlan]:
    """How each component is written; refuses, before anything is written, what one component
    cannot hold (naming the layers and the formats that could hold the plan)."""
    from diffusers import ModelMixin

    comps = components_of(pipe)
    plan = recipe.resolve(inventory(pipe))
    fp = full_precision()
    per: dict[str, dict[str, Any]] = {name: {} for name in comps}
    for layer, cfg in plan.items():
        if not cfg.full_precision:
            per[layer.component][layer.path] = cfg
    out, problems = [], []
    for name, configs in per.items():
        if not configs:
            out.append(ComponentPlan(name, DTYPE, {}))
            continue
        held = {path: _holders_of(c).get(FORMAT) for path, c in configs.items()}
        held = {p: (c.method if held[p] == QUANTIZATION_CONFIG else held[p])
                for p, c in configs.items()}
        kinds = set(held.values())
        if None in kinds:
            blocking = [f"{name}.{p} ({configs[p].label})" for p, h in held.items() if h is None]
            others = _formats_for(list(configs.values()) + [fp])
            could = [f for f in others if f not in ("autoquant-folder", FORMAT)]
            problems.append(
                f"{len(blocking)} layer(s) of {name} use methods diffusers cannot load in one "
                f"component: {'; '.join(blocking[:5])}{' ...' if len(blocking) > 5 else ''}"
                f" (formats that hold this component: "
                f"{', '.join(could) if could else 'no other export format'}; or --format "
                f"{GGUF} --requantize, or search a space of methods diffusers loads: "
                f"autoquant inspect --methods lists each method's formats)")
            continue
        if len(kinds) > 1:
            problems.append(f"{name} mixes {' and '.join(sorted(kinds))} layers, which one "
                            f"diffusers component cannot hold: use one of them per component")
            continue
        holder = kinds.pop()
        module = comps[name]
        if not isinstance(module, ModelMixin):
            problems.append(f"{name} ({type(module).__name__}) has quantized layers, but only "
                            f"diffusers models are written quantized (transformers' loader does "
                            f"not read its own per-layer quantized saves back); keep {name} in "
                            f"full precision (recipe 'components')")
            continue
        if holder == GGUF and not hasattr(type(module), "from_single_file"):
            problems.append(f"{name} ({type(module).__name__}): diffusers loads GGUF files only "
                            f"into models with from_single_file")
            continue
        out.append(ComponentPlan(name, holder, configs))
    if problems:
        raise InputError("the diffusers format cannot hold this plan: " + " | ".join(problems))
    for c in out:
        stock_class(comps[c.name])  # refuses autoquant's own classes before writing
    stock_class(pipe)
    return out


def check_replaceable(directory: Path) -> None:
    """An export replaces the whole folder: refuse one that holds anything but an export."""
    _atomic.recover_folder(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--out {directory} is a file; the diffusers format writes a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / RECORD).is_file():
        raise InputError(f"--out {directory} holds other files; an export replaces the whole "
                         f"folder: give a new or empty folder, or one an export wrote")


def _quantized_component(module: Any, method: str, configs: dict[str, Any], staging: Path,
                         out: Path, device: str | None) -> None:
    """``module`` quantized by diffusers' own loader with ``method``'s quantization config."""
    from .._quiet import quiet_loading

    cls = stock_class(module)
    dtype = next(module.parameters()).dtype
    module.save_pretrained(staging, safe_serialization=True)
    config = get_backend(method).diffusers_config(configs)
    kwargs = {"device_map": {"": device}} if device not in (None, "cpu") else {}
    with quiet_loading():
        quantized = cls.from_pretrained(staging, quantization_config=config,
                                        torch_dtype=dtype, **kwargs)
    try:
        quantized.save_pretrained(out, safe_serialization=True)
    finally:
        del quantized
        shutil.rmtree(staging, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_snippet(directory: str | Path, pipeline: str, plans: list[ComponentPlan],
                 dtype: torch.dtype, call: dict, gpu: bool) -> str:
    """The lines a diffusers user runs to load the folder and make an image."""
    where = str(directory)
    dt = f"torch.{str(dtype).removeprefix('torch.')}"
    gguf = [c for c in plans if c.holder == GGUF]
    quantized = [c for c in plans if c.holder not in (DTYPE, GGUF)]
    lines = ["import torch"]
    if gguf:
        c = gguf[0]
        cls = "FluxTransformer2DModel" if c.name == "transformer" else "<the denoiser's class>"
        lines += [f"from diffusers import {pipeline}, {cls}, GGUFQuantizationConfig", "",
                  f"{c.name} = {cls}.from_single_file(",
                  f"    {where + '/' + c.name + '/' + GGUF_FILE!r}, config={where + '/' + c.name!r},",
                  f"    quantization_config=GGUFQuantizationConfig(compute_dtype={dt}), "
                  f"torch_dtype={dt})",
                  f"pipe = {pipeline}.from_pretrained({where!r}, {c.name}={c.name}, "
                  f"torch_dtype={dt})"]
    else:
        lines += ["from diffusers import DiffusionPipeline", ""]
        if quantized:
            lines.append(f"# needs {', '.join(sorted({c.holder for c in quantized}))} installed;"
                         f" torch_dtype as saved (the quantizer's default differs)")
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({where!r}, torch_dtype={dt})")
    if gpu:
        lines.append("pipe.to(\"cuda\")  # its quantized layers run on a GPU only")
    args = "".join(f", {k}={v!r}" for k, v in call.items())
    lines.append(f"image = pipe(\"a prompt\"{args}).images[0]")
    return "\n".join(lines)


def export_diffusers(pipe: Any, recipe: Recipe, directory: str | Path,
                     device: str | None = None, progress: bool = True,
                     call: dict | None = None) -> dict:
    """Write ``recipe`` applied to ``pipe`` (full precision, untouched) as a diffusers folder at
    ``directory``, with its model card (no fidelity: :func:`autoquant.export.card.write_card`
    adds it once the folder is scored); returns what was written (per component: how, bytes on
    disk). ``call``: the pipeline's call arguments the card's snippet passes."""
    import diffusers

    from .gguf import export_gguf

    plans = plan_folder(pipe, recipe)
    directory = Path(directory)
    check_replaceable(directory)
    comps = components_of(pipe)
    needs_gpu = sorted({cfg.label for c in plans for cfg in c.configs.values()
                        if get_backend(cfg.method).unavailable_reason(cfg, torch.device("cpu"))})
    if needs_gpu and (device in (None, "cpu")):
        raise InputError(f"{', '.join(needs_gpu)} layers are quantized on a GPU only: export "
                         f"with --device cuda")
    pipeline_cls = stock_class(pipe)
    dtype = next(comps[plans[0].name].parameters()).dtype if plans else torch.float32
    for c in plans:
        if c.holder != DTYPE:
            dtype = next(comps[c.name].parameters()).dtype
    from ..models.source import source_of

    source = source_of(pipe)
    model_id = (recipe.model or {}).get("id") or (source.id if source else "<model>")
    index = {"_class_name": pipeline_cls.__name__, "_diffusers_version": diffusers.__version__}
    written: dict[str, dict] = {}
    snippet = load_snippet(directory, pipeline_cls.__name__, plans, dtype, call or {},
                           bool(needs_gpu))

    def write(new: Path) -> None:
        for key, value in pipe.config.items():
            if key.startswith("_"):
                continue
            part = getattr(pipe, key, None)
            if part is None:
                index[key] = [None, None]
                continue
            cls = stock_class(part)
            index[key] = [cls.__module__.split(".")[0], cls.__name__]
        plan_of = {c.name: c for c in plans}
        names = [k for k, v in index.items() if not k.startswith("_") and v[0] is not None]
        for key in tqdm(names, desc="writing components", unit="component",
                        disable=not progress):
            part, target = getattr(pipe, key), new / key
            how = plan_of[key].holder if key in plan_of else DTYPE
            if how == GGUF:
                target.mkdir()
                part.save_config(target)
                info = export_gguf(pipe, recipe, target / GGUF_FILE, component=key,
                                   names="diffusers", progress=progress)
                written[key] = {"types": info["types"]}
            elif how != DTYPE:
                _quantized_component(part, how, plan_of[key].configs, new / f".{key}.staging",
                                     target, device)
            elif hasattr(part, "save_pretrained"):
                kwargs = {"safe_serialization": True} if isinstance(part, nn.Module) else {}
                part.save_pretrained(target, **kwargs)
            else:
                raise InputError(f"{key} ({type(part).__name__}) has no save_pretrained")
            written.setdefault(key, {})
            written[key].update({"how": how, "class": index[key][1],
                                 "layers": len(plan_of[key].configs) if key in plan_of else 0,
                                 "bytes": sum(f.stat().st_size for f in target.rglob("*")
                                              if f.is_file())})
        (new / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_card(new, pipe, recipe, library="diffusers", fmt=FORMAT, snippet=snippet,
                   command=f"autoquant evaluate --model {model_id} --diffusers {directory}")
        for f in new.rglob("*"):  # safetensors writes private (0600) files; a folder to share
            if f.is_file():
                f.chmod(_atomic.FILE_MODE)
        (new / RECORD).write_text(json.dumps(
            {"format": FORMAT, "autoquant": __version__, "diffusers": diffusers.__version__,
             "pipeline": pipeline_cls.__name__, "components": written}, indent=2) + "\n")

    _atomic.replace_folder(directory, write)
    return {"path": str(directory), "pipeline": pipeline_cls.__name__, "snippet": snippet,
            "bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
            "components": written}


def _method_formats(method: str) -> set[str]:
    """The ``diffusers`` values of ``method``'s configs ({} for a name no backend has)."""
    from ..backends import methods

    if method not in methods():
        return set()
    backend = get_backend(method)
    return {backend.formats(c).get(FORMAT) for c in backend.configs()}


def load_component(directory: str | Path, name: str, like: Any) -> Any:
    """Component ``name`` of an exported folder, loaded by diffusers' own code as a user would
    (``from_pretrained``, or ``from_single_file`` for a GGUF component), in ``like``'s class and
    dtype. Checks the folder's record first (untrusted input: nothing in it runs)."""
    from .._quiet import quiet_loading

    directory = Path(directory)
    record = directory / RECORD
    if not record.is_file():
        raise InputError(f"--diffusers {directory}: no {RECORD}; not a folder autoquant export "
                         f"--format diffusers wrote")
    try:
        info = json.loads(record.read_text())
        how = info["components"][name]["how"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"--diffusers {directory}: its {RECORD} names no component {name!r}"
                         ) from None
    cls = stock_class(like)
    dtype = next(like.parameters()).dtype
    if how == GGUF:
        from .gguf import check_file, from_single_file

        path = directory / name / GGUF_FILE
        check_file(path, like)
        return from_single_file(path, like, dtype)
    if not isinstance(how, str) or how != DTYPE and QUANTIZATION_CONFIG not in \
            _method_formats(how):
        raise InputError(f"--diffusers {directory}: component {name} is held as {how!r}, "
                         f"which this version does not read")
    with quiet_loading():
        return cls.from_pretrained(directory / name, torch_dtype=dtype).eval()


__all__ = ["export_diffusers", "plan_folder", "load_component", "stock_class"]

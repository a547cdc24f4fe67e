"""Apply a recipe to a pipeline or module: validated first, all-or-nothing, layer by layer."""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from .._errors import BackendError, BackendUnavailableError, InputError
from .._format import human_bytes
from .._progress import tqdm
from ..backends import full_precision, get_backend, quantize_layer
from ..backends.measure import measured_bytes
from ..models.inventory import Inventory, components_of, inventory
from ..runtime.compile import compile_pipeline  # noqa: F401  (its 0.2 path)
from .applied import AppliedState, applied_state, set_applied
from .recipe import Plan, Recipe
from .swap import swap_module


@dataclasses.dataclass
class ApplySummary:
    """What applying a recipe did. Bytes, bits per weight and full-precision share are of the
    Linear layers of ``scope`` (the recipe's ``components``, else all) unless named
    ``component_bytes`` (whole components, every parameter and buffer); ``bytes_after`` is measured on the modules, ``predicted_bytes_after``
    comes from the byte formulas."""

    layers_quantized: int
    per_method: dict[str, int]
    scope: list[str]
    bytes_before: int
    bytes_after: int
    predicted_bytes_after: int
    weight_params: int
    bits_per_weight: float
    fp_share: float
    component_bytes_before: dict[str, int]
    component_bytes_after: dict[str, int]
    skipped: dict[str, str]
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        lines = [
            f"layers quantized      {self.layers_quantized}",
            "per config            " + ", ".join(f"{k}: {v}" for k, v in self.per_method.items()),
            f"scope                 {', '.join(c or '(module)' for c in self.scope)}",
            f"Linear bytes          {self.bytes_before:,} -> {self.bytes_after:,} "
            f"({self.bytes_after / max(self.bytes_before, 1):.1%}; formula {self.predicted_bytes_after:,})",
            f"bits per weight       {self.bits_per_weight:.3f}",
            f"full-precision share  {self.fp_share:.1%}",
        ]
        for comp, before in self.component_bytes_before.items():
            after = self.component_bytes_after[comp]
            lines.append(f"  {comp or '(module)':<20}{human_bytes(before):>12} -> {human_bytes(after)}")
        if self.skipped:
            lines.append(f"skipped (kept as is)  {len(self.skipped)}: "
                         + "; ".join(f"{k} ({v})" for k, v in list(self.skipped.items())[:5])
                         + (" ..." if len(self.skipped) > 5 else ""))
        lines.append(f"device {self.device}, {self.seconds:.2f} s")
        return "\n".join(lines)


def _check_available(plan: Plan, device_of: dict[str, torch.device]) -> None:
    problems = []
    seen = set()
    for name, cfg in plan.configs.items():
        key = (cfg, device_of[name])
        if key in seen:
            continue
        seen.add(key)
        reason = get_backend(cfg.method).unavailable_reason(cfg, device_of[name])
        if reason:
            problems.append(f"{cfg.label} on {device_of[name]}: {reason}")
    if problems:
        raise BackendUnavailableError(
            "cannot apply this recipe here (nothing was changed):\n  - " + "\n  - ".join(problems))


def _calibrate_for(target: Any, recipe: Recipe | Plan, plan: Plan,
                   modules: dict[str, nn.Module], progress: bool) -> None:
    """Calibration data for the plan's layers whose method needs it (gptq) and lack it: the
    model's search prompts through ``target`` (a full-precision pipeline, untouched so far)."""
    from ..generation.calibration import calibrate, hessian

    need = {name: modules[name] for name, cfg in plan.configs.items()
            if get_backend(cfg.method).needs_calibration(cfg)
            and hessian(modules[name]) is None}
    if not need:
        return
    model = (recipe.model or {}).get("id") if isinstance(recipe, Recipe) else None
    if "" in components_of(target) or not model:
        raise InputError(
            f"{len(need)} layer(s) use a calibrated method ({sorted({plan.configs[n].label for n in need})}) "
            f"and have no calibration data: apply the recipe to the full-precision pipeline of a "
            f"recipe that names its model (it calibrates on the model's search prompts), or call "
            f"autoquant.calibrate(pipe, settings, layers) first. Nothing was changed.")
    calibrate(target, calibration_settings(recipe, model), need, progress)


def calibration_settings(recipe: Recipe, model: str):
    """What a recipe's calibrated layers are calibrated on: the generation its search recorded
    (``provenance.calibration``: prompts, seeds, steps, guidance, size), else the model's search
    prompt set. Recorded settings are untrusted data: checked, never run."""
    from ..generation.calibration import settings_for
    from ..generation.settings import EvalSettings

    base = EvalSettings.for_model(model, "search")
    rec = (recipe.provenance or {}).get("calibration")
    if rec is None:  # as a search with the defaults would calibrate
        return settings_for(base)
    rec = rec if isinstance(rec, dict) else {}
    prompts, seeds, guidance = rec.get("prompts"), rec.get("seeds"), rec.get("guidance")
    if not (isinstance(prompts, list) and 0 < len(prompts) <= 10_000
            and all(isinstance(p, str) and len(p) <= 10_000 for p in prompts)
            and isinstance(seeds, list) and 0 < len(seeds) <= 1_000
            and (guidance is None or type(guidance) in (int, float))):
        raise InputError("the recipe's provenance.calibration must hold 'prompts' (a list of "
                         "strings), 'seeds' (a list of whole numbers) and a numeric 'guidance' "
                         "if any, as a search writes it")
    extra = {k: rec[k] for k in ("steps", "guidance", "height", "width") if rec.get(k) is not None}
    # (EvalSettings checks the seeds and the sizes)
    return dataclasses.replace(base, prompts=tuple(prompts), seeds=tuple(seeds), **extra)


def as_recipe(recipe: Any, allow_plan: bool = False) -> Any:
    """A :class:`Recipe` from what a user may pass: a Recipe, a path to a recipe file (loaded and
    validated) or a recipe's dict; a :class:`Plan` where ``allow_plan``."""
    from .._errors import ArgumentTypeError
    from .recipe import load_recipe

    if isinstance(recipe, Recipe) or allow_plan and isinstance(recipe, Plan):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    raise ArgumentTypeError(f"recipe: expected an autoquant.Recipe, a recipe file's path or a "
                            f"recipe dict, got {type(recipe).__name__}")


def apply_recipe(target: Any, recipe: Recipe | Plan, device: str | torch.device | None = None,
                 progress: bool = True, keep_originals: bool = False,
                 scope: list[str] | None = None,
                 move: list[str] | None = None) -> ApplySummary:
    """Quantize ``target`` (a diffusers pipeline or an ``nn.Module``) in place as ``recipe`` says.

    Everything is validated before any layer is touched. Every replacement module is built first,
    and swapped in only when all were built: on any failure the target is left exactly as it was.

    ``device`` (e.g. ``"cuda"``): build each quantized layer on that device straight from the
    (CPU) weights, one layer at a time, then move the rest of each component there -- so a GPU
    that cannot hold the full-precision model still gets the quantized one, with peak memory near
    the quantized size. Without ``device`` each layer is quantized where its weights are.

    ``keep_originals=True`` keeps the replaced layers so that :func:`revert` can put them back
    (what evaluation and search do between candidates; it costs their memory).
    ``scope``: the components the summary's bytes, bits per weight and full-precision share cover
    (default: the recipe's ``components``, else all).
    ``move``: the components moved to ``device`` afterwards (default: all of them).
    """
    start = time.perf_counter()
    recipe = as_recipe(recipe, allow_plan=True)
    comps = components_of(target)
    inv = inventory(target)
    plan = recipe.resolve(inv) if isinstance(recipe, Recipe) else recipe
    want = torch.device(device) if device is not None else None
    if want is not None and want.type == "cuda" and want.index is None and torch.cuda.is_available():
        want = torch.device("cuda", torch.cuda.current_device())
    modules = {layer.name: comps[layer.component].get_submodule(layer.path) for layer in inv}
    device_of = {name: want or modules[name].weight.device for name in plan.configs}
    _check_available(plan, device_of)
    _calibrate_for(target, recipe, plan, modules, progress)

    # Build every replacement before touching the target: any failure (a library's, a bug,
    # Ctrl-C) leaves it exactly as it was.
    built: dict[str, nn.Module] = {}
    try:
        for name, cfg in tqdm(plan.configs.items(), desc="quantizing", unit="layer",
                              disable=not progress or not plan.configs, leave=False):
            try:
                built[name] = quantize_layer(modules[name], cfg, device_of[name], name)
            except BackendError as e:
                raise BackendError(f"{e}. Nothing was changed.") from e
    except BaseException:
        built.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise

    # Swap in, then move what remains; undo both if the move fails.
    originals: dict[str, nn.Module] = {}
    for layer in inv:
        if layer.name in built and built[layer.name] is not modules[layer.name]:
            originals[layer.name] = swap_module(comps[layer.component], layer.path,
                                                built[layer.name])
    if want is not None:
        moved = {c: m for c, m in comps.items() if move is None or c in move}
        first_device = {c: next((p.device for p in m.parameters()), torch.device("cpu"))
                        for c, m in moved.items()}
        try:
            for comp in moved.values():
                comp.to(want)
        except BaseException:
            for name, original in originals.items():
                swap_module(comps[inv[name].component], inv[name].path, original)
            for c, comp in moved.items():
                comp.to(first_device[c])
            raise

    if scope is not None:
        scope = set(scope)
    elif isinstance(recipe, Recipe) and recipe.components:
        scope = set(recipe.components)
    summary = _summarize(inv, plan, built, comps, time.perf_counter() - start, scope, want)
    # Remember the plan (and the full-precision model's fingerprint) so save_quantized can write it.
    state = applied_state(target) or AppliedState(configs={}, fingerprint=inv.fingerprint())
    state.configs.update(plan.configs)
    if keep_originals:
        for name, original in originals.items():
            state.originals.setdefault(name, original)
    if isinstance(recipe, Recipe):
        state.recipe = recipe
    set_applied(target, state)
    return summary


def revert(target: Any) -> None:
    """Undo every :func:`apply_recipe` made with ``keep_originals=True`` on ``target``."""
    state = applied_state(target)
    if state is None or not state.originals:
        raise InputError("nothing to revert: apply_recipe(..., keep_originals=True) first")
    comps = components_of(target)
    for name, original in state.originals.items():
        comp, path = _split(name, comps)
        swap_module(comps[comp], path, original)
    set_applied(target, None)


def _split(name: str, comps: dict[str, nn.Module]) -> tuple[str, str]:
    """``component.path`` -> (component, path); a bare module has the component ""."""
    if "" in comps:
        return "", name
    comp, _, path = name.partition(".")
    return comp, path


def _summarize(inv: Inventory, plan: Plan, built: dict[str, nn.Module],
               comps: dict[str, nn.Module], seconds: float, scope: set[str] | None,
               device: torch.device | None) -> ApplySummary:
    """Bytes, bits per weight and full-precision share over the Linear layers of ``scope`` (the
    recipe's ``components``; all components when it names none); ``component_bytes`` over every
    component."""
    comp_before = {c: inv.components[c]["bytes"] for c in comps}
    comp_after = dict(comp_before)
    before = after = predicted = fp_params = weight_params = 0
    per_method: Counter[str] = Counter()
    for layer in inv:
        cfg = plan.configs.get(layer.name)
        quantized = cfg is not None and not cfg.full_precision
        if quantized:
            got = measured_bytes(built[layer.name])
            formula = layer.nbytes(cfg)
            comp_after[layer.component] += got - layer.bytes
        else:
            got = formula = layer.bytes
        if scope is not None and layer.component not in scope:
            continue
        before += layer.bytes
        after += got
        predicted += formula
        weight_params += layer.weight_params
        fp_params += 0 if quantized else layer.weight_params
        if cfg is not None:
            per_method[cfg.label] += 1
    return ApplySummary(
        layers_quantized=sum(n for k, n in per_method.items() if k != full_precision().label),
        scope=sorted(scope) if scope is not None else sorted(comps),
        per_method=dict(per_method), bytes_before=before, bytes_after=after,
        predicted_bytes_after=predicted, weight_params=weight_params,
        bits_per_weight=8 * after / max(weight_params, 1),
        fp_share=fp_params / max(weight_params, 1), component_bytes_before=comp_before,
        component_bytes_after=comp_after, skipped=dict(plan.skipped),
        device=str(device) if device is not None else "in place", seconds=seconds)

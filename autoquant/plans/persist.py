"""Save a quantized pipeline and load it back without quantizing again.

A saved folder holds ``recipe.yaml`` (the plan, the base model's id and fingerprint) and
``quantized.safetensors``: for each quantized layer, the tensors its backend exports, plus a JSON
header with each layer's config, a SHA-256 of every tensor and of ``recipe.yaml``. Loading builds
the base pipeline (built-in, local folder or hub id), checks the fingerprint, and rebuilds each
quantized layer from its tensors: outputs are bit-identical to the saved pipeline. Layers the
recipe left in full precision come from the base model.

A saved folder is untrusted data, verified before anything is built: the recipe's and every
tensor's checksum, the header's structure, that the header's configs are the recipe's, that every
layer exists in the base model, and that each layer's tensors are exactly the ones (names, shapes,
dtypes, metadata) its config writes (:meth:`Backend.state_problems`). Nothing in the folder is
evaluated, unpickled or passed to a library that would. Any problem is one
:class:`SavedFolderError` naming the file and the layer; the base pipeline is left untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import _atomic
from .._atomic import save_safetensors as save_file
from .._errors import ConfigError, InputError, RecipeError, expect
from .._quiet import quietly
from ..backends import config_from_dict, get_backend
from ..backends.measure import measured_bytes
from ..models.inventory import components_of, inventory
from ..models.source import source_of
from .applied import AppliedState, applied_state, set_applied
from .apply import _split
from .recipe import Recipe, load_recipe
from .swap import swap_module

TENSORS = "quantized.safetensors"
RECIPE = "recipe.yaml"
FORMAT = "autoquant-quantized/2"


class SavedFolderError(InputError):
    """A saved folder that is incomplete, damaged or was changed after saving."""


def _sha256(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()
                          if data.numel() else b"").hexdigest()


def save_quantized(target: Any, directory: str | Path) -> Path:
    """Write a pipeline (or module) quantized by :func:`apply_recipe` to ``directory``."""
    expect(directory, (str, os.PathLike), "save_quantized(target, directory)", "a folder path")
    state = applied_state(target)
    if state is None:
        raise InputError("this pipeline was not quantized by autoquant.apply_recipe; "
                             "apply a recipe first, then save")
    directory = Path(directory)
    _check_replaceable(directory)
    comps = components_of(target)
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for name, cfg in state.configs.items():
        if cfg.full_precision:
            continue
        comp, path = _split(name, comps)
        module = comps[comp].get_submodule(path)
        layer_tensors, meta = get_backend(cfg.method).export_state(module)
        for key, value in layer_tensors.items():
            tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous().clone()
        header[name] = {"config": cfg.to_dict(), "meta": meta}
    recipe: Recipe = state.recipe or Recipe(layers=dict(state.configs))
    source = source_of(target)
    recipe = Recipe(**{**recipe.__dict__,
                       "model": {**(recipe.model or {}), **(source.to_dict() if source else {}),
                                 "fingerprint": state.fingerprint}})
    recipe_text = recipe.to_yaml()
    metadata = {"format": FORMAT, "autoquant": json.dumps(header),
                "checksums": json.dumps({k: _sha256(v) for k, v in tensors.items()}),
                "recipe_sha256": hashlib.sha256(recipe_text.encode()).hexdigest()}

    def write(new: Path) -> None:
        (new / RECIPE).write_text(recipe_text)
        save_file(tensors, new / TENSORS, metadata=metadata)

    # written whole beside the old folder, then swapped in: a crash or a full disk at any point
    # leaves a complete folder (the old or the new one) at ``directory``
    _atomic.replace_folder(directory, write)
    return directory


def _check_replaceable(directory: Path) -> None:
    """Saving replaces the whole folder: refuse one that holds anything but a saved pipeline."""
    _atomic.recover_folder(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file; save_quantized writes a folder: pass a folder "
                         f"path")
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir() if p.name not in (RECIPE, TENSORS))
        if others:
            raise InputError(f"{directory} holds other files ({', '.join(others[:5])}); saving "
                             f"replaces the whole folder: pass an empty or new folder, or one "
                             f"that save_quantized wrote")


def _read_header(path: Path) -> tuple[dict, dict, str]:
    """``(layers, checksums, recipe sha)`` from the safetensors header, checked for shape."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise SavedFolderError(f"{path}: not a readable safetensors file ({e}); the folder is "
                               f"damaged or incomplete: save it again") from None
    if meta.get("format") != FORMAT:
        raise SavedFolderError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} "
                               f"(folders saved by autoquant < 0.2 carry no checksums: apply "
                               f"the recipe and save again)")
    try:
        layers = json.loads(meta["autoquant"])
        checksums = json.loads(meta["checksums"])
        recipe_sha = meta["recipe_sha256"]
    except (KeyError, ValueError) as e:
        raise SavedFolderError(f"{path}: the header is malformed ({type(e).__name__}: {e})") \
            from None
    ok = (isinstance(layers, dict) and isinstance(checksums, dict)
          and all(isinstance(v, str) for v in checksums.values())
          and all(isinstance(k, str) and isinstance(v, dict) and set(v) == {"config", "meta"}
                  and isinstance(v["config"], dict) and isinstance(v["meta"], dict)
                  and all(isinstance(x, str) for x in v["meta"].values())
                  for k, v in layers.items()))
    if not ok:
        raise SavedFolderError(f"{path}: the header's layers or checksums are not what "
                               f"save_quantized writes")
    return layers, checksums, recipe_sha


def _load_tensors(path: Path, checksums: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SavedFolderError(f"{path}: cannot read its tensors ({e}); the file is damaged or "
                               f"truncated: save it again") from None
    if set(flat) != set(checksums):
        extra, missing = sorted(set(flat) - set(checksums)), sorted(set(checksums) - set(flat))
        raise SavedFolderError(f"{path}: tensors and checksums disagree (unlisted: {extra[:5]}, "
                               f"missing: {missing[:5]})")
    for key, t in flat.items():
        if _sha256(t) != checksums[key]:
            layer, _, name = key.rpartition("/")
            raise SavedFolderError(f"{path}: tensor {name!r} of layer {layer} does not match its "
                                   f"checksum: the file was changed or damaged after saving")
    return flat


def load_quantized(directory: str | Path, base: Any = None, device: str | torch.device = "cpu"):
    """Load what :func:`save_quantized` wrote. ``base``: the full-precision pipeline/module to put
    the layers into (default: load it from the recipe's model id). Verified first (see above)."""
    from ..models.pipelines import load_pipeline

    expect(directory, (str, os.PathLike), "load_quantized(directory)",
           "the folder save_quantized wrote")
    directory = Path(directory)
    _atomic.recover_folder(directory)
    layers, recipe, configs, flat = _read_folder(directory)
    if base is None:
        if not recipe.model or not recipe.model.get("id"):
            raise SavedFolderError(f"{directory / RECIPE} names no base model; pass base=...")
        base = load_pipeline(recipe.model["id"], dtype=recipe.model.get("dtype"),
                             revision=recipe.model.get("revision"))
    inv = inventory(base)
    _check_recipe_matches(directory, recipe, configs, inv)
    device = torch.device(device)
    per_layer = _tensors_per_layer(directory, layers, flat)
    _check_states(directory, layers, configs, per_layer, inv, device)
    built = _rebuild(layers, configs, per_layer, inv, device)
    comps = components_of(base)
    for name, module in built.items():
        swap_module(comps[inv[name].component], inv[name].path, module)
    for comp in comps.values():
        comp.to(device)
    set_applied(base, AppliedState(configs=configs, fingerprint=inv.fingerprint(), recipe=recipe))
    return base


def _read_folder(directory: Path):
    """The verified header, recipe, per-layer configs and tensors of a saved folder."""
    if not (directory / TENSORS).is_file() or not (directory / RECIPE).is_file():
        raise SavedFolderError(f"{directory} is not a saved autoquant pipeline "
                               f"(needs {RECIPE} and {TENSORS})")
    layers, checksums, recipe_sha = _read_header(directory / TENSORS)
    text = (directory / RECIPE).read_bytes()
    if hashlib.sha256(text).hexdigest() != recipe_sha:
        raise SavedFolderError(f"{directory / RECIPE} was changed after saving (its checksum "
                               f"differs from the one in {TENSORS}); restore it or save again")
    try:
        recipe = load_recipe(directory / RECIPE)
    except RecipeError as e:
        raise SavedFolderError(str(e)) from None
    configs = {}
    for name, entry in layers.items():
        try:
            configs[name] = config_from_dict(entry["config"])
        except (ConfigError, TypeError) as e:
            raise SavedFolderError(f"{directory / TENSORS}: layer {name}: bad config ({e})") \
                from None
    return layers, recipe, configs, _load_tensors(directory / TENSORS, checksums)


def _check_recipe_matches(directory: Path, recipe, configs, inv) -> None:
    """The base model is the one saved from, and the recipe resolves to the saved layers."""
    expected = (recipe.model or {}).get("fingerprint")
    if expected and expected != inv.fingerprint():
        raise SavedFolderError(f"the base model's fingerprint {inv.fingerprint()} differs from "
                               f"the saved one {expected}: wrong base model")
    try:
        plan = recipe.resolve(inv).configs
    except RecipeError as e:
        raise SavedFolderError(f"{directory / RECIPE}: {e}") from None
    for name in sorted(set(plan) | set(configs)):
        said, held = plan.get(name), configs.get(name)
        if held is None and said is not None and said.full_precision:
            continue
        if said != held:
            raise SavedFolderError(
                f"layer {name}: {TENSORS} holds {held.label if held else 'nothing'}, {RECIPE} "
                f"says {said.label if said else 'nothing'}: the two were not saved together")


def _tensors_per_layer(directory: Path, layers, flat) -> dict[str, dict[str, torch.Tensor]]:
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    for key, t in flat.items():
        name, _, tensor = key.rpartition("/")
        if name not in per_layer:
            raise SavedFolderError(f"{directory / TENSORS}: tensor {key!r} belongs to no layer "
                                   f"of the header")
        per_layer[name][tensor] = t
    return per_layer


def _check_states(directory: Path, layers, configs, per_layer, inv, device) -> None:
    """Every layer exists, its backend runs here, and its tensors fit its config -- all checked
    before any layer is built, so a bad folder fails whole."""
    problems = []
    for name, cfg in configs.items():
        if name not in inv:
            problems.append(f"{name}: no such layer in the base model")
            continue
        layer = inv[name]
        reason = get_backend(cfg.method).unavailable_reason(cfg, device)
        if reason:
            problems.append(f"{name}: {reason}")
            continue
        with quietly():
            problems += [f"{name}: {p}" for p in get_backend(cfg.method).state_problems(
                cfg, layer.out_features, layer.in_features, layer.bias, layer.dtype,
                per_layer[name], layers[name]["meta"])]
    if problems:
        raise SavedFolderError(f"{directory / TENSORS} does not fit this model or its configs:\n"
                               + "\n".join(f"  - {p}" for p in problems[:20]))


def _rebuild(layers, configs, per_layer, inv, device) -> dict[str, torch.nn.Module]:
    built = {}
    for name, cfg in configs.items():
        layer = inv[name]
        with quietly():
            module = get_backend(cfg.method).import_state(
                cfg, layer.out_features, layer.in_features, layer.bias, layer.dtype,
                per_layer[name], layers[name]["meta"], device)
        if measured_bytes(module) != layer.nbytes(cfg):
            raise SavedFolderError(f"{name}: the rebuilt layer holds {measured_bytes(module)} "
                                   f"bytes, {cfg.label} holds {layer.nbytes(cfg)}")
        built[name] = module
    return built

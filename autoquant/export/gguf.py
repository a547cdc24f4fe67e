"""Write a recipe as a GGUF file of the denoiser, and load such a file back with diffusers.

Every tensor is made from the **original** weights with the recipe's config -- GGUF layers by
the very ggml call the ``gguf`` backend scores (:func:`autoquant.backends.gguf.quantize_rows`,
the same importance matrix), full-precision layers in the model's dtype (BF16 / F16 / F32),
biases, norm scales and every other tensor in F32 -- so the file holds the scored weights. It is
written layer by layer (one tensor in memory at a time: the header with every tensor's size is
written first, from the byte formulas), to a temporary file renamed into place when complete.

Metadata: ``general.architecture`` (``flux`` for Flux; the model class otherwise),
``general.quantization_version`` 2, ``autoquant.version``, ``autoquant.names`` and
``autoquant.recipe`` (the plan as YAML: the file records what it is).

Names: ``bfl`` (Black Forest Labs' checkpoint layout, the one ComfyUI-GGUF and
stable-diffusion.cpp read; Flux only) or ``diffusers`` (module paths; what diffusers'
``from_single_file`` loads without conversion -- ComfyUI-GGUF refuses such Flux files).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, _atomic
from .._errors import InputError
from .._progress import tqdm
from ..backends import full_precision, get_backend
from ..backends.gguf import TYPES, GGUFConfig, imatrix_of, quantize_rows
from ..models.inventory import component_named, components_of, inventory
from ..plans.recipe import Plan, Recipe
from .names import flux_layout

#: this writer's format, as backends name it in ``Backend.formats``
FORMAT = "gguf"
NAMES = ("bfl", "diffusers")
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION


@dataclasses.dataclass(frozen=True)
class Near:
    """A layer of another method written as the format's nearly-exact type (its own codes)."""
    config: Any
    type: str

    @property
    def label(self) -> str:
        return f"{self.config.label} as {self.type}"


@dataclasses.dataclass
class Entry:
    """One tensor of the file: its name, the state-dict tensors it stacks, how it is stored."""
    name: str
    parts: list[str]
    swapped: bool
    kind: str  # a GGUF type name, or "BF16" / "F16" / "F32"
    shape: tuple[int, ...]
    config: GGUFConfig | None = None
    near: Near | None = None  # made by the layers' own backend (Backend.near_export)

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        if self.kind in TYPES:
            weights, size = TYPES[self.kind][1:]
            return n // weights * size
        return n * {"BF16": 2, "F16": 2, "F32": 4}[self.kind]


def _dtype_kind(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def nearest_gguf(cfg, shape: tuple[int, int], dtype: torch.dtype) -> GGUFConfig | None:
    """The GGUF type of the most bytes no larger than ``cfg``'s for a layer of ``shape`` (None:
    none fits in its bytes or its shape)."""
    from ..backends import methods

    out_f, in_f = shape
    mine = get_backend(cfg.method).nbytes(cfg, out_f, in_f, False, dtype)
    fits = [(b.nbytes(c, out_f, in_f, False, dtype), c) for b in map(get_backend, methods())
            for c in b.configs() if b.formats(c).get(FORMAT) in TYPES
            and b.layer_reason(c, out_f, in_f, dtype) is None
            and b.nbytes(c, out_f, in_f, False, dtype) <= mine]
    return max(fits, key=lambda bc: bc[0])[1] if fits else None


def plan_file(pipe: Any, recipe: Recipe, component: str = "transformer", names: str = "bfl",
              requantize: bool = False) -> tuple[list[Entry], dict[str, str]]:
    """The file's tensors, in order, and the mapping ``{layer: what it became}`` of layers a
    non-GGUF config had (``--requantize``). Refuses, before anything is written, a recipe whose
    layers the file cannot hold, and fused BFL tensors whose layers differ in type."""
    if names not in NAMES:
        raise InputError(f"--names {names!r}: choose one of {', '.join(NAMES)}")
    module = component_named(pipe, component, "export")
    inv = inventory(pipe)
    plan: Plan = recipe.resolve(inv)
    fp = full_precision()
    state = module.state_dict()
    dtype = next(module.parameters()).dtype
    layers = {l.path: l for l in inv if l.component == component}
    configs: dict[str, Any] = {}
    mapped: dict[str, str] = {}
    refused = []
    for path, layer in layers.items():
        cfg = plan.configs.get(layer.name, fp)
        backend = get_backend(cfg.method)
        if FORMAT not in backend.formats(cfg) and backend.near_format(cfg, FORMAT):
            configs[path] = Near(cfg, backend.near_format(cfg, FORMAT))
            mapped[layer.name] = (f"{cfg.label} -> {configs[path].type} (near-exact: its own "
                                  f"codes, scales rounded to fp16; score the file again)")
            continue
        if FORMAT not in backend.formats(cfg):
            near = nearest_gguf(cfg, (layer.out_features, layer.in_features), dtype)
            if not requantize or near is None:
                refused.append(f"{layer.name} ({cfg.label}"
                               f"{'' if near else ': no GGUF type fits its bytes'})")
                continue
            mapped[layer.name] = f"{cfg.label} -> {near.label}"
            cfg = near
        configs[path] = cfg
    if refused:
        raise InputError(
            f"{len(refused)} layer(s) of the recipe use methods a GGUF file cannot hold "
            f"exactly: {'; '.join(refused[:6])}{' ...' if len(refused) > 6 else ''}. Search with "
            f"--space {FORMAT}, or pass --requantize to re-quantize them from the original "
            f"weights to the GGUF type of the most bytes no larger than theirs")
    if names == "bfl":
        try:
            layout = flux_layout(list(state))
        except ValueError as e:
            raise InputError(str(e)) from None
    else:
        layout = [(k, [k], False) for k in state]
    entries, mixed = [], []
    for name, parts, swapped in layout:
        t0 = state[parts[0]]
        rows = sum(state[p].shape[0] for p in parts)
        shape = (rows, *t0.shape[1:])
        kind, cfg = "F32", None
        owners = [p.rpartition(".")[0] for p in parts]
        if parts[0].endswith(".weight") and owners[0] in configs:
            chosen = {configs[o] for o in owners}
            if len(chosen) > 1:
                mixed.append(f"{name} <- {', '.join(sorted(c.label for c in chosen))}")
                continue
            cfg = chosen.pop()
            if isinstance(cfg, Near):
                entries.append(Entry(name, parts, swapped, cfg.type, tuple(shape), near=cfg))
                continue
            kind = get_backend(cfg.method).formats(cfg)[FORMAT]
            if kind not in TYPES:  # the model's own float type
                kind, cfg = _dtype_kind(t0.dtype), None
        entries.append(Entry(name, parts, swapped, kind, tuple(shape), cfg))
    if mixed:
        raise InputError(
            f"these tensors of the BFL checkpoint stack layers of different types, which one "
            f"GGUF tensor cannot hold: {'; '.join(mixed[:4])}{' ...' if len(mixed) > 4 else ''}. "
            f"Tie them in the space (the {FORMAT} space does), or export with --names diffusers")
    return entries, mapped


def _tensor_data(entry: Entry, state: dict[str, torch.Tensor], modules: dict[str, Any]):
    """The bytes of ``entry``, made from the original weights."""
    parts = []
    for p in entry.parts:
        t = state[p].detach().to("cpu")
        if entry.near is not None:
            layer = modules[p.rpartition(".")[0]]
            parts.append(get_backend(entry.near.config.method).near_export(
                layer, entry.near.config, FORMAT))
        elif entry.config is not None:
            imatrix = imatrix_of(modules[p.rpartition(".")[0]]) if entry.config.imatrix else None
            if entry.config.imatrix and imatrix is None:
                raise InputError(f"{p}: its imatrix config needs calibration data; "
                                 f"autoquant.calibrate(pipe, settings, layers) first")
            parts.append(quantize_rows(t.float().numpy(), entry.config.type, imatrix))
        elif entry.kind == "BF16":
            parts.append(t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
                         .reshape(*t.shape[:-1], -1))
        elif entry.kind == "F16":
            parts.append(t.to(torch.float16).numpy())
        else:
            parts.append(t.float().numpy())
    data = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if entry.swapped:
        half = data.shape[0] // 2
        data = np.concatenate([data[half:], data[:half]], axis=0)
    return np.ascontiguousarray(data)


def export_gguf(pipe: Any, recipe: Recipe, path: str | Path, component: str = "transformer",
                names: str = "bfl", requantize: bool = False, progress: bool = True) -> dict:
    """Write ``recipe`` applied to ``pipe``'s ``component`` (full precision, untouched) as a
    GGUF file at ``path``; returns what was written (bytes, tensors per type, mapped layers)."""
    import gguf
    import yaml

    from ..plans.apply import _calibrate_for

    entries, mapped = plan_file(pipe, recipe, component, names, requantize)
    module = components_of(pipe)[component]
    modules = dict(module.named_modules())
    if any(e.config is not None and e.config.imatrix for e in entries):
        inv = inventory(pipe)
        plan = recipe.resolve(inv)
        layers = {l.name: components_of(pipe)[l.component].get_submodule(l.path) for l in inv}
        _calibrate_for(pipe, recipe, plan, layers, progress)
    state = module.state_dict()
    arch = "flux" if type(module).__name__ == "FluxTransformer2DModel" else type(module).__name__
    path = Path(path)
    with _atomic.atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_quantization_version(QUANTIZATION_VERSION)
        writer.add_string("autoquant.version", __version__)
        writer.add_string("autoquant.names", names)
        writer.add_string("autoquant.recipe", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        for e in entries:
            raw = gguf.GGMLQuantizationType[e.kind]
            if e.kind in TYPES or e.kind == "BF16":
                byte_shape = (*e.shape[:-1], e.nbytes // int(np.prod(e.shape[:-1])))
                writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), e.nbytes, raw)
            else:
                writer.add_tensor_info(e.name, e.shape, np.dtype(
                    np.float16 if e.kind == "F16" else np.float32), e.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in tqdm(entries, desc="writing GGUF", unit="tensor", disable=not progress):
            data = _tensor_data(e, state, modules)
            if data.nbytes != e.nbytes:
                raise RuntimeError(f"{e.name}: {data.nbytes} bytes made, {e.nbytes} planned")
            writer.write_tensor_data(data)
        writer.close()
    kinds: dict[str, int] = {}
    for e in entries:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": len(entries),
            "tensor_bytes": sum(e.nbytes for e in entries), "types": kinds, "names": names,
            "tensor_types": {e.name: e.kind for e in entries}, "requantized": mapped}


def check_file(path: str | Path, module: Any) -> dict[str, Any]:
    """Read a GGUF file's header and check it against ``module`` (untrusted input: nothing in it
    runs): a GGUF file, diffusers names, every tensor of the module with its shape and a type
    diffusers can load. Returns its metadata; raises InputError with one line saying which
    tensor and what was expected."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--gguf {path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- any parse failure of a foreign file is the file's
        raise InputError(f"--gguf {path}: not a readable GGUF file "
                         f"({type(e).__name__}: {str(e)[:120]})") from None
    meta = {}
    for field in reader.fields.values():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING and \
                field.name.startswith(("general.", "autoquant.")):
            meta[field.name] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {t.name: t for t in reader.tensors}
    if meta.get("autoquant.names") == "bfl" or "double_blocks.0.img_attn.qkv.weight" in have:
        raise InputError(f"--gguf {path}: its tensors have Black Forest Labs' names (the file "
                         f"ComfyUI and stable-diffusion.cpp load); evaluate reads diffusers-named "
                         f"files: export with --names diffusers")
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model has not"
        raise InputError(f"--gguf {path}: the file does not fit this model's "
                         f"{type(module).__name__}: it {what} ({len(missing)} missing, "
                         f"{len(extra)} unexpected tensors)")
    loadable = {gguf.GGMLQuantizationType[k] for k in (*TYPES, "F32", "F16", "BF16")}
    for name, shape in want.items():
        t = have[name]
        if t.tensor_type not in loadable:
            raise InputError(f"--gguf {path}: tensor {name} is {t.tensor_type.name}, a type "
                             f"autoquant does not load")
        got = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the innermost first
        if got != shape:
            raise InputError(f"--gguf {path}: tensor {name} is {got}, the model's is {shape}")
        if int(t.n_bytes) != len(t.data.reshape(-1).view(np.uint8)):
            raise InputError(f"--gguf {path}: tensor {name} is truncated")
    return meta


def load_gguf(path: str | Path, pipe: Any, component: str = "transformer",
              dtype: torch.dtype | None = None) -> Any:
    """``component`` of ``pipe`` loaded from the GGUF file by diffusers itself
    (``from_single_file`` with ``GGUFQuantizationConfig``; the model's own config, so it works
    offline) -- the module a diffusers user gets from the file, checked first."""
    module = components_of(pipe)[component]
    check_file(path, module)
    return from_single_file(path, module, dtype)


def from_single_file(path: str | Path, module: Any, dtype: torch.dtype | None = None) -> Any:
    """diffusers' own load of a GGUF file into ``module``'s class and config (``config=`` a
    saved copy, so it works offline), without :func:`check_file` -- for a BFL-named file of
    Flux-dev's widths, which diffusers' key converter handles (a benchmark's 12B file)."""
    import tempfile

    from diffusers import GGUFQuantizationConfig

    from .._quiet import quiet_loading

    dtype = dtype or next(module.parameters()).dtype
    with tempfile.TemporaryDirectory() as folder, quiet_loading():
        module.save_config(folder)
        loaded = type(module).from_single_file(
            str(path), config=folder, torch_dtype=dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))
    return loaded.eval()

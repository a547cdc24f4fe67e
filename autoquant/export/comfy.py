"""Write a recipe as a ComfyUI mixed-precision checkpoint of the Flux denoiser, and read such a
file back the way ComfyUI does (through comfy-kitchen, ComfyUI's kernel library).

The file is one safetensors file in Black Forest Labs' names (the checkpoint ComfyUI's Flux
model loads). Each quantized layer ``<layer>`` carries ``<layer>.weight`` in the format's
storage type, its ``<layer>.weight_scale`` (and ``weight_zeros``), and ``<layer>.comfy_quant``:
a uint8 tensor holding the layer's JSON (``{"format": ...}``), which ComfyUI's mixed-precision
loader reads to build a comfy-kitchen ``QuantizedTensor``. Every other tensor (full-precision
layers, biases, norm scales) is in the model's dtype and has no ``comfy_quant``.

Formats (:data:`LAYOUTS`) and how autoquant's layers map onto them:

- ``int8_tensorwise`` <- torchao ``int8`` / ``int8_dynamic``: its codes and per-row scales, as
  they are (exact: comfy-kitchen dequantizes ``q * scale`` like torchao).
- ``float8_e4m3fn`` <- torchao ``fp8`` / ``fp8_dynamic``: ComfyUI holds one scale per tensor,
  torchao one per row, so the rows' values are re-quantized under one scale by comfy-kitchen's
  own quantizer (near-exact). Written with ``full_precision_matrix_mult``: ComfyUI multiplies
  with the dequantized weight, like fp8 weight-only; a static ``input_scale`` for fp8
  activations would be a calibration nobody scored, so none is written.
- ``awq_w4a16`` <- hqq / gptq 4-bit with groups of 64: their codes, ``s = scale`` and
  ``z = (8 - zero) * scale`` in 16 bits (near-exact). Only ComfyUI builds with Comfy-Org/ComfyUI
  #13580 load it, so it is written only when asked for (``target="awq"``).

Near-exact layers make a file that is not bit for bit what was scored: the exporter says which,
and the model card's fidelity is measured on the file as :func:`load_comfy` reads it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__, _atomic
from .._errors import InputError
from .._progress import tqdm
from ..backends import full_precision, get_backend
from ..models.inventory import component_named, components_of, inventory
from ..plans.recipe import Recipe
from .gguf import FORMAT as GGUF
from .names import flux_layout

#: this writer's format, as backends name it in ``Backend.formats`` / ``near_format``
FORMAT = "comfy"
#: the first ComfyUI release known to load int8_tensorwise (0.25.1 lacks it; 0.27.0 has it)
COMFY_STABLE = "0.27.0"
COMFY_AWQ = "a ComfyUI build with awq_w4a16 (Comfy-Org/ComfyUI#13580)"


@dataclasses.dataclass(frozen=True)
class Layout:
    """One ComfyUI quantization format: comfy-kitchen's layout class, the weight's storage
    type, the row axis of each tensor (how fused BFL tensors stack layers), the ComfyUI it
    needs."""
    kitchen: str
    storage: torch.dtype
    rows: dict[str, int]
    comfy: str


LAYOUTS = {
    "int8_tensorwise": Layout("TensorWiseINT8Layout", torch.int8,
                              {"weight": 0, "weight_scale": 0}, COMFY_STABLE),
    "float8_e4m3fn": Layout("TensorCoreFP8Layout", torch.float8_e4m3fn,
                            {"weight": 0, "weight_scale": 0}, COMFY_STABLE),
    "awq_w4a16": Layout("TensorCoreAWQW4A16Layout", torch.int8,
                        {"weight": 0, "weight_scale": 1, "weight_zeros": 1}, COMFY_AWQ),
}
#: which formats each target ComfyUI loads
TARGETS = {"stable": ("int8_tensorwise", "float8_e4m3fn"),
           "awq": ("int8_tensorwise", "float8_e4m3fn", "awq_w4a16")}
QUANT_KEY = "comfy_quant"
_MAX_JSON = 4096  # bytes of one layer's comfy_quant: a foreign file's may be anything


def requirement(comfyui: str) -> str:
    """What a file needs, in words, from ``export_comfy``'s ``comfyui`` (a release or a build)."""
    return f"ComfyUI {comfyui} or newer" if comfyui[:1].isdigit() else comfyui


def _kitchen():
    try:
        import comfy_kitchen  # noqa: F401
        from comfy_kitchen.tensor import QuantizedTensor, get_layout_class
    except ImportError:
        raise InputError("the comfy format needs comfy-kitchen (ComfyUI's kernel library, "
                         "which holds the layouts): pip install comfy-kitchen") from None
    return QuantizedTensor, get_layout_class


def layer_format(cfg, target: str = "stable") -> tuple[str | None, bool]:
    """``(ComfyUI format or None, exact)`` for a layer of config ``cfg``."""
    backend = get_backend(cfg.method)
    exact = backend.formats(cfg).get(FORMAT)
    if exact in TARGETS[target]:
        return exact, True
    near = backend.near_format(cfg, FORMAT)
    return (near, False) if near in TARGETS[target] else (None, False)


def holders(target: str = "stable") -> list[str]:
    """The labels of the configs (the registry's representative ones) a target's file holds."""
    from ..backends import methods

    return [c.label for b in map(get_backend, methods()) for c in b.configs()
            if not c.full_precision and layer_format(c, target)[0]]


def plan_file(pipe: Any, recipe: Recipe, component: str = "transformer",
              target: str = "stable") -> tuple[list[tuple[str, list[str], bool]], dict, dict]:
    """``(BFL layout, {layer path: (config, format)}, {layer name: how it maps})`` -- refuses,
    before anything is written, a model that is not Flux, layers no ComfyUI format holds, and
    fused BFL tensors whose layers differ in format."""
    if target not in TARGETS:
        raise InputError(f"--comfy-target {target!r}: choose one of {', '.join(TARGETS)}")
    module = component_named(pipe, component, "export")
    if type(module).__name__ != "FluxTransformer2DModel":
        raise InputError(f"the comfy format writes Flux denoisers (ComfyUI's Flux checkpoint "
                         f"layout); {component} is a {type(module).__name__}")
    layout = flux_layout(list(module.state_dict()))
    inv = inventory(pipe)
    plan = recipe.resolve(inv)
    fp = full_precision()
    quantized: dict[str, tuple[Any, str]] = {}
    mapped: dict[str, str] = {}
    refused = []
    for layer in (l for l in inv if l.component == component):
        cfg = plan.configs.get(layer.name, fp)
        if cfg.full_precision:
            continue
        fmt, exact = layer_format(cfg, target)
        if fmt is None:
            hint = " (awq_w4a16: --comfy-target awq)" if layer_format(cfg, "awq")[0] else ""
            refused.append(f"{layer.name} ({cfg.label}{hint})")
            continue
        quantized[layer.path] = (cfg, fmt)
        if not exact:
            mapped[layer.name] = f"{cfg.label} -> {fmt} (near-exact: score the file again)"
    if refused:
        allowed = ", ".join(TARGETS[target])
        raise InputError(
            f"{len(refused)} layer(s) use configs no ComfyUI format of this target ({allowed}) "
            f"holds: {'; '.join(refused[:6])}{' ...' if len(refused) > 6 else ''}. ComfyUI "
            f"formats hold {', '.join(holders(target))}; export other plans with --format "
            f"{GGUF}")
    mixed = []
    for name, parts, _ in layout:
        owners = [p.rpartition(".")[0] for p in parts]
        if parts[0].endswith(".weight") and len(parts) > 1:
            kinds = {quantized[o][1] if o in quantized else "full precision" for o in owners}
            if len(kinds) > 1:
                mixed.append(f"{name} <- {', '.join(sorted(kinds))}")
    if mixed:
        raise InputError(
            f"these tensors of ComfyUI's Flux checkpoint stack layers of different formats, "
            f"which one tensor cannot hold: {'; '.join(mixed[:4])}"
            f"{' ...' if len(mixed) > 4 else ''}. Tie them in the space (the {GGUF} space "
            f"does)")
    return layout, quantized, mapped


def _quant_json(fmt: str, cfg) -> dict:
    conf: dict[str, Any] = {"format": fmt}
    if fmt == "float8_e4m3fn":
        conf["full_precision_matrix_mult"] = True
    if fmt == "awq_w4a16":
        conf["group_size"] = cfg.group_size
    return conf


def _json_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _swap(t: torch.Tensor, axis: int) -> torch.Tensor:
    half = t.shape[axis] // 2
    return torch.cat([t.narrow(axis, half, t.shape[axis] - half), t.narrow(axis, 0, half)],
                     dim=axis)


def _quantized_tensors(fmt: str, per_layer: list[dict], swapped: bool
                       ) -> dict[str, torch.Tensor]:
    """The format's tensors of one BFL tensor from its layers' (stacked in order)."""
    rows = LAYOUTS[fmt].rows
    out = {k: torch.cat([p[k] for p in per_layer], dim=rows[k]) if len(per_layer) > 1
           else per_layer[0][k] for k in per_layer[0]}
    if swapped:
        out = {k: _swap(v, rows[k]) for k, v in out.items()}
    if fmt == "float8_e4m3fn":  # the rows' fp8 values under one scale: comfy-kitchen's quantizer
        import comfy_kitchen as ck

        values = out["weight"].float() * out["weight_scale"].float()
        scale = (values.abs().amax() / torch.finfo(torch.float8_e4m3fn).max).clamp(
            min=torch.finfo(torch.float32).tiny).float()
        out = {"weight": ck.quantize_per_tensor_fp8(values, scale, torch.float8_e4m3fn),
               "weight_scale": scale.reshape(())}
    return {k: v.contiguous() for k, v in out.items()}


def export_comfy(pipe: Any, recipe: Recipe, path: str | Path, component: str = "transformer",
                 target: str = "stable", progress: bool = True) -> dict:
    """Write ``recipe`` applied to ``pipe``'s ``component`` (full precision, untouched) as a
    ComfyUI checkpoint at ``path``; returns what was written."""
    import yaml
    from safetensors.torch import save_file

    _kitchen()
    layout, quantized, mapped = plan_file(pipe, recipe, component, target)
    module = components_of(pipe)[component]
    modules = dict(module.named_modules())
    state = module.state_dict()
    dtype = next(module.parameters()).dtype
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, int] = {}
    for name, parts, swapped in tqdm(layout, desc="writing ComfyUI checkpoint", unit="tensor",
                                     disable=not progress):
        owners = [p.rpartition(".")[0] for p in parts]
        if parts[0].endswith(".weight") and owners[0] in quantized:
            cfg, fmt = quantized[owners[0]]
            per_layer = [get_backend(quantized[o][0].method).export_tensors(
                modules[o], quantized[o][0], FORMAT) for o in owners]
            base = name[: -len(".weight")]
            for key, t in _quantized_tensors(fmt, per_layer, swapped).items():
                tensors[f"{base}.{key}"] = t
            tensors[f"{base}.{QUANT_KEY}"] = _json_tensor(_quant_json(fmt, cfg))
            formats[fmt] = formats.get(fmt, 0) + 1
            continue
        t = torch.cat([state[p].detach().cpu() for p in parts]) if len(parts) > 1 \
            else state[parts[0]].detach().cpu()
        tensors[name] = (_swap(t, 0) if swapped else t).to(dtype).contiguous()
    # the newest ComfyUI any of its formats needs (a stable release unless a build is named)
    needs = next((LAYOUTS[f].comfy for f in formats if LAYOUTS[f].comfy != COMFY_STABLE),
                 COMFY_STABLE)
    metadata = {"format": "pt", "autoquant.version": __version__,
                "autoquant.recipe": yaml.safe_dump(recipe.to_dict(), sort_keys=False),
                "autoquant.comfyui": needs}
    path = Path(path)
    with _atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": len(tensors),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "formats": formats, "near_exact": mapped, "comfyui": needs, "target": target}


# -- reading a file back the way ComfyUI does ------------------------------------------------
def _layer_json(raw: torch.Tensor, name: str) -> dict:
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() > _MAX_JSON:
        raise InputError(f"{name}.{QUANT_KEY} is not a short uint8 JSON tensor")
    try:
        conf = json.loads(bytes(raw.tolist()).decode("utf-8"))
    except ValueError:
        conf = None
    if not isinstance(conf, dict) or conf.get("format") not in LAYOUTS:
        fmt = conf.get("format") if isinstance(conf, dict) else None
        raise InputError(f"{name}: comfy_quant format {str(fmt)[:40]!r} is not one autoquant "
                         f"reads ({', '.join(LAYOUTS)})")
    return conf


def _check_shape(name: str, t: torch.Tensor | None, shape: tuple, dtype=None) -> torch.Tensor:
    if t is None:
        raise InputError(f"the file lacks {name}")
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        raise InputError(f"{name} is {tuple(t.shape)} {t.dtype}; the model needs "
                         f"{tuple(shape)}{'' if dtype is None else f' {dtype}'}")
    return t


def _dequantize(name: str, conf: dict, file: dict, shape: tuple, dtype: torch.dtype):
    """The weight ComfyUI computes with: comfy-kitchen's QuantizedTensor, built as ComfyUI's
    mixed-precision loader builds it, dequantized."""
    QuantizedTensor, get_layout_class = _kitchen()
    fmt = conf["format"]
    lay = LAYOUTS[fmt]
    cls = get_layout_class(lay.kitchen)
    n, k = shape
    if fmt == "awq_w4a16":
        group = conf.get("group_size", 64)
        if not isinstance(group, int) or group <= 0 or k % group:
            raise InputError(f"{name}: awq_w4a16 group_size {group!r} does not divide {k}")
        q = _check_shape(f"{name}.weight", file.get(f"{name}.weight"), (n, k // 2), lay.storage)
        scale = _check_shape(f"{name}.weight_scale", file.get(f"{name}.weight_scale"),
                             (k // group, n))
        zeros = _check_shape(f"{name}.weight_zeros", file.get(f"{name}.weight_zeros"),
                             (k // group, n))
        params = cls.Params(scale=scale, zeros=zeros, group_size=group, orig_dtype=dtype,
                            orig_shape=(n, k))
    else:
        q = _check_shape(f"{name}.weight", file.get(f"{name}.weight"), (n, k), lay.storage)
        scale = file.get(f"{name}.weight_scale")
        if scale is None or scale.numel() not in (1, n):
            raise InputError(f"{name}.weight_scale: missing, or neither one scale nor one per "
                             f"row")
        if fmt == "int8_tensorwise" and scale.numel() == n:
            scale = scale.reshape(n, 1)
        params = cls.Params(scale=scale.float(), orig_dtype=dtype, orig_shape=(n, k))
    return QuantizedTensor(q, lay.kitchen, params).dequantize().to(dtype)


def read_comfy(path: str | Path, module: Any, dtype: torch.dtype | None = None
               ) -> dict[str, torch.Tensor]:
    """The diffusers state dict of ``module`` that a ComfyUI checkpoint at ``path`` makes
    (quantized layers dequantized by comfy-kitchen into ``dtype``, ComfyUI's compute dtype;
    the module's by default): the file is untrusted -- every tensor is checked against the
    model's BFL layout before any is used, nothing in it runs."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--comfy {path}: no such file")
    state = module.state_dict()
    dtype = dtype or next(module.parameters()).dtype
    try:
        layout = flux_layout(list(state))
    except ValueError as e:
        raise InputError(str(e)) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            file = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"--comfy {path}: not a readable safetensors file "
                         f"({type(e).__name__}: {str(e)[:120]})") from None
    known = {name for name, _, _ in layout}
    quant = {k[: -len(QUANT_KEY) - 1] for k in file if k.endswith("." + QUANT_KEY)}
    extras = {f"{b}.{s}" for b in quant for s in ("weight_scale", "weight_zeros", QUANT_KEY)}
    unexpected = sorted(set(file) - known - extras)
    missing = sorted(known - set(file))
    if unexpected or missing:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}"
        raise InputError(f"--comfy {path}: the file does not fit this model's Flux checkpoint "
                         f"layout: it {what} ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected tensors)")
    out: dict[str, torch.Tensor] = {}
    try:
        for name, parts, swapped in layout:
            rows = [state[p].shape[0] for p in parts]
            shape = (sum(rows), *state[parts[0]].shape[1:])
            base = name[: -len(".weight")] if name.endswith(".weight") else None
            if base in quant:
                conf = _layer_json(file[f"{base}.{QUANT_KEY}"], base)
                if len(shape) != 2:
                    raise InputError(f"{base}: a quantized tensor that is not a Linear weight")
                t = _dequantize(base, conf, file, shape, dtype)
            else:
                t = _check_shape(name, file[name], shape)
                if not t.is_floating_point():
                    raise InputError(f"{name} is {t.dtype}, not a float tensor")
                t = t.to(dtype)
            if swapped:
                t = _swap(t, 0)
            for p, piece in zip(parts, torch.split(t, rows)):
                out[p] = piece.contiguous()
    except InputError as e:
        raise InputError(f"--comfy {path}: {e}") from None
    return out


def linear_bytes(path: str | Path, module: Any) -> int:
    """Bytes the file holds for ``module``'s Linear layers: each one's weight tensors (codes,
    scales, zeros, its comfy_quant) and bias -- what the quantized plan costs in ComfyUI."""
    from safetensors import safe_open

    state = module.state_dict()
    linears = {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    bases = set()
    for name, parts, _ in flux_layout(list(state)):
        if parts[0].rpartition(".")[0] in linears:
            bases.add(name.rpartition(".")[0])
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if k.rpartition(".")[0] in bases:
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * _DTYPE_BYTES[sl.get_dtype()]
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                "I32": 4, "F64": 8, "I64": 8, "I16": 2, "BOOL": 1}


def load_comfy(path: str | Path, pipe: Any, component: str = "transformer") -> Any:
    """A copy of ``pipe``'s ``component`` holding the weights ComfyUI computes with from the
    checkpoint at ``path`` (plain full-precision layers: each quantized weight dequantized by
    comfy-kitchen, as ComfyUI's loader builds it)."""
    module = components_of(pipe)[component]
    state = read_comfy(path, module)
    loaded = copy.deepcopy(module)
    loaded.load_state_dict(state, strict=True)
    return loaded.eval()


def comfy_snippet(file: str) -> str:
    """How a user loads the file in ComfyUI."""
    return "\n".join([
        f"# ComfyUI: copy {file} into ComfyUI/models/diffusion_models and load it with the",
        "# 'Load Diffusion Model' node (UNETLoader, weight_dtype default): ComfyUI reads each",
        "# layer's comfy_quant and builds its quantized weight itself. Text encoders and VAE",
        "# are the base model's. Or read it in Python the way ComfyUI does:",
        "from safetensors.torch import load_file",
        f"state = load_file({file!r})  # <layer>.weight, .weight_scale, .comfy_quant per layer"])


__all__ = ["export_comfy", "read_comfy", "load_comfy", "linear_bytes", "requirement", "plan_file", "layer_format", "LAYOUTS",
           "TARGETS", "FORMAT", "comfy_snippet"]

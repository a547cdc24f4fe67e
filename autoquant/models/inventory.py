"""The map of a pipeline's quantizable layers: every ``nn.Linear`` of every component.

Names are fully qualified, ``component.path.to.layer`` (``transformer.transformer_blocks.0.attn.to_q``).
For a bare ``nn.Module`` the names are its own module paths, without a component prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable

import torch
from torch import nn

from ..backends import get_backend, methods, owner_of
from ..backends._base import DTYPE_BYTES, QuantConfig

#: components searched and quantized by default, in pipeline order (the denoiser first)
DENOISERS = ("transformer", "unet", "prior", "decoder")


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    name: str
    component: str
    path: str
    out_features: int
    in_features: int
    bias: bool
    dtype: torch.dtype

    @property
    def params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    @property
    def weight_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def bytes(self) -> int:
        """Bytes as the layer stands in full precision (weight + bias in its dtype)."""
        return self.params * DTYPE_BYTES.get(self.dtype, self.dtype.itemsize)

    def fits(self, cfg: QuantConfig) -> str | None:
        """Why this layer cannot take ``cfg`` (shape, dtype), or None."""
        return get_backend(cfg.method).layer_reason(cfg, self.out_features, self.in_features,
                                                    self.dtype)

    def nbytes(self, cfg: QuantConfig) -> int:
        """Exact bytes of this layer under ``cfg`` (full precision: :attr:`bytes`)."""
        return get_backend(cfg.method).nbytes(cfg, self.out_features, self.in_features, self.bias,
                                              self.dtype)


def components_of(target: Any) -> dict[str, nn.Module]:
    """The ``nn.Module`` components of a diffusers pipeline, or ``{"": module}`` for a module."""
    if isinstance(target, nn.Module):
        return {"": target}
    comps = getattr(target, "components", None)
    if not isinstance(comps, dict):
        from .._errors import ArgumentTypeError

        raise ArgumentTypeError(f"expected a diffusers pipeline or an nn.Module, got "
                                f"{type(target).__name__} (load one with "
                                f"autoquant.load_pipeline)")
    return {name: mod for name, mod in comps.items() if isinstance(mod, nn.Module)}


def chosen_components(target: Any, components: list[str] | None, purpose: str
                      ) -> dict[str, nn.Module]:
    """``components`` of a pipeline (default: its denoiser, else every component), each name
    checked: InputError naming the ones it has, for ``purpose`` ("to compile", ...)."""
    from .._errors import InputError

    comps = components_of(target)
    names = components or [c for c in DENOISERS if c in comps][:1] or list(comps)
    missing = [c for c in names if c not in comps]
    if missing:
        raise InputError(f"no component(s) {missing} {purpose}; this pipeline has "
                         f"{sorted(comps)}")
    return {name: comps[name] for name in names}


def component_named(target: Any, name: str, purpose: str = "") -> nn.Module:
    """The component ``name`` of a pipeline; InputError naming the ones it has otherwise
    (``purpose``: what it is wanted for, for the message)."""
    comps = components_of(target)
    if name not in comps:
        from .._errors import InputError

        raise InputError(f"no component {name!r}{f' to {purpose}' if purpose else ''}; this "
                         f"pipeline has {sorted(comps)}")
    return comps[name]


def _qualified(component: str, path: str) -> str:
    return f"{component}.{path}" if component else path


def is_quantizable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` that no backend has quantized yet."""
    return isinstance(module, nn.Linear) and owner_of(module) is None


@dataclasses.dataclass
class Inventory:
    layers: list[LayerInfo]
    components: dict[str, dict[str, int]]  # per component: linear params/bytes and total

    def __post_init__(self):
        self._by_name = {layer.name: layer for layer in self.layers}

    def __getitem__(self, name: str) -> LayerInfo:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def fingerprint(self) -> str:
        """Hash of layer names and shapes: a recipe made for one model refuses another."""
        h = hashlib.sha256()
        for layer in sorted(self.layers, key=lambda l: l.name):
            h.update(f"{layer.name}:{layer.out_features}x{layer.in_features}\n".encode())
        return "sha256:" + h.hexdigest()[:16]

    def select(self, components: Iterable[str] | None) -> list[LayerInfo]:
        if components is None:
            return list(self.layers)
        wanted = set(components)
        return [layer for layer in self.layers if layer.component in wanted]

    def usability(self, layer: LayerInfo, configs: Iterable[QuantConfig] | None = None
                  ) -> dict[str, str | None]:
        """``{config label: None if usable else the reason}`` for representative configs."""
        if configs is None:
            configs = [c for m in methods() for c in get_backend(m).configs()]
        return {cfg.label: layer.fits(cfg) for cfg in configs}

    def to_dict(self, configs: Iterable[QuantConfig] | None = None) -> dict[str, Any]:
        configs = list(configs) if configs is not None else None
        return {
            "fingerprint": self.fingerprint(),
            "components": self.components,
            "layers": [
                {"name": l.name, "component": l.component, "shape": [l.out_features, l.in_features],
                 "bias": l.bias, "dtype": str(l.dtype).replace("torch.", ""), "params": l.params,
                 "bytes": l.bytes,
                 "unusable": {k: v for k, v in self.usability(l, configs).items() if v}}
                for l in self.layers],
        }


def inventory(target: Any) -> Inventory:
    """List the quantizable layers (every ``nn.Linear``) of each component of ``target``."""
    layers: list[LayerInfo] = []
    components: dict[str, dict[str, int]] = {}
    for comp_name, comp in components_of(target).items():
        lin_params = lin_bytes = count = 0
        for path, module in comp.named_modules():
            if not is_quantizable(module):
                continue
            info = LayerInfo(name=_qualified(comp_name, path), component=comp_name, path=path,
                             out_features=module.out_features, in_features=module.in_features,
                             bias=module.bias is not None, dtype=module.weight.dtype)
            layers.append(info)
            lin_params += info.params
            lin_bytes += info.bytes
            count += 1
        total_params = sum(p.numel() for p in comp.parameters())
        total_bytes = sum(p.numel() * p.element_size() for p in comp.parameters()) + sum(
            b.numel() * b.element_size() for b in comp.buffers())
        components[comp_name] = {"linear_layers": count, "linear_params": lin_params,
                                 "linear_bytes": lin_bytes, "params": total_params,
                                 "bytes": total_bytes}
    return Inventory(layers=layers, components=components)

"""What a search knows before it generates a single candidate image.

- :class:`Groups`: the search's decision units (a layer, or layers tied by the space) with the
  candidates each can take, and the layers fixed in full precision (protected, or fitting none).
- :class:`LayerCache`: every (layer, config) quantized once, kept, and swapped in on demand, so a
  trial *assembles* its model instead of quantizing it.
- :func:`capture_denoiser_inputs` + :func:`measure_sensitivity`: the denoiser's real inputs from a
  few full-precision generations (early, middle and late steps), replayed with one group at a
  time quantized to each candidate; the relative output error is the additive proxy the
  allocator minimizes.
- :func:`anchored_sensitivity`: the same table from one replay per group instead of one per
  (group, config): each layer's own output error on its real inputs, for every config, scaled so
  that the group's anchor config matches its replayed error. For large models (Flux-dev: 504
  replays instead of 6,048).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .apply import _parent
from .backends import QuantConfig, config_from_dict, get_backend
from .backends.none import NoneConfig
from .inventory import Inventory, LayerInfo, components_of
from .space import SearchSpace

NONE = config_from_dict({"method": "none"})


@dataclasses.dataclass
class Group:
    name: str
    layers: list[LayerInfo]
    options: list[QuantConfig]

    @property
    def weight_params(self) -> int:
        return sum(l.weight_params for l in self.layers)

    def nbytes(self, cfg: QuantConfig, device: torch.device) -> int:
        return sum(l.nbytes(cfg, device) if not isinstance(cfg, NoneConfig) else l.bytes
                   for l in self.layers)


@dataclasses.dataclass
class Groups:
    groups: list[Group]
    fixed: list[LayerInfo]  # kept in full precision whatever the plan
    components: list[str]

    @classmethod
    def build(cls, inv: Inventory, space: SearchSpace, components: list[str]) -> "Groups":
        layers = [l for l in inv if l.component in components]
        protect = [re.compile(p[3:] if p.startswith("re:") else re.escape(p)) for p in space.protect]
        ties = [re.compile(t) for t in space.tie]
        fixed, by_key = [], {}
        for layer in layers:
            if any(rx.fullmatch(layer.name) for rx in protect):
                fixed.append(layer)
                continue
            key = layer.name
            for rx in ties:
                m = rx.fullmatch(layer.name)
                if m:
                    key = "tie:" + (m.group(1) if m.groups() else m.group(0))
                    break
            by_key.setdefault(key, []).append(layer)
        groups = []
        for key, members in by_key.items():
            options = [c for c in space.candidates
                       if all(l.fits(c) is None for l in members)]
            if any(not isinstance(c, NoneConfig) for c in options):
                groups.append(Group(key, members, options))
            else:
                fixed.extend(members)  # nothing but full precision fits
        return cls(groups, fixed, list(components))

    def plan(self, choice: list[int]) -> dict[str, QuantConfig]:
        out = {l.name: NONE for l in self.fixed}
        for g, k in zip(self.groups, choice):
            for l in g.layers:
                out[l.name] = g.options[k]
        return out


class LayerCache:
    """Quantized replacements of the searched layers, each built once; swapped into the pipeline.

    ``max_bytes`` caps what the cache holds (by the byte formulas): past it, the least recently
    used replacements that are not in the pipeline are dropped and rebuilt if asked for again.
    Without a cap a large model cannot be searched: Flux-dev's 504 layers in the default space's
    12 quantized configs would need ~86 GiB besides its own 22 GiB.
    """

    def __init__(self, pipe: Any, inv: Inventory, device: torch.device,
                 max_bytes: float | None = None):
        self.comps = components_of(pipe)
        self.inv = inv
        self.device = device
        self.max_bytes = max_bytes
        self.originals = {l.name: self.comps[l.component].get_submodule(l.path) for l in inv}
        self.built: OrderedDict[tuple[str, QuantConfig], nn.Module] = OrderedDict()
        self.sizes: dict[tuple[str, QuantConfig], int] = {}
        self.nbytes = 0  # sum of ``sizes``, kept as it changes
        self.installed: dict[str, tuple[str, QuantConfig] | None] = {}
        self.quantize_s = 0.0
        self.builds = 0
        self.evictions = 0

    def module(self, name: str, cfg: QuantConfig) -> nn.Module:
        if isinstance(cfg, NoneConfig):
            return self.originals[name]
        key = (name, cfg)
        if key in self.built:
            self.built.move_to_end(key)
            return self.built[key]
        size = self.inv[name].nbytes(cfg, self.device)
        self._make_room(size)
        t = time.perf_counter()
        with torch.no_grad():
            self.built[key] = get_backend(cfg.method).quantize(self.originals[name], cfg,
                                                               self.device)
        self.quantize_s += time.perf_counter() - t
        self.sizes[key] = size
        self.nbytes += size
        self.builds += 1
        return self.built[key]

    def _make_room(self, size: int) -> None:
        if self.max_bytes is None:
            return
        in_use = set(self.installed.values())
        for key in list(self.built):
            if self.nbytes + size <= self.max_bytes:
                break
            if key not in in_use:
                del self.built[key]
                self.nbytes -= self.sizes.pop(key)
                self.evictions += 1

    def clear(self) -> None:
        """Drop every replacement (the pipeline gets its originals back)."""
        self.restore()
        self.built.clear()
        self.sizes.clear()
        self.nbytes = 0

    def _set(self, name: str, module: nn.Module) -> None:
        layer = self.inv[name]
        parent, child = _parent(self.comps[layer.component], layer.path)
        setattr(parent, child, module)

    def assemble(self, plan: dict[str, QuantConfig]) -> None:
        """Put ``plan``'s modules in place (layers not in ``plan`` get their originals)."""
        want = {name: (name, plan[name]) if name in plan and not isinstance(plan[name], NoneConfig)
                else None for name in self.originals}
        # first take out what changes, so that room can be made from it
        for name, key in want.items():
            if self.installed.get(name) != key:
                self._set(name, self.originals[name])
                self.installed[name] = None
        for name, key in want.items():
            if key is not None and self.installed.get(name) != key:
                self._set(name, self.module(*key))
                self.installed[name] = key

    def restore(self) -> None:
        for name, module in self.originals.items():
            self._set(name, module)
        self.installed.clear()


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _to(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _to(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, fn) for v in obj)
    return obj


def capture_denoiser_inputs(pipe: Any, component: str, run, fractions=(0.1, 0.5, 0.9)) -> list:
    """Run ``run()`` (full-precision generation) and keep the denoiser's call arguments at the
    given fractions of its calls (early, middle, late steps)."""
    module = components_of(pipe)[component]
    calls: list = []

    def hook(_, args, kwargs):
        calls.append(_to((args, kwargs), lambda t: t.detach().clone()))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError(f"the pipeline never called {component}")
    keep = sorted({min(len(calls) - 1, int(f * len(calls))) for f in fractions})
    return stack_inputs([calls[i] for i in keep])


def _cat(values: list, batch: int) -> Any:
    """Concatenate per-sample tensors (leading dim == batch); everything else must be equal
    across the calls (e.g. Flux's position ids, which carry no batch dimension)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.dim() > 0 and first.shape[0] == batch and all(v.shape == first.shape
                                                               for v in values):
            return torch.cat(values)
        if all(v.shape == first.shape and torch.equal(v, first) for v in values):
            return first
        raise ValueError("not stackable")
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values], batch) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([v[i] for v in values], batch) for i in range(len(first)))
    if any(v != first for v in values):
        raise ValueError("not stackable")
    return first


def _batch_size(call) -> int:
    args, kwargs = call
    main = args[0] if args else next(v for k, v in kwargs.items()
                                     if k in ("hidden_states", "sample", "x"))
    return main.shape[0]


def stack_inputs(inputs: list) -> list:
    """The captured calls as one batched call when their shapes allow (one forward instead of
    three per sensitivity probe), else as they are."""
    try:
        return [_cat(inputs, _batch_size(inputs[0]))]
    except (ValueError, TypeError, RuntimeError, StopIteration, AttributeError):
        return inputs


@torch.no_grad()
def denoiser_outputs(pipe: Any, component: str, inputs: list) -> list[torch.Tensor]:
    module = components_of(pipe)[component]
    return [_first_tensor(module(*args, **kwargs)).float() for args, kwargs in inputs]


@torch.no_grad()
def output_error(pipe, component, inputs, refs) -> float:
    """Relative squared error of the denoiser's outputs against full precision."""
    outs = denoiser_outputs(pipe, component, inputs)
    num = sum((o - r).pow(2).sum().item() for o, r in zip(outs, refs))
    den = sum(r.pow(2).sum().item() for r in refs)
    return num / den if torch.isfinite(torch.tensor(num)) else float("inf")


def measure_sensitivity(pipe, cache: LayerCache, groups: Groups, component: str, inputs,
                        refs, progress: bool = True) -> list[list[float]]:
    """``error[g][k]``: relative output error with only group g at option k (others in full
    precision)."""
    table = []
    base = {l.name: NONE for l in cache.inv if l.component in groups.components}
    total = sum(len(g.options) for g in groups.groups)
    bar = tqdm(total=total, desc="sensitivity", unit="cfg", disable=not progress, leave=False,
               mininterval=1)
    for g in groups.groups:
        row = []
        for cfg in g.options:
            if isinstance(cfg, NoneConfig):
                row.append(0.0)
            else:
                plan = dict(base)
                plan.update({l.name: cfg for l in g.layers})
                cache.assemble(plan)
                row.append(output_error(pipe, component, inputs, refs))
            bar.update()
        table.append(row)
    cache.restore()
    bar.close()
    return table


@torch.no_grad()
def capture_layer_inputs(pipe, cache: LayerCache, groups: Groups, component: str, inputs,
                         rows: int = 256) -> dict[str, torch.Tensor]:
    """Each searched layer's input during one full-precision replay of ``inputs``: ``rows`` token
    rows, evenly spaced (the whole activation of a large model would not fit)."""
    names = [l.name for g in groups.groups for l in g.layers]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(_, args, name=name):  # subsampled here: all activations at once would not fit
            x = args[0].reshape(-1, args[0].shape[-1])
            seen[name].append(x[::max(1, x.shape[0] // rows)][:rows].clone())
        handles.append(cache.originals[name].register_forward_pre_hook(hook))
    try:
        cache.restore()
        denoiser_outputs(pipe, component, inputs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, xs in seen.items():
        x = torch.cat(xs)
        step = max(1, x.shape[0] // rows)
        out[name] = x[::step][:rows].clone()
    return out


@torch.no_grad()
def local_errors(cache: LayerCache, groups: Groups, xs: dict[str, torch.Tensor]) -> list[list[float]]:
    """``local[g][k]``: relative output error of group g's own layers at option k, on their inputs."""
    table = []
    for g in groups.groups:
        refs = {l.name: cache.originals[l.name](xs[l.name]).float() for l in g.layers}
        den = sum(r.pow(2).sum().item() for r in refs.values()) or 1.0
        row = []
        for cfg in g.options:
            if isinstance(cfg, NoneConfig):
                row.append(0.0)
                continue
            num = sum((cache.module(l.name, cfg)(xs[l.name]).float() - refs[l.name]).pow(2)
                      .sum().item() for l in g.layers)
            row.append(num / den)
        table.append(row)
    return table


def anchored_sensitivity(pipe, cache: LayerCache, groups: Groups, component: str, inputs,
                         refs, progress: bool = True) -> list[list[float]]:
    """:func:`measure_sensitivity`'s table from one replay per group: the local errors of every
    config, scaled by (replayed error / local error) of the group's anchor -- the config with the
    median local error. A group whose anchor replay is not finite is replayed in full."""
    local = local_errors(cache, groups, capture_layer_inputs(pipe, cache, groups, component, inputs))
    base = {l.name: NONE for l in cache.inv if l.component in groups.components}
    table = []
    for g, row in zip(tqdm(groups.groups, desc="sensitivity (anchored)", unit="group",
                           disable=not progress, leave=False, mininterval=1), local):
        quantized = sorted((k for k, c in enumerate(g.options) if not isinstance(c, NoneConfig)),
                           key=lambda k: row[k])
        anchor = quantized[len(quantized) // 2]
        plan = dict(base)
        plan.update({l.name: g.options[anchor] for l in g.layers})
        cache.assemble(plan)
        replayed = output_error(pipe, component, inputs, refs)
        if not math.isfinite(replayed) or row[anchor] <= 0 or not all(map(math.isfinite, row)):
            table.append(measure_sensitivity(pipe, cache, Groups([g], [], groups.components),
                                             component, inputs, refs, progress=False)[0])
            continue
        scale = replayed / row[anchor]
        table.append([v * scale for v in row])
    cache.restore()
    return table

"""Every (layer, config) quantized once, kept, and swapped in on demand, so a trial *assembles* its
model instead of quantizing it."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..backends import QuantConfig, quantize_layer
from ..models.inventory import Inventory, components_of
from ..plans.swap import swap_module


def collect_garbage() -> None:
    """Free what dropped modules held: the cycle collector, then the allocator's cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LayerCache:
    """Quantized replacements of the searched layers, each built once; swapped into the pipeline.

    ``max_bytes`` caps what the cache holds (by the byte formulas): past it, the least recently
    used replacements that are not in the pipeline are dropped and rebuilt if asked for again.
    Without a cap a large model cannot be searched: Flux-dev's 504 layers in the default space's
    12 quantized configs would need ~86 GiB besides its own 22 GiB.
    """

    def __init__(self, pipe: Any, inv: Inventory, device: torch.device,
                 max_bytes: float | None = None, streamed=()):
        """``streamed``: names of layers whose weights stream from the CPU (a memory plan): a
        plan that keeps one in full precision gets a copy on the device, held here like a
        quantized layer, so that a trial runs wholly on the GPU."""
        self.comps = components_of(pipe)
        self.inv = inv
        self.device = device
        self.max_bytes = max_bytes
        self.originals = {l.name: self.comps[l.component].get_submodule(l.path) for l in inv}
        self.streamed = set(streamed)
        self.built: OrderedDict[tuple[str, QuantConfig], nn.Module] = OrderedDict()
        self.sizes: dict[tuple[str, QuantConfig], int] = {}
        self.nbytes = 0  # sum of ``sizes``, kept as it changes
        self.installed: dict[str, tuple[str, QuantConfig] | None] = {}
        self.quantize_s = 0.0
        self.builds = 0
        self.evictions = 0
        self.shrinks = 0
        self.unfreed = 0  # bytes dropped since the last garbage collection
        self.collect_every: int | None = None  # default: 1 GiB or a tenth of the cap

    def _cached(self, name: str, cfg: QuantConfig) -> bool:
        """Whether the plan's module for (name, cfg) is held here (not the original)."""
        return not cfg.full_precision or name in self.streamed

    def module(self, name: str, cfg: QuantConfig) -> nn.Module:
        if not self._cached(name, cfg):
            return self.originals[name]
        key = (name, cfg)
        if key in self.built:
            self.built.move_to_end(key)
            return self.built[key]
        size = self.inv[name].nbytes(cfg)
        self._make_room(size)
        t = time.perf_counter()
        if cfg.full_precision:  # a streamed layer kept in full precision: a copy on the device
            from ..runtime.streaming import device_copy

            self.built[key] = device_copy(self.originals[name], self.device)
        else:
            self.built[key] = quantize_layer(self.originals[name], cfg, self.device, name)
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
                dropped = self.sizes.pop(key)
                self.nbytes -= dropped
                self.evictions += 1
                self.unfreed += dropped
        # bitsandbytes' and torchao's modules sit in reference cycles: a dropped one keeps its
        # memory until the cycle collector runs (on Flux-dev, ~19 GB beyond the cache's cap)
        if self.unfreed >= (self.collect_every or max(2**30, 0.1 * self.max_bytes)):
            collect_garbage()
            self.unfreed = 0

    def shrink(self, fraction: float = 0.85) -> bool:
        """After an out-of-memory under a memory cap: hold at most ``fraction`` of what the
        cache holds now (least recently used first; installed modules stay). False when there is
        nothing left to give back."""
        if not self.built:
            return False
        before = self.nbytes
        self.max_bytes = min(self.max_bytes or before, before) * fraction
        self._make_room(0)
        self.shrinks += 1
        collect_garbage()
        return self.nbytes < before

    def clear(self) -> None:
        """Drop every replacement (the pipeline gets its originals back)."""
        self.restore()
        self.built.clear()
        self.sizes.clear()
        self.nbytes = 0

    def _set(self, name: str, module: nn.Module) -> None:
        layer = self.inv[name]
        swap_module(self.comps[layer.component], layer.path, module)

    def assemble(self, plan: dict[str, QuantConfig]) -> None:
        """Put ``plan``'s modules in place (layers not in ``plan`` get their originals)."""
        want = {name: (name, plan[name]) if name in plan and self._cached(name, plan[name])
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

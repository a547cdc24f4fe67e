"""Measure the bytes a module really holds, independently of any backend's formula.

Counts every distinct storage reachable from the module: parameters and buffers, the inner
tensors of tensor subclasses (torchao), tensors hung on parameters (bitsandbytes ``quant_state``,
``CB``/``SCB``) and tensors kept in plain attributes or dicts (hqq's ``meta`` scales and zeros).
Storages shared by several references are counted once.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

# Objects of these packages are looked into for tensors (quant states, matmul states): autoquant's
# own, and each registered backend's package (added by the registry, ``crawl_package``).
_CRAWLED_PACKAGES: tuple[str, ...] = ("autoquant",)


def crawl_package(name: str) -> None:
    """Look into objects of package ``name`` for tensors too (a backend's quant states)."""
    global _CRAWLED_PACKAGES
    if name not in _CRAWLED_PACKAGES:
        _CRAWLED_PACKAGES = (*_CRAWLED_PACKAGES, name)
_MAX_DEPTH = 6


def _leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a (possibly subclassed) tensor's data."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _leaf_tensors(inner)
        return
    yield t


def _tensors_in(obj: Any, depth: int, seen_objs: set[int]) -> Iterator[torch.Tensor]:
    if depth > _MAX_DEPTH or id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield from _leaf_tensors(obj)
        # bitsandbytes keeps quant state on the Parameter object itself
        extra = getattr(obj, "__dict__", None)
        if extra:
            for value in extra.values():
                yield from _tensors_in(value, depth + 1, seen_objs)
        return
    if isinstance(obj, nn.Module):
        return  # submodules are visited by the caller
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1, seen_objs)
        return
    if isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value, depth + 1, seen_objs)
        return
    module_name = type(obj).__module__ or ""
    if module_name.startswith(_CRAWLED_PACKAGES) and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors_in(value, depth + 1, seen_objs)


def module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every plain tensor reachable from ``module`` and its submodules (may repeat storages)."""
    seen_objs: set[int] = set()
    for sub in module.modules():
        for key, value in vars(sub).items():
            if key == "_modules":
                continue
            yield from _tensors_in(value, 0, seen_objs)


def measured_bytes(module: nn.Module, device: torch.device | str | None = None) -> int:
    """Bytes of every distinct storage held by ``module`` (optionally only those on ``device``)."""
    want = torch.device(device) if device is not None else None
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in module_tensors(module):
        if t.device.type == "meta":
            continue
        if want is not None and (t.device.type != want.type or
                                 (want.index is not None and t.device.index != want.index)):
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total

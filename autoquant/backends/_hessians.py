"""The input Hessians GPTQ reads: H = X^T X / n per Linear layer, kept on the CPU beside the
layer (a weak reference: it goes when the layer goes). Below the registry: a backend reads it,
:mod:`autoquant.generation.calibration` (scoring's side: it generates images) fills it."""

from __future__ import annotations

import weakref

import torch
from torch import nn

_HESSIANS: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()
_SOURCES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def settings_key(settings) -> tuple:
    """What decides a calibration's images (prompts, seeds, steps, guidance, size)."""
    return (tuple(settings.prompts), tuple(settings.seeds), settings.steps, settings.guidance,
            settings.height, settings.width)


def calibrated_with(linear: nn.Module) -> tuple | None:
    """The :func:`settings_key` of the generation ``linear``'s Hessian came from (None: none,
    or registered by hand)."""
    return _SOURCES.get(linear)


def hessian(linear: nn.Module) -> torch.Tensor | None:
    """``linear``'s input Hessian (float32, CPU), or None if it was never calibrated."""
    return _HESSIANS.get(linear)


def register(linear: nn.Module, h: torch.Tensor) -> None:
    """Give ``linear`` an input Hessian (``in_features`` x ``in_features``) computed elsewhere."""
    n = linear.in_features
    if tuple(h.shape) != (n, n):
        raise ValueError(f"a Hessian for a layer of {n} inputs is {n} x {n}, not {tuple(h.shape)}")
    _HESSIANS[linear] = h.detach().float().cpu()
    _SOURCES.pop(linear, None)


def observe(linear: nn.Linear, x: torch.Tensor) -> None:
    """Register the Hessian of inputs ``x`` (rows of ``in_features``) for ``linear``."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    register(linear, x.T @ x / max(x.shape[0], 1))


def store(linear: nn.Module, h: torch.Tensor, key: tuple | None) -> None:
    """Keep ``h`` as ``linear``'s Hessian, made by the generation ``key`` (a settings key)."""
    _HESSIANS[linear] = h
    if key is None:
        _SOURCES.pop(linear, None)
    else:
        _SOURCES[linear] = key

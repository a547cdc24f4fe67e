"""Calibration data for the methods that need it (``gptq``): each Linear layer's input Hessian
H = X^T X / n, collected while the full-precision pipeline generates a prompt set.

:func:`calibrate` hooks the layers, generates the images (the search's prompt set, or the
model's by default when a recipe is applied) and keeps each layer's H on the CPU, in float32,
beside the layer (a weak reference: it goes when the layer goes). Layers that read the same input
tensor -- a block's q, k and v -- share one matrix. Memory: in_features^2 * 4 bytes per distinct
input (Flux-dev: a few GiB; the demo: a few MiB).
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from torch import nn

from ..backends._hessians import calibrated_with, hessian, observe, register, settings_key, store

#: calibration generates the search prompts from other seeds than the ones it scores: layers
#: rounded against the very activations of the scored images would look better there than on
#: new images, and the search would favour them for it
SEED_OFFSET = 7919


def calibration_seeds(seeds) -> list[int]:
    """The seeds a search with scoring ``seeds`` calibrates with."""
    return [int(s) + SEED_OFFSET for s in seeds]


def settings_for(scoring):
    """The generation a search that scores with ``scoring`` (an EvalSettings) calibrates on."""
    import dataclasses

    return dataclasses.replace(scoring, seeds=tuple(calibration_seeds(scoring.seeds)))


def calibrate(pipe: Any, settings, layers: dict[str, nn.Linear], progress: bool = False
              ) -> dict[str, Any]:
    """Generate ``settings``' images with ``pipe`` (as it is: full precision) and register the
    input Hessian of every layer in ``layers`` ({name: module}). Returns what it did."""
    from .images import generate_images

    start = time.perf_counter()
    sums: dict[nn.Module, list] = {}  # layer -> [sum of x^T x, rows] (or the layer it shares)
    shares: dict[nn.Module, nn.Module] = {}
    last_input: dict[int, tuple[weakref.ref, nn.Module]] = {}  # (weak: no input kept alive)

    def hook(module, args):
        x = args[0]
        if module in shares:
            return
        seen = last_input.get(id(x))
        if seen is not None and seen[0]() is x and module not in sums:
            shares[module] = seen[1]  # same input tensor as a layer before it: one matrix
            return
        last_input[id(x)] = (weakref.ref(x), module)
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        acc = sums.setdefault(module, [None, 0])
        acc[0] = flat.T @ flat if acc[0] is None else acc[0].add_(flat.T @ flat)
        acc[1] += flat.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in layers.values()]
    try:
        with torch.no_grad():
            generate_images(pipe, settings, settings.pairs(), progress=progress)
    finally:
        for h in handles:
            h.remove()
        last_input.clear()
    missing = [name for name, m in layers.items() if m not in sums and m not in shares]
    if missing:
        raise RuntimeError(f"calibration: {len(missing)} layer(s) never ran while generating, "
                           f"e.g. {missing[:3]}")
    matrices = {m: (acc[0] / max(acc[1], 1)).cpu() for m, acc in sums.items()}
    key = settings_key(settings)
    for m in layers.values():
        store(m, matrices[shares.get(m, m)], key)
    return {"layers": len(layers), "matrices": len(matrices),
            "bytes": sum(h.numel() * 4 for h in matrices.values()),
            "images": len(settings.pairs()), "seconds": time.perf_counter() - start}


__all__ = ["calibrate", "calibrated_with", "calibration_seeds", "hessian", "register", "observe",
           "settings_for", "settings_key"]

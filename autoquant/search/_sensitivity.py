"""The sensitivity table: ``error[g][k]``, the relative output error of the denoiser with only
group g at option k (everything else in full precision) -- the additive proxy the solver
minimizes.

- ``full``: one replay per (group, config): exact, 1,032 replays on the demo.
- ``anchored``: one replay per group. Each layer's own output error on its real inputs is
  measured for every config (cheap), then scaled so that the group's anchor -- the config with
  the median local error -- matches its replayed error. Flux-dev: 504 replays instead of 6,048.
- ``images``: one generation of the search images per (group, config), each image's squared
  error against its reference: the damage the scores see, through every step, the guidance and
  the decoder. A replay sees one denoiser call; with classifier-free guidance a text-stream
  error that looks small there is multiplied by the guidance scale, and the sampler compounds
  it (demo-flux, GGUF types: the replay table's plan scored 2.3 dB *below* uniform Q4_K, this
  table's +1.4 dB above it). The slowest mode: a generation per entry (demo-flux: 34 groups x
  12 configs in 6 min on 2 CPU cores). Rows hold one list per option (its per-image errors); the
  planner (:class:`~autoquant.search._budget.Planner`) maximizes the predicted mean PSNR.
- ``auto``: times one replay; full when the whole pass would take at most ``limit_s``.

Rows can be measured for any subset of groups (``indices``), so that several workers can share
one table.
"""

from __future__ import annotations

import math
import time

import torch

from .._errors import InputError
from .._progress import tqdm
from ._cache import LayerCache, collect_garbage
from ._groups import Group, Groups
from ._replay import Replay

MODES = ("auto", "full", "anchored", "images")


def _only(cache: LayerCache, g: Group, cfg) -> None:
    """Assemble the model with group ``g`` at ``cfg`` and everything else as it is."""
    cache.assemble({l.name: cfg for l in g.layers})


def _replayed(replay: Replay, cache: LayerCache, g: Group, cfg) -> float:
    """The denoiser's relative output error with only group ``g`` at ``cfg``."""
    _only(cache, g, cfg)
    return replay.error()


def _retrying(cache: LayerCache, work):
    """``work()``; if the GPU runs out of memory, the layer cache gives memory back and the
    work is done again (a memory cap is a promise the search keeps)."""
    emptied = False
    while True:
        try:
            return work()
        except torch.cuda.OutOfMemoryError:
            if not emptied:  # first, garbage and what the allocator holds but does not use
                emptied = True
                collect_garbage()
                continue
            if not cache.shrink():
                raise


def _rows(cache: LayerCache, groups: Groups, indices: list[int], progress: bool, desc: str,
          fp_value, measure_one) -> dict[int, list]:
    """One value per (group in ``indices``, option): ``fp_value`` for full precision,
    ``measure_one()`` with only that group at the option otherwise."""
    rows = {}
    total = sum(len(groups.groups[i].options) for i in indices)
    bar = tqdm(total=total, desc=desc, unit="cfg", disable=not progress, leave=False,
               mininterval=1)
    try:
        for i in indices:
            g = groups.groups[i]
            row = []
            for cfg in g.options:
                def once(g=g, cfg=cfg):  # assembled inside the retry: a cache that gave
                    _only(cache, g, cfg)  # memory back rebuilds it
                    return measure_one()

                row.append(fp_value() if cfg.full_precision else _retrying(cache, once))
                bar.update()
            rows[i] = row
    finally:
        cache.restore()
        bar.close()
    return rows


def full_rows(replay: Replay, cache: LayerCache, groups: Groups, indices: list[int],
              progress: bool = True) -> dict[int, list[float]]:
    return _rows(cache, groups, indices, progress, "sensitivity", lambda: 0.0, replay.error)


@torch.no_grad()
def _local_errors(replay: Replay, cache: LayerCache, group: Group,
                  xs: dict[str, torch.Tensor]) -> list[float]:
    """Relative output error of the group's own layers at each option, on their real inputs."""
    xs = {l.name: xs[l.name].to(cache.device) for l in group.layers}  # kept on the CPU
    refs = {l.name: cache.originals[l.name](xs[l.name]).float() for l in group.layers}
    den = sum(r.pow(2).sum().item() for r in refs.values()) or 1.0
    row = []
    for cfg in group.options:
        if cfg.full_precision:
            row.append(0.0)
            continue
        num = sum((cache.module(l.name, cfg)(xs[l.name]).float() - refs[l.name]).pow(2)
                  .sum().item() for l in group.layers)
        row.append(num / den)
    return row


def anchored_rows(replay: Replay, cache: LayerCache, groups: Groups, indices: list[int],
                  progress: bool = True, xs: dict | None = None) -> dict[int, list[float]]:
    """``xs``: every searched layer's captured inputs, when the caller keeps them (a worker
    measuring several chunks captures them once)."""
    cache.restore()
    if xs is None:
        xs = replay.layer_inputs({l.name: cache.originals[l.name] for i in indices
                                  for l in groups.groups[i].layers})
    rows = {}
    try:
        for i in tqdm(indices, desc="sensitivity (anchored)", unit="group",
                      disable=not progress, leave=False, mininterval=1):
            g = groups.groups[i]
            local = _retrying(cache, lambda: _local_errors(replay, cache, g, xs))
            quantized = sorted((k for k, c in enumerate(g.options) if not c.full_precision),
                               key=lambda k: local[k])
            anchor = quantized[len(quantized) // 2]
            replayed = _retrying(cache, lambda: _replayed(replay, cache, g, g.options[anchor]))
            if not math.isfinite(replayed) or local[anchor] <= 0 or \
                    not all(map(math.isfinite, local)):
                rows[i] = full_rows(replay, cache, groups, [i], progress=False)[i]
                continue
            scale = replayed / local[anchor]
            rows[i] = [v * scale for v in local]
    finally:
        cache.restore()
    return rows


@torch.no_grad()
def image_errors(evaluator) -> list[float]:
    """Each search image's mean squared error against its reference, the pipeline as it stands
    (a non-finite image: inf)."""
    from .._errors import NonFiniteError

    try:
        images = evaluator.images()
    except NonFiniteError:
        return [math.inf] * len(evaluator.pairs)
    refs = evaluator.references.to(images.device)
    return (images.float() - refs.float()).pow(2).flatten(1).mean(1).tolist()


def image_rows(evaluator, cache: LayerCache, groups: Groups, indices: list[int],
               progress: bool = True) -> dict[int, list[list[float]]]:
    """``images`` mode: ``rows[g][k]`` = per-image errors with only group g at option k."""
    return _rows(cache, groups, indices, progress, "sensitivity (images)",
                 lambda: [0.0] * len(evaluator.pairs), lambda: image_errors(evaluator))


def measure(mode: str, replay: Replay, cache: LayerCache, groups: Groups,
            indices: list[int] | None = None, progress: bool = True,
            xs: dict | None = None, evaluator=None) -> dict[int, list]:
    """Rows of the table for ``indices`` (default: every group) in ``mode`` (full, anchored,
    images -- which generates with ``evaluator``, the search's own)."""
    indices = list(range(len(groups.groups))) if indices is None else list(indices)
    if mode == "images":
        if evaluator is None:
            raise ValueError("sensitivity images needs the search's evaluator")
        return image_rows(evaluator, cache, groups, indices, progress)
    if mode == "anchored":
        return anchored_rows(replay, cache, groups, indices, progress, xs)
    return full_rows(replay, cache, groups, indices, progress)


def choose_mode(requested: str, replay: Replay, cache: LayerCache, groups: Groups,
                limit_s: float, progress: bool = True) -> tuple[str, float | None]:
    """``(full | anchored, seconds of one replay or None)``. ``auto`` times one replay and
    measures in full when the whole pass takes at most ``limit_s``."""
    if requested not in MODES:
        raise InputError(f"sensitivity {requested!r}: choose one of {', '.join(MODES)}")
    if requested != "auto":
        return requested, None  # (images: chosen only on request, the slowest mode)
    g = groups.groups[0]
    cfg = next(c for c in g.options if not c.full_precision)
    _only(cache, g, cfg)
    replay.error()  # warm-up
    t = time.perf_counter()
    replay.error()
    probe_s = time.perf_counter() - t
    cache.restore()
    replays = sum(sum(not c.full_precision for c in g.options) for g in groups.groups)
    full = probe_s * replays <= limit_s
    if not full and progress:
        tqdm.write(f"sensitivity: {replays} replays x {probe_s:.2f} s would take "
                   f"{probe_s * replays / 60:.1f} min; measuring {len(groups.groups)} anchors "
                   f"instead (--sensitivity full to insist)")
    return ("full" if full else "anchored"), probe_s

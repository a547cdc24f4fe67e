"""Searching and evaluating inside a GPU memory cap (``--gpu-memory 24GiB``).

What has to be on the GPU, and when:

- the **text encoders**, when they are not searched, encode each batch of prompts once per
  study (:mod:`autoquant.generation.embeddings` keeps the embeddings); they live on the CPU and stream
  through the GPU when a batch is new;
- each other component is **resident** (on the GPU whole) or **streamed**: its Linear weights
  stay in pinned CPU memory and visit the GPU one layer at a time (:mod:`autoquant.runtime.streaming`),
  its other tensors are resident. The largest components stream first, until the rest fits;
- a **trial** runs with its assembled plan wholly on the GPU (quantized layers and the plan's
  full-precision layers, all held by the layer cache), so images are made at full speed;
- the **layer cache** gets what is left: cap - resident tensors - streaming window - the
  generation's activations (measured on the first full-precision generation) - a margin.

Where the cap cannot hold the resident tensors, one assembled plan at the budget and the
activations, the search is refused with the smallest cap that would work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch

from .._errors import InputError
from .._format import human_bytes
from .streaming import window_bytes

GiB = 2**30
TEXT_ENCODER_PREFIX = "text_encoder"
#: activations assumed before the first generation measures them (share of the cap)
PROVISIONAL_ACTIVATIONS = 0.25
ALLOCATOR_SLACK = 64 * 2**20


def spare_encoders(pipe: Any, searched: list[str]) -> list[str]:
    """The text encoders whose embeddings can be kept once per batch: not searched, and the
    pipeline has an ``encode_prompt`` to memoize (without one they are components like any
    other)."""
    from ..models.inventory import components_of

    if not callable(getattr(pipe, "encode_prompt", None)):
        return []
    return [c for c in components_of(pipe) if c.startswith(TEXT_ENCODER_PREFIX)
            and c not in searched]


def parse_memory(text: str | float | int) -> int:
    """Bytes from ``24GiB``, ``24GB``, ``16000MiB`` or a number of bytes."""
    from .._format import parse_budget

    kind, value = parse_budget(str(text)) if not isinstance(text, (int, float)) else (
        "bytes", float(text))
    if kind != "bytes":
        raise InputError(f"--gpu-memory {text!r}: give bytes with a unit, e.g. 24GiB or 16GB")
    return int(value)


def margin(cap: int) -> int:
    """Headroom kept free: allocator fragmentation (0.4 GiB reserved but unallocated under a
    24 GiB cap on Flux), library workspaces, and the quantized layers' dequantization
    temporaries, which the full-precision generation that measures the activations lacks."""
    return max(GiB, int(0.06 * cap))


@dataclasses.dataclass
class ComponentSize:
    total: int         # every parameter and buffer
    linear: int        # the Linear layers' weights and biases (what can stream)
    largest_linear: int


def decide(sizes: dict[str, ComponentSize], encoders: list[str], cap: int, plan_bytes: int,
           activations: int, depth: int = 3) -> tuple[dict[str, str], int]:
    """Where each component lives (``resident``, ``streamed``, ``encode``) and the GPU bytes
    that needs, for ``cap``: the encoders are ``encode`` (CPU, streamed when encoding); the
    others resident until the largest must stream. ``plan_bytes``: one assembled plan (held by
    the layer cache besides the resident components)."""
    place = {c: "encode" if c in encoders else "resident" for c in sizes}

    def need() -> int:
        total = plan_bytes + activations + margin(cap)
        window = 0
        for c, where in place.items():
            if where == "resident":
                total += sizes[c].total
            else:  # streamed, or encode: before the plan and the cache exist, its window only
                if where == "streamed":
                    total += sizes[c].total - sizes[c].linear
                window = max(window, window_bytes(depth, sizes[c].largest_linear))
        return total + window

    for c in sorted((c for c in place if place[c] == "resident"),
                    key=lambda c: -sizes[c].linear):
        if need() <= cap:
            break
        if sizes[c].linear:
            place[c] = "streamed"
    return place, need()


def round_up(n: int, step: int = GiB // 2) -> int:
    return int(math.ceil(n / step) * step)


class MemoryPlan:
    """Placement of a pipeline's components on one CUDA device under ``cap`` bytes (see the
    module docstring). ``searched``: the components whose layers the search swaps (their
    assembled plan, ``plan_bytes``, lives in the layer cache)."""

    def __init__(self, pipe: Any, device: torch.device, cap: int | None, searched: list[str],
                 plan_bytes: int, enforce: bool = False, encode_once: bool = True,
                 placement: dict[str, str] | None = None, inv: Any = None):
        """``placement``: where components go, overriding the choice (``resident``,
        ``streamed``, ``encode``; a benchmark comparing them, a test on a small model).
        ``inv``: the pipeline's :func:`~autoquant.models.inventory.inventory`, if the caller has it."""
        from ..models.inventory import components_of, inventory
        from .streaming import LayerStreamer

        self.pipe, self.device = pipe, torch.device(device)
        if self.device.type != "cuda":
            raise InputError(f"--gpu-memory is for a CUDA device; this run is on {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(self.device).total_memory
        self.device_bytes = total
        self.cap = min(cap, total) if cap is not None else total
        if cap is not None and cap > total:
            raise InputError(f"--gpu-memory {human_bytes(cap)} is more than "
                             f"{torch.cuda.get_device_name(self.device)} has ({human_bytes(total)})")
        self.enforced = enforce
        self.searched, self.plan_bytes = list(searched), int(plan_bytes)
        self.comps = components_of(pipe)
        self.inv = inv = inv if inv is not None else inventory(pipe)
        self.linear_modules = {c: [m.get_submodule(l.path) for l in inv if l.component == c]
                               for c, m in self.comps.items()}
        self.sizes = {}
        for c in self.comps:
            layer_bytes = [l.bytes for l in inv if l.component == c]
            self.sizes[c] = ComponentSize(inv.components[c]["bytes"], sum(layer_bytes),
                                          max(layer_bytes, default=0))
        self.encoders = spare_encoders(pipe, searched) if encode_once else []
        self.streamer = LayerStreamer(self.device)
        self.activations: int | None = None
        self.measured: dict[str, int] = {}
        self.cache_bytes: int | None = None
        self.peaks = {"allocated": 0, "reserved": 0}
        self.fragmentation = 0  # reserved but unallocated at the measured peak
        self.resident_bytes: int | None = None  # on the GPU when the cache was sized
        self.placement, need = decide(self.sizes, self.encoders, self.cap, self.plan_bytes,
                                      int(PROVISIONAL_ACTIVATIONS * self.cap))
        for c, where in (placement or {}).items():
            if c not in self.comps or where not in ("resident", "streamed", "encode") or (
                    where == "encode" and c not in self.encoders):
                raise InputError(f"cannot place {c!r} {where!r}: components {sorted(self.comps)}"
                                 f", encoders {self.encoders}")
            self.placement[c] = where
        floor, floor_need = decide(self.sizes, self.encoders, 0, self.plan_bytes, 0)
        if floor_need > self.cap:  # even with everything streamed and no activations
            raise InputError(self._too_small(floor_need, measured=False))
        self.embeddings = None

    # -- doing it ------------------------------------------------------------------------------
    def place(self) -> "MemoryPlan":
        """Move every component where the plan says; the CPU keeps what streams."""
        from ..generation.embeddings import PromptEmbeddings

        if self.enforced:
            # the allocator's reserved peak was seen 10 MiB above its fraction (twice, Flux on an
            # H100 at 24 GiB): the fraction leaves it that slack under the cap
            torch.cuda.set_per_process_memory_fraction(
                (self.cap - ALLOCATOR_SLACK) / self.device_bytes, self.device)
        for c, where in self.placement.items():
            self._put(c, where)
        if self.encoders:
            self.embeddings = PromptEmbeddings.install(self.pipe, self.encoders, self._encoding)
        return self

    def _put(self, c: str, where: str) -> None:
        module = self.comps[c]
        if where == "resident":
            module.to(self.device)
            return
        self.streamer.attach(self.linear_modules[c])  # Linear weights home, to the CPU
        others = set(self.linear_modules[c])
        target = self.device if where == "streamed" else torch.device("cpu")
        for sub in module.modules():
            if sub not in others:
                sub._apply(lambda t: t.to(target), recurse=False)

    @contextlib.contextmanager
    def _encoding(self):
        """The text encoders' small tensors on the GPU while they encode (their Linear weights
        stream); back to the CPU after."""
        for c in self.encoders:
            self._move_non_linear(c, self.device)
        try:
            yield
        finally:
            for c in self.encoders:
                self._move_non_linear(c, torch.device("cpu"))

    def _move_non_linear(self, c: str, device: torch.device) -> None:
        linear = set(self.linear_modules[c])
        for sub in self.comps[c].modules():
            if sub not in linear:
                sub._apply(lambda t: t.to(device), recurse=False)

    def streamed_layers(self) -> set[str]:
        """Names of the Linear layers that stream (the layer cache copies them in for trials)."""
        return {l.name for l in self.inv if self.placement.get(l.component) == "streamed"}

    @contextlib.contextmanager
    def unstreamed(self, components: list[str]):
        """Stop streaming ``components`` for a while (``evaluate`` applies a recipe onto the
        GPU inside it; the layers it keeps in full precision move there whole)."""
        streamed = [c for c in components if self.placement.get(c) == "streamed"]
        modules = [m for c in streamed for m in self.linear_modules[c]]
        self.streamer.detach(modules)  # their weights stay home, pinned: no copy either way
        try:
            yield
        finally:
            self.streamer.attach(modules)

    # -- measuring and sizing --------------------------------------------------------------------
    def _reset_peak(self) -> None:
        """Reset the allocator's peaks, keeping the run's own (reported at the end)."""
        self.peaks["allocated"] = max(self.peaks["allocated"],
                                      torch.cuda.max_memory_allocated(self.device))
        self.peaks["reserved"] = max(self.peaks["reserved"],
                                     torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def start_trial(self) -> None:
        self._reset_peak()

    def trial_peak(self) -> int:
        """Peak bytes allocated since :meth:`start_trial`."""
        return torch.cuda.max_memory_allocated(self.device)

    @contextlib.contextmanager
    def measure(self, what: str, scale: float = 1.0):
        """Measure the activations of the work inside (peak allocated above the start, less the
        streaming window) and keep the largest, times ``scale``."""
        torch.cuda.synchronize(self.device)
        self._reset_peak()
        torch.cuda.empty_cache()  # what the allocator holds from before is not this work's
        base = torch.cuda.memory_allocated(self.device)
        self.streamer.peak_window_bytes = self.streamer.window_bytes
        yield
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        used = max(0, peak - base - self.streamer.peak_window_bytes)
        self.measured[what] = used
        self.activations = max(self.activations or 0, int(used * scale))
        # the cap holds what the allocator reserves: its fragmentation counts too
        self.fragmentation = max(self.fragmentation,
                                 torch.cuda.max_memory_reserved(self.device) - peak)

    def first_generation(self, what: str, work, scale: float = 1.0) -> None:
        """``work()`` -- the first full-precision generation -- measured (see :meth:`measure`).
        If it runs out of memory under the cap, it is done again without the cap (the card may
        hold more) to learn what it needs, and the search is refused with the smallest cap that
        would work."""
        try:
            with self.measure(what, scale):
                work()
            return
        except torch.cuda.OutOfMemoryError:
            self.streamer.release()
        # outside the except: its traceback would keep the failed run's tensors alive
        torch.cuda.empty_cache()
        self.refuse_after_oom(work)

    def refuse_after_oom(self, rerun) -> None:
        """``rerun()`` the first generation with the cap lifted, measuring it; then refuse
        with the smallest cap (or a lower bound, if even the whole card is too small)."""
        torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        try:
            with self.measure("first generation, uncapped"):
                rerun()
        except torch.cuda.OutOfMemoryError:
            self.streamer.release()
            raise InputError(
                f"--gpu-memory {human_bytes(self.cap)} cannot hold one full-precision "
                f"generation of this pipeline at these settings, nor can the whole "
                f"{human_bytes(self.device_bytes)} card; use a smaller --batch-size or --size") \
                from None
        need = self._fixed_bytes() + self.plan_bytes
        raise InputError(self._too_small(max(need, int(self.cap * 1.05)), measured=True))

    def _fixed_bytes(self) -> int:
        """What the GPU holds besides the layer cache: the tensors on it now, the streaming
        window, the measured activations and fragmentation, and the margin."""
        torch.cuda.synchronize(self.device)
        self.resident_bytes = torch.cuda.memory_allocated(self.device)
        return (self.resident_bytes + self.streamer.planned_window_bytes
                + (self.activations or 0) + self.fragmentation + margin(self.cap))

    def size_cache(self, user_bytes: float | None = None) -> int:
        """The layer cache's bytes: what the cap leaves after the tensors on the GPU now, the
        streaming window and the measured activations. Refuses if one assembled plan at the
        budget does not fit. ``user_bytes`` (``--cache-gib``) is taken as given, unless a cap
        was asked for and it exceeds what the cap leaves."""
        fixed = self._fixed_bytes()
        room = self.cap - fixed
        # streamed: the whole assembled plan is in the cache; resident: its quantized layers
        need = self.plan_bytes
        if room < need:
            raise InputError(self._too_small(fixed + need, measured=True))
        if user_bytes is not None and self.enforced and user_bytes > room:
            raise InputError(f"--cache-gib {user_bytes / GiB:.2f} does not fit under "
                             f"--gpu-memory {human_bytes(self.cap)}: at most "
                             f"{room / GiB:.2f} GiB is left for the layer cache")
        self.cache_bytes = int(user_bytes if user_bytes is not None else room)
        return self.cache_bytes

    def _too_small(self, need: int, measured: bool) -> str:
        how = ("measured: resident tensors, streaming window, activations of one generation, "
               "one assembled plan at the budget and a margin" if measured else
               "with every component streamed and before any activation: a lower bound")
        return (f"--gpu-memory {human_bytes(self.cap)} cannot hold this search: it needs at "
                f"least {human_bytes(need)} ({how}). Give --gpu-memory "
                f"{round_up(need) / GiB:g}GiB or more, a smaller budget, or a smaller "
                f"--batch-size / --size")

    # -- what is printed and recorded --------------------------------------------------------------
    def describe(self) -> str:
        parts = []
        for c, where in self.placement.items():
            what = {"resident": "on the GPU", "streamed": "streamed layer by layer",
                    "encode": "on the CPU, streamed to encode each prompt batch once"}[where]
            parts.append(f"{c or '(module)'} {human_bytes(self.sizes[c].total)}: {what}")
        cache = f"; layer cache {human_bytes(self.cache_bytes)}" if self.cache_bytes else ""
        act = (f"; activations {human_bytes(self.activations)} (measured)"
               if self.activations is not None else "")
        return (f"GPU memory {human_bytes(self.cap)} on {self.device}: " + "; ".join(parts)
                + act + cache)

    def to_dict(self) -> dict[str, Any]:
        d = {"device": str(self.device), "cap_bytes": self.cap, "enforced": self.enforced,
             "device_bytes": self.device_bytes, "placement": dict(self.placement),
             "component_bytes": {c: s.total for c, s in self.sizes.items()},
             "plan_bytes": self.plan_bytes, "activations_bytes": self.activations,
             "activations_measured": dict(self.measured), "cache_bytes": self.cache_bytes,
             "fragmentation_bytes": self.fragmentation, "margin_bytes": margin(self.cap),
             "resident_bytes": self.resident_bytes,
             "streaming": {"window_bytes": self.streamer.planned_window_bytes,
                           "peak_window_bytes": self.streamer.peak_window_bytes,
                           "bytes_copied": self.streamer.bytes_copied,
                           "prefetch_depth": self.streamer.depth}}
        if self.embeddings is not None:
            d["embeddings"] = {"batches": len(self.embeddings.cache),
                               "encoded": self.embeddings.misses, "reused": self.embeddings.hits,
                               "bytes": self.embeddings.nbytes}
        self._reset_peak()
        d["peak_allocated_bytes"] = self.peaks["allocated"]
        d["peak_reserved_bytes"] = self.peaks["reserved"]
        return d

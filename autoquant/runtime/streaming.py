"""Layer streaming: Linear weights that live on the CPU and visit the GPU one layer at a time.

A component too large for the GPU keeps its Linear weights (and biases) in pinned CPU memory;
just before a layer runs its tensors are copied to the device, and dropped right after. While a
layer runs, the next ``depth`` layers (in the order the model last called them) are already
being copied on a side CUDA stream, so the copies overlap compute. GPU memory held for weights is
at most ``depth + 1`` layers -- the streaming *window*.

Everything else about the module stays as it was (its class, its other parameters, its place in
the model), so the search's layer cache can still swap quantized layers in and out: a streamed
layer that is swapped out is simply never called.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, deque

import torch
from torch import nn


def window_bytes(depth: int, largest_layer: int) -> int:
    """The most weight bytes a stream holds on the device at once: ``depth + 1`` of the largest
    layers loaded, and as many the GPU may still be computing with."""
    return 2 * (depth + 1) * largest_layer


class LayerStreamer:
    def __init__(self, device: torch.device, depth: int = 3):
        self.device = torch.device(device)
        self.depth = depth
        self.home: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self.loaded: OrderedDict[nn.Module, tuple[dict[str, torch.Tensor], object]] = OrderedDict()
        self.next: dict[nn.Module, nn.Module] = {}  # the layer that ran after each, last time
        self.prev: nn.Module | None = None
        self.handles: dict[nn.Module, list] = {}
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending: deque = deque()  # events after each streamed layer's compute
        self.bytes_copied = 0
        self.window_bytes = 0      # weight bytes on the device now
        self.peak_window_bytes = 0

    # -- which modules stream ------------------------------------------------------------------
    def attach(self, modules) -> None:
        """Stream ``modules`` (their parameters go to pinned CPU memory; each copy of a module
        to the device lasts one forward)."""
        for m in modules:
            if m in self.home:
                continue
            home = {}
            for name, p in m.named_parameters(recurse=False):
                t = p.data.detach().to("cpu")
                if self.cuda and not t.is_pinned():
                    t = t.pin_memory()
                p.data = t
                home[name] = t
            self.home[m] = home
            self.handles[m] = [m.register_forward_pre_hook(self._before),
                               m.register_forward_hook(self._after)]

    def detach(self, modules=None, device: torch.device | str | None = None) -> None:
        """Stop streaming ``modules`` (default: all); their parameters stay on the CPU (pinned),
        or move to ``device``."""
        self.release()
        for m in list(self.home if modules is None else modules):
            if m not in self.home:
                continue
            for h in self.handles.pop(m):
                h.remove()
            home = self.home.pop(m)
            if device is not None:
                for name, t in home.items():
                    getattr(m, name).data = t.to(device)
        self.next = {a: b for a, b in self.next.items() if a in self.home and b in self.home}

    def release(self) -> None:
        """Drop every copy on the device (prefetched ones too), e.g. after an out-of-memory."""
        for m in list(self.loaded):
            self._drop(m)
        for m, home in self.home.items():
            for name, t in home.items():
                getattr(m, name).data = t
        self.prev = None

    def streams(self, module: nn.Module) -> bool:
        return module in self.home

    @property
    def layer_bytes(self) -> int:
        """Bytes of the largest streamed layer."""
        return max((sum(t.numel() * t.element_size() for t in home.values())
                    for home in self.home.values()), default=0)

    @property
    def planned_window_bytes(self) -> int:
        return window_bytes(self.depth, self.layer_bytes)

    # -- the hooks -------------------------------------------------------------------------------
    def _copy(self, m: nn.Module) -> None:
        home = self.home[m]
        if self.cuda:
            # no wait on the compute stream: the sources are pinned CPU tensors nobody writes,
            # and the allocator keeps a block of the side stream until record_stream's uses end
            with torch.cuda.stream(self.stream):
                tensors = {n: t.to(self.device, non_blocking=True) for n, t in home.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
        else:  # a CPU "device" (tests): a real copy, so the bookkeeping is exercised
            tensors, event = {n: t.clone() for n, t in home.items()}, None
        self.loaded[m] = (tensors, event)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self.bytes_copied += size
        self.window_bytes += size
        self.peak_window_bytes = max(self.peak_window_bytes, self.window_bytes)

    def _drop(self, m: nn.Module) -> None:
        tensors, _ = self.loaded.pop(m)
        self.window_bytes -= sum(t.numel() * t.element_size() for t in tensors.values())

    def _upcoming(self, m: nn.Module) -> list[nn.Module]:
        out, cur = [], m
        for _ in range(self.depth):
            cur = self.next.get(cur)
            if cur is None or cur is m or cur in out:
                break
            out.append(cur)
        return out

    def _before(self, m: nn.Module, args) -> None:
        if self.prev is not None and self.prev is not m:
            self.next[self.prev] = m
        self.prev = m
        upcoming = self._upcoming(m)
        keep = {m, *upcoming}
        for other in [o for o in self.loaded if o not in keep]:
            self._drop(other)  # prefetched on a guess that did not come true
        if m not in self.loaded:
            self._copy(m)
        tensors, event = self.loaded[m]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors.values():
                t.record_stream(current)  # freed after this stream used it, not before
        for name, t in tensors.items():
            getattr(m, name).data = t
        for n in upcoming:
            if n not in self.loaded:
                self._copy(n)

    def _after(self, m: nn.Module, args, output) -> None:
        for name, t in self.home[m].items():
            getattr(m, name).data = t
        if m in self.loaded:
            self._drop(m)
        if self.cuda:
            # The CPU stays within ``depth + 1`` layers of the GPU. Unthrottled it queues a
            # whole forward of copies ahead, and the allocator must hold every layer still in
            # use on the GPU: on Flux under a 24 GiB cap, 10 GB reserved above what was
            # allocated, up to the cap.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.pending.append(event)
            while len(self.pending) > self.depth + 1:
                self.pending.popleft().synchronize()


def device_copy(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a leaf module (a Linear) with its tensors on ``device`` and no hooks: what the
    layer cache installs for a full-precision layer of a streamed component during a trial."""
    if any(True for _ in module.children()):
        raise ValueError(f"device_copy is for leaf modules, got {type(module).__name__} "
                         f"with children")
    clone = copy.copy(module)  # same class and attributes; new __dict__
    clone._parameters = {n: None if p is None else nn.Parameter(
        p.detach().to(device, copy=True), requires_grad=p.requires_grad)
        for n, p in module._parameters.items()}
    clone._buffers = {n: None if b is None else b.to(device, copy=True)
                      for n, b in module._buffers.items()}
    clone._modules = {}
    for key, value in list(vars(clone).items()):
        if "hooks" in key and isinstance(value, dict):
            setattr(clone, key, OrderedDict())
    return clone

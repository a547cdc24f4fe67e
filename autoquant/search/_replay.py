"""The denoiser's real inputs, captured once from full-precision generations (early, middle and
late steps), and its full-precision outputs on them. Replaying them with some layers quantized
gives the relative output error that the sensitivity table and each trial's proxy are made of."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from .._errors import InputError
from ..models.inventory import components_of


class Replay:
    def __init__(self, pipe: Any, component: str, inputs: list):
        self.pipe, self.component, self.inputs = pipe, component, inputs
        self.refs = self.outputs()

    @property
    def module(self) -> torch.nn.Module:
        return components_of(self.pipe)[self.component]

    @classmethod
    def capture(cls, pipe: Any, component: str, run: Callable[[], Any],
                fractions=(0.1, 0.5, 0.9)) -> "Replay":
        """Run ``run()`` (full-precision generation) and keep the denoiser's call arguments at the
        given fractions of its calls."""
        module = components_of(pipe)[component]
        calls: list = []

        def hook(_, args, kwargs):
            calls.append(_map(lambda t: t.detach().clone(), (args, kwargs)))

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            run()
        finally:
            handle.remove()
        if not calls:
            raise RuntimeError(f"the pipeline never called {component}")
        keep = sorted({min(len(calls) - 1, int(f * len(calls))) for f in fractions})
        return cls(pipe, component, stack_inputs([calls[i] for i in keep]))

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        module = self.module
        return [_first_tensor(module(*args, **kwargs)).float() for args, kwargs in self.inputs]

    @torch.no_grad()
    def error(self) -> float:
        """Relative squared error of the denoiser's outputs (as it stands) against full precision."""
        outs = self.outputs()
        num = sum((o - r).pow(2).sum().item() for o, r in zip(outs, self.refs))
        den = sum(r.pow(2).sum().item() for r in self.refs)
        return num / den if torch.isfinite(torch.tensor(num)) else float("inf")

    def step_call(self) -> tuple:
        """One denoiser call for one sample: the first of the captured calls, batch 1 (every
        tensor whose first dimension is the batch is cut to its first row)."""
        return first_sample(self.inputs[0], _batch_size(self.inputs[0]))

    @torch.no_grad()
    def step_seconds(self, repeats: int = 3) -> float:
        """Measured seconds of one step (:meth:`step_call`) of the denoiser as it stands."""
        from ..runtime.latency import time_call

        args, kwargs = self.step_call()
        module = self.module
        device = next(module.parameters()).device
        return time_call(lambda: module(*args, **kwargs), device, repeats=repeats, warmup=1)

    @torch.no_grad()
    def layer_inputs(self, modules: dict[str, torch.nn.Module], rows: int = 256
                     ) -> dict[str, torch.Tensor]:
        """Each module's input during one replay: ``rows`` token rows, evenly spaced (the whole
        activation of a large model would not fit). ``modules`` must be in the model as it is."""
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        handles = []
        for name, mod in modules.items():
            def hook(_, args, name=name):  # subsampled here: all activations at once would not fit
                x = args[0].reshape(-1, args[0].shape[-1])
                seen[name].append(x[::max(1, x.shape[0] // rows)][:rows].to("cpu", copy=True))
            handles.append(mod.register_forward_pre_hook(hook))
        try:
            self.outputs()
        finally:
            for h in handles:
                h.remove()
        out = {}
        for name, xs in seen.items():  # on the CPU: every layer's rows would crowd the GPU
            x = torch.cat(xs)
            out[name] = x[::max(1, x.shape[0] // rows)][:rows].to("cpu", copy=True)
        return out

    # -- sharing between workers: plain tensors + a JSON skeleton, never a pickle ---------------
    def save(self, path: str | Path) -> Path:
        from .._atomic import save_safetensors as save_file

        tensors: dict[str, torch.Tensor] = {}

        def put(t: torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = t.detach().cpu().contiguous()
            return {"tensor": key}

        skeleton = _map(put, self.inputs, leaf=_plain)
        save_file(tensors, str(path), metadata={"skeleton": json.dumps(skeleton),
                                                "format": "autoquant-replay/1"})
        return Path(path)

    @classmethod
    def load(cls, pipe: Any, component: str, path: str | Path,
             device: torch.device) -> "Replay":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "autoquant-replay/1":
                raise InputError(f"{path} is not an autoquant replay file")
            tensors = {k: f.get_tensor(k).to(device) for k in f.keys()}
        return cls(pipe, component, _unflatten(json.loads(meta["skeleton"]), tensors))


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot share a denoiser argument of type {type(value).__name__}")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict) and set(node) == {"tensor"}:
        return tensors[node["tensor"]]
    if isinstance(node, dict) and set(node) == {"value"}:
        return node["value"]
    if isinstance(node, dict) and set(node) == {"dict"}:
        return {k: _unflatten(v, tensors) for k, v in node["dict"].items()}
    if isinstance(node, dict) and set(node) == {"list"}:
        return [_unflatten(v, tensors) for v in node["list"]]
    if isinstance(node, dict) and set(node) == {"tuple"}:
        return tuple(_unflatten(v, tensors) for v in node["tuple"])
    raise InputError("malformed replay file")


def _map(fn, obj: Any, leaf=None) -> Any:
    """``fn`` on every tensor of a nested (args, kwargs) structure. With ``leaf``, the result is
    a JSON skeleton (containers tagged) and other values go through ``leaf``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = {k: _map(fn, v, leaf) for k, v in obj.items()}
        return {"dict": out} if leaf else out
    if isinstance(obj, (list, tuple)):
        items = [_map(fn, v, leaf) for v in obj]
        if leaf:
            return {"tuple" if isinstance(obj, tuple) else "list": items}
        return type(obj)(items)
    return leaf(obj) if leaf else obj


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


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
    except (ValueError, TypeError, RuntimeError, StopIteration, AttributeError, KeyError):
        return inputs


def first_sample(call: tuple, batch: int) -> tuple:
    """``(args, kwargs)`` of a denoiser call cut to its first sample: every tensor whose first
    dimension is ``batch`` keeps its first row."""
    def cut(t):
        return t[:1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t

    args, kwargs = call
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

"""How long a plan's denoiser step takes, predicted from a few measurements.

- :class:`LatencyTable`: the time of one forward of a Linear layer of a given shape, on a given
  number of token rows, under each config, measured on this device in the deployment mode
  (``eager`` or ``compile``: ``torch.compile``). Cached on disk (``$AUTOQUANT_CACHE/latency``)
  per device name, library versions, mode (and, compiled, Inductor's tuning settings), with a
  checksum; the distinct keys are few (Flux-dev has under ten Linear shapes), so a whole space
  costs minutes, not hours.
- :class:`LatencyModel`: a plan's step time = the measured full-precision step + the sum over its
  layers of (quantized layer time - full-precision layer time), each layer with the rows it sees
  in one step (read once from a real step).

"One step" is one denoiser call for one sample (batch 1), as captured from the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .._errors import InputError
from .._paths import cache_dir
from ..backends import QuantConfig, backend_for, full_precision, quantize_layer

MODES = ("eager", "compile")
#: bumped when a backend changes what its layers run (2: torchao int8 weight-only compiles to
#: an opaque op), so tables timed with the old layers are not reused
LAYERS_REVISION = 2
#: the Inductor settings that change which kernels a compiled layer gets (a process that
#: quantized with torchao's defaults had coordinate descent tuning on)
_TUNING = ("max_autotune", "max_autotune_gemm", "coordinate_descent_tuning",
           "coordinate_descent_check_all_directions")
_log = logging.getLogger("autoquant")


def parse_latency(text: str) -> tuple[str, float]:
    """``("relative", 1.0)`` from ``1.0x``; ``("seconds", 0.15)`` from ``150ms`` or ``0.15s``."""
    import re

    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(x|ms|s)", t)
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"latency {text!r}: use a multiple of full precision's step (1.0x) or "
                         f"a time per step (150ms, 0.15s)")
    value, unit = float(m.group(1)), m.group(2)
    return ("relative", value) if unit == "x" else ("seconds",
                                                    value / 1000 if unit == "ms" else value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_call(fn: Callable[[], Any], device: torch.device, repeats: int = 15,
              warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (after ``warmup`` calls), device work included."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@contextlib.contextmanager
def compiled(module: nn.Module, whole: bool = False, mode: str | None = None
             ) -> Iterator[Callable]:
    """``module`` under ``torch.compile`` as deployed (regionally where it declares repeated
    blocks, see :mod:`autoquant.runtime.compile`; ``whole``: one graph; ``mode``: a
    ``torch.compile`` mode) inside the ``with`` block, eager again after."""
    from .compile import compile_module, uncompile

    done = compile_module(module, whole, mode)
    try:
        yield module
    finally:
        uncompile(done)


@dataclasses.dataclass(frozen=True)
class LayerShape:
    out_features: int
    in_features: int
    bias: bool
    dtype: str
    rows: int

    @property
    def key(self) -> str:
        return (f"{self.out_features}x{self.in_features}{'+b' if self.bias else ''}"
                f"-{self.dtype}-r{self.rows}")


class LatencyTable:
    """Seconds of one layer forward per (shape, config) on ``device`` in ``mode``."""

    def __init__(self, device: torch.device, mode: str = "eager", path: Path | None = None,
                 repeats: int = 15):
        if mode not in MODES:
            raise InputError(f"latency mode {mode!r}: choose one of {', '.join(MODES)}")
        self.device, self.mode, self.repeats = torch.device(device), mode, repeats
        self.path = path or self._default_path()
        self.entries: dict[str, float] = self._load()
        self.measured = 0

    def _default_path(self) -> Path:
        import diffusers

        name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                else f"cpu-{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}t")
        versions = [str(torch.__version__), diffusers.__version__, f"layers{LAYERS_REVISION}"]
        from ..backends import package_versions

        versions += [v or "-" for v in package_versions().values()]
        if self.mode == "compile":  # Inductor's tuning picks other kernels: other times
            from torch._inductor import config as inductor

            versions += [f"{k}={getattr(inductor, k)}" for k in _TUNING]
        digest = hashlib.sha256("|".join([name, *versions]).encode()).hexdigest()[:12]
        slug = "".join(c if c.isalnum() else "-" for c in name)[:40]
        return cache_dir() / "latency" / f"{slug}-{digest}-{self.mode}.json"

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            ok = (data.get("sha256") == _digest(entries) and isinstance(entries, dict)
                  and all(isinstance(v, float) and math.isfinite(v) and v >= 0
                          for v in entries.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        if not ok:
            _log.warning("autoquant: the latency cache %s does not verify; measuring again",
                         self.path)
            return {}
        return dict(entries)

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{__import__('os').getpid()}.tmp")
            tmp.write_text(json.dumps({"entries": self.entries,
                                       "sha256": _digest(self.entries)}, indent=1))
            tmp.replace(self.path)
        except OSError:  # a read-only cache only costs re-measuring
            pass

    def seconds(self, shape: LayerShape, cfg: QuantConfig) -> float:
        cfg = backend_for(cfg).timing_config(cfg)  # (a calibrated method: its storage's kernels)
        key = f"{shape.key}|{cfg.label}"
        if key not in self.entries:
            self.entries[key] = self._measure(shape, cfg)
            self.measured += 1
        return self.entries[key]

    def _measure(self, shape: LayerShape, cfg: QuantConfig) -> float:
        dtype = getattr(torch, shape.dtype)
        gen = torch.Generator().manual_seed(0)
        linear = nn.Linear(shape.in_features, shape.out_features, bias=shape.bias, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.02)
        linear.requires_grad_(False)
        module = quantize_layer(linear, cfg, self.device)
        x = torch.randn(shape.rows, shape.in_features, generator=gen).to(self.device, dtype)
        if self.mode == "compile":
            # a lone layer through torch.compile's wrapper: ``nn.Module.compile`` on a bare
            # Linear holding a torchao fp8 weight fails in Dynamo (torch 2.11, torchao 0.18:
            # "Polyfill handler ... __eq__"), where the same layer inside a compiled block works
            from .._compat import pin_inductor_simd

            pin_inductor_simd()
            torch._dynamo.reset()
            fn = torch.compile(module, dynamic=False)
            return time_call(lambda: fn(x), self.device, self.repeats)
        return time_call(lambda: module(x), self.device, self.repeats)


def _deployed(module: nn.Module, mode: str) -> contextlib.AbstractContextManager[Callable]:
    """``module`` as ``mode`` runs it (compiled afresh in ``compile`` mode)."""
    if mode != "compile":
        return contextlib.nullcontext(module)
    torch._dynamo.reset()
    return compiled(module)


def _digest(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def layer_rows(module: nn.Module, call: tuple, layers: dict[str, nn.Module]) -> dict[str, list[int]]:
    """Token rows each layer sees in one call of ``module`` (a list: one entry per call)."""
    rows: dict[str, list[int]] = {name: [] for name in layers}
    handles = [m.register_forward_pre_hook(
        lambda _, a, name=name: rows[name].append(int(a[0].reshape(-1, a[0].shape[-1]).shape[0])))
        for name, m in layers.items()]
    try:
        args, kwargs = call
        module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return rows


class LatencyModel:
    """Predicted step time of any plan, from a :class:`LatencyTable` and one real step.

    A layer timed alone pays launch and synchronization costs that a whole model partly hides
    (the GPU queue stays full), so the raw sum over-predicts (on the H100, Flux-dev: +17% on
    average over 12 mixed plans). :meth:`calibrate` makes each config's uniform plan predict its
    measured step: by scaling the config's per-layer deltas when they agree in sign with the
    measured difference, or else — per-layer differences lost in timing noise, as for the demo's
    small layers on a CPU, where a scaled sum of deltas of mixed signs predicted negative steps —
    by sharing the measured difference out over the layers in proportion to their time under the
    config. Either way a mixed plan's step lies between full precision's and its configs'
    uniform steps."""

    def __init__(self, table: LatencyTable, shapes: dict[str, list[LayerShape]],
                 fp_step_s: float):
        self.table, self.shapes, self.fp_step_s = table, shapes, fp_step_s
        self.scale: dict[str, float] = {}  # config label -> calibration factor
        self.shares: dict[str, dict[str, float]] = {}  # config label -> {layer: seconds}
        self.uniform_step_s: dict[str, float] = {}  # config label -> its uniform plan's step

    def raw_delta(self, layer: str, cfg: QuantConfig) -> float:
        if cfg.full_precision:
            return 0.0
        none = full_precision()
        return sum(self.table.seconds(s, cfg) - self.table.seconds(s, none)
                   for s in self.shapes[layer])

    def delta(self, layer: str, cfg: QuantConfig) -> float:
        """Seconds this layer adds to a step under ``cfg`` (negative: it saves time)."""
        shares = self.shares.get(cfg.label)
        if shares is not None and layer in shares:
            return shares[layer]
        return self.raw_delta(layer, cfg) * self.scale.get(cfg.label, 1.0)

    def calibrate(self, cfg: QuantConfig, layers: list[str], measured_step_s: float) -> float:
        """Make the plan with ``cfg`` on ``layers`` (and full precision elsewhere) predict
        ``measured_step_s``. Returns the factor the deltas were scaled by (1.0 when they were
        shared out instead)."""
        self.uniform_step_s[cfg.label] = measured_step_s
        raws = {name: self.raw_delta(name, cfg) for name in layers}
        raw = sum(raws.values())
        wanted = measured_step_s - self.fp_step_s
        if all(v * wanted > 0 for v in raws.values()) and abs(raw) > 0.02 * self.fp_step_s:
            self.scale[cfg.label] = min(max(wanted / raw, 0.1), 10.0)
            self.shares.pop(cfg.label, None)
            return self.scale[cfg.label]
        times = {name: sum(self.table.seconds(s, cfg) for s in self.shapes[name])
                 for name in layers}
        total = sum(times.values()) or 1.0
        self.shares[cfg.label] = {name: wanted * t / total for name, t in times.items()}
        self.scale.pop(cfg.label, None)
        return 1.0

    def predict(self, plan: dict[str, QuantConfig]) -> float:
        return self.fp_step_s + sum(self.delta(name, cfg) for name, cfg in plan.items())


def build_model(module: nn.Module, call: tuple, layers: dict[str, nn.Module],
                configs: dict[str, list[QuantConfig]], device: torch.device, mode: str,
                progress: bool = False, assemble: Callable | None = None
                ) -> tuple[LatencyModel, float]:
    """Measure what a :class:`LatencyModel` needs for ``layers`` and their candidate ``configs``
    (``{layer: [configs]}``): the full-precision step in ``mode``, each layer's rows per step,
    and every distinct (shape, config) the table lacks. With ``assemble(plan or None)`` (put a
    plan's modules in place; None: full precision back), each config's uniform plan is timed
    too and the model calibrated on it. Returns ``(model, seconds spent)``."""
    from .._progress import tqdm

    start = time.perf_counter()
    args, kwargs = call
    with _deployed(module, mode) as fn:
        fp_step = time_call(lambda: fn(*args, **kwargs), device, repeats=7)
    rows = layer_rows(module, call, layers)
    shapes = {}
    for name, m in layers.items():
        shapes[name] = [LayerShape(m.out_features, m.in_features, m.bias is not None,
                                   str(m.weight.dtype).replace("torch.", ""), r)
                        for r in rows[name]]
    table = LatencyTable(device, mode)
    todo = {(s, c) for name, cs in configs.items() for s in shapes[name]
            for c in [*cs, full_precision()]}
    saved = time.perf_counter()
    for s, c in tqdm(sorted(todo, key=lambda sc: (sc[0].key, sc[1].label)), desc="latency table",
                     unit="layer", disable=not progress, leave=False):
        table.seconds(s, c)
        if time.perf_counter() - saved > 30:  # an interrupted run keeps what it measured
            table.save()
            saved = time.perf_counter()
    table.save()
    model = LatencyModel(table, shapes, fp_step)
    if assemble is not None:
        distinct = {c.label: c for cs in configs.values() for c in cs if not c.full_precision}
        for cfg in tqdm(list(distinct.values()), desc="latency calibration", unit="config",
                        disable=not progress, leave=False):
            names = [n for n, cs in configs.items() if cfg in cs]
            assemble({n: cfg for n in names})
            with _deployed(module, mode) as fn:
                step = time_call(lambda: fn(*args, **kwargs), device, repeats=5)
            model.calibrate(cfg, names, step)
            assemble(None)
    return model, time.perf_counter() - start

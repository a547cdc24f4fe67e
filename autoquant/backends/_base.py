"""What a quantization method must provide.

A method is a small frozen config dataclass, validated in ``__post_init__`` (the recipe's
``{method: ..., bits: ..., option: ...}`` mapping), plus one :class:`Backend` registered for it.
The backend turns one ``nn.Linear`` into its quantized replacement, says in advance how many bytes
that replacement will hold on a device (an exact formula, checked against measured bytes by the
contract suite), and refuses clearly -- before anything is modified -- where it cannot run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from .._errors import ConfigError

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def weight_stub(out_features: int, in_features: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """A tensor of a Linear weight's shape that stores one value (stride 0): what LoRA loaders
    read of ``layer.weight`` (shape, device, dtype) on layers that store codes instead. Never
    written to; made on each read, so it follows the layer's device."""
    return torch.zeros((), dtype=dtype, device=device).expand(out_features, in_features)


def float_and_group_reason(dtype: torch.dtype, in_features: int, group_size: int | None,
                           computes: str = "") -> str | None:
    """The checks every method starts its ``layer_reason`` with: a float weight, and (for grouped
    formats) ``in_features`` a multiple of the group size."""
    if dtype not in DTYPE_BYTES:
        return f"dtype {dtype} is not a float type{' ' + computes if computes else ''}"
    if group_size and in_features % group_size:
        return f"in_features={in_features} is not divisible by group_size={group_size}"
    return None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Base of every method's config. Subclasses are frozen dataclasses; ``method`` names them."""

    method: ClassVar[str] = ""
    #: True only for ``none``: the layer stays as it is and counts towards the full-precision cap
    full_precision: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """The recipe form: ``{"method": ..., <every field>}``. Plain data, YAML-safe."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @property
    def nominal_bits(self) -> float:
        """Bits per weight code (not counting scales); full precision reports its dtype width."""
        return float(getattr(self, "bits"))

    @property
    def label(self) -> str:
        """Short, unique, human-readable name, e.g. ``hqq4-g64`` or ``bnb4-nf4-dq``."""
        return self.method


def check_int(name: str, value: Any, allowed: tuple[int, ...] | None = None, *,
              minimum: int | None = None, method: str = "") -> None:
    """Raise a ConfigError unless ``value`` is an int (not a bool) allowed for ``name``."""
    where = f"{method}: " if method else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}{name} must be an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where}{name}={value} is not supported; choose one of {list(allowed)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}{name}={value} must be >= {minimum}")


def check_choice(name: str, value: Any, allowed: tuple[Any, ...], *, method: str = "") -> None:
    where = f"{method}: " if method else ""
    if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
        raise ConfigError(f"{where}{name}={value!r} is not supported; choose one of {list(allowed)}")


#: ``Backend.formats(cfg)["diffusers"]`` of a backend whose layers diffusers makes itself, from
#: :meth:`Backend.diffusers_config` (the other values: "dtype", or the file format holding them)
QUANTIZATION_CONFIG = "quantization_config"


class Backend(ABC):
    """One quantization method. Stateless; one instance lives in the registry."""

    name: ClassVar[str]
    config_cls: ClassVar[type[QuantConfig]]
    #: device types the method can run on at all ("cpu", "cuda"); finer checks in unavailable_reason
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    #: the package it needs (import name, pip name), checked before anything is touched
    package: ClassVar[tuple[str, str] | None] = None
    #: the loggers of that package whose notices are not the user's business (quieted by
    #: ``autoquant._quiet``; shown with ``--debug``)
    loggers: ClassVar[tuple[str, ...]] = ()
    #: why its layers cannot run under ``torch.compile`` in one graph (None: they can; tested
    #: by the contract suite on every device)
    compile_reason: ClassVar[str | None] = None

    # -- feasibility: all of these are answered without touching any model -------------------
    def unavailable_reason(self, cfg: QuantConfig, device: torch.device) -> str | None:
        """Why ``cfg`` cannot run on ``device`` (missing package, device type, kernel), or None."""
        if self.package and importlib.util.find_spec(self.package[0]) is None:
            return f"{self.package[1]} is not installed: pip install {self.package[1]}"
        if device.type not in self.devices:
            return (f"{cfg.label} runs on {'/'.join(self.devices)} only, not on {device.type}")
        return None

    def layer_reason(self, cfg: QuantConfig, out_features: int, in_features: int,
                     dtype: torch.dtype) -> str | None:
        """Why a Linear of this shape and dtype cannot take ``cfg``, or None when it can."""
        return None

    #: whether quantizing needs :mod:`autoquant.generation.calibration` data (search and apply collect it)
    calibrated: ClassVar[bool] = False

    def needs_calibration(self, cfg: QuantConfig) -> bool:
        """Whether quantizing with ``cfg`` needs calibration data (a method may need it for some
        of its configs only, e.g. GGUF with an importance matrix)."""
        return self.calibrated

    def timing_config(self, cfg: QuantConfig) -> QuantConfig:
        """The config whose layer the latency table times for ``cfg`` (the same kernels; a
        calibrated method is timed as its uncalibrated storage, which needs no data)."""
        return cfg

    def owns(self, module: nn.Module) -> bool:
        """Is ``module`` a layer this method built (so it is no longer a plain, quantizable
        ``nn.Linear``)?"""
        return False

    @abstractmethod
    def nbytes(self, cfg: QuantConfig, out_features: int, in_features: int, bias: bool,
               dtype: torch.dtype) -> int:
        """Exact bytes the quantized layer holds on any device: codes, scales, zeros, metadata,
        bias (every layout autoquant uses is the same on the CPU and on CUDA)."""

    # -- doing it -----------------------------------------------------------------------------
    @abstractmethod
    def quantize(self, linear: nn.Linear, cfg: QuantConfig, device: torch.device) -> nn.Module:
        """A new module on ``device`` replacing ``linear``; ``linear`` itself is left unchanged."""

    @abstractmethod
    def export_state(self, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Plain tensors and JSON-able metadata that rebuild ``module`` without re-quantizing."""

    @abstractmethod
    def import_state(self, cfg: QuantConfig, out_features: int, in_features: int, bias: bool,
                     dtype: torch.dtype, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     device: torch.device) -> nn.Module:
        """Inverse of :meth:`export_state`. Called only on state that passed
        :meth:`state_problems`: saved folders are untrusted data."""

    def expected_tensors(self, cfg: QuantConfig, out_features: int, in_features: int,
                         bias: bool, dtype: torch.dtype) -> dict[str, tuple[tuple, torch.dtype]]:
        """``{name: (shape, dtype)}`` of every tensor :meth:`export_state` writes for such a
        layer -- what a saved layer must hold, exactly."""
        raise NotImplementedError

    def state_problems(self, cfg: QuantConfig, out_features: int, in_features: int, bias: bool,
                       dtype: torch.dtype, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> list[str]:
        """What is wrong with a saved layer's tensors and metadata (empty: it can be built).
        Backends with metadata check it here against an allow-list; nothing in it is ever
        evaluated."""
        want = self.expected_tensors(cfg, out_features, in_features, bias, dtype)
        problems = []
        for name in sorted(set(want) - set(tensors)):
            problems.append(f"missing tensor {name!r}")
        for name in sorted(set(tensors) - set(want)):
            problems.append(f"unexpected tensor {name!r}")
        for name, (shape, dt) in want.items():
            t = tensors.get(name)
            if t is not None and (tuple(t.shape) != tuple(shape) or t.dtype != dt):
                problems.append(f"tensor {name!r} is {tuple(t.shape)} {t.dtype}, "
                                f"{cfg.label} needs {tuple(shape)} {dt}")
        if meta:
            problems.append(f"unexpected metadata {sorted(meta)}")
        return problems

    def configs(self) -> list[QuantConfig]:
        """Representative configs (every supported bit width, default options) for the contract
        suite, the inventory and the search spaces."""
        return []

    def formats(self, cfg: QuantConfig) -> dict[str, str]:
        """``{export format: how it holds cfg's layers}`` for every format that can hold them
        exactly (the weights scored are the weights shipped); a format not named cannot. For
        ``gguf`` the value is the GGUF tensor type (``dtype``: the model's own float type)."""
        return {"autoquant-folder": "save_quantized: the tensors and metadata export_state writes"}

    def near_format(self, cfg: QuantConfig, fmt: str) -> str | None:
        """A type of ``fmt`` that holds ``cfg``'s layers *nearly* exactly (the same codes, its
        scales rounded to the format's precision), or None. A file made this way is not what
        was scored: it must be scored again (the exporter says so)."""
        return None

    def near_export(self, linear: nn.Linear, cfg: QuantConfig, fmt: str):
        """The ``near_format`` tensor of ``linear`` (raw bytes, rows of ``out_features``)."""
        raise NotImplementedError

    def export_tensors(self, linear: nn.Linear, cfg: QuantConfig, fmt: str
                       ) -> dict[str, torch.Tensor]:
        """``{tensor suffix: tensor}`` holding ``linear`` quantized with ``cfg`` in ``fmt``'s
        layout (``comfy``: ``weight``, ``weight_scale``, ...), made by this backend's own
        quantizer from the original weights: exactly the scored weights where ``formats(cfg)``
        names ``fmt``, nearly (``near_format``) otherwise."""
        raise NotImplementedError(f"{self.name} writes no {fmt} tensors")

    def lora_layers(self) -> dict[type, type]:
        """``{quantized module class: peft LoRA layer class}`` (registered on a LoraConfig with
        peft's custom-module hook by :func:`autoquant.plans.lora.lora_config`): peft's own LoRA
        layer for the module with merging refused (:func:`autoquant.backends._lora.
        refusing_merge`), or one of the backend's where peft has none; {} for a backend whose
        layers are plain Linears."""
        return {}

    def diffusers_config(self, configs: dict[str, QuantConfig]) -> Any:
        """diffusers' ``quantization_config`` that makes, while diffusers loads a component,
        exactly the layers this backend makes for ``{module path: config}`` (every other layer
        left alone). Backends whose ``formats`` say ``"diffusers": QUANTIZATION_CONFIG``
        provide it."""
        raise NotImplementedError(f"{self.name} has no diffusers quantization config")

    def _calibrates(self) -> bool | str:
        """True / False, or "per config" where :meth:`needs_calibration` decides per config."""
        if self.calibrated or type(self).needs_calibration is Backend.needs_calibration:
            return self.calibrated
        return "per config"

    def describe(self) -> dict[str, Any]:
        """What the registry knows about this method, as plain data (``autoquant inspect
        --methods``): its config's fields with their defaults and the values its representative
        configs take, the package it needs, the loggers it quiets, whether it calibrates,
        whether it compiles in one graph, and the export formats of each config."""
        reps = self.configs()
        fields = {}
        for f in dataclasses.fields(self.config_cls):
            default = None if f.default is dataclasses.MISSING else f.default
            values = sorted({getattr(c, f.name) for c in reps}, key=repr)
            fields[f.name] = {"type": str(f.type), "default": default, "values": values}
        return {"method": self.name, "fields": fields,
                "configs": [c.label for c in reps],
                "package": self.package[1] if self.package else None,
                "import": self.package[0] if self.package else None,
                "loggers": list(self.loggers), "calibrated": self._calibrates(),
                "devices": list(self.devices), "compile_reason": self.compile_reason,
                "formats": {c.label: self.formats(c) for c in reps}}

"""The registry of quantization methods: the one place that knows them. One backend = one file.

A recipe entry such as ``{method: hqq, bits: 3, group_size: 64}`` becomes a config with
:func:`config_from_dict`; :func:`get_backend` gives the backend that applies it. Everything else
asks the registry -- whether a module is already quantized (:func:`owner_of`), a config's bits
(``cfg.nominal_bits``), whether it keeps full precision (``cfg.full_precision``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .. import _quiet
from .._errors import BackendError, ConfigError
from . import measure as _bytes
from ._base import QUANTIZATION_CONFIG, Backend, QuantConfig
from .bnb import BnbBackend
from .gguf import GGUFBackend
from .gptq import GPTQBackend
from .higgs import HiggsBackend
from .hqq import HQQBackend
from .none import NoneBackend
from .torchao import TorchaoBackend

#: method name -> backend. The order is that of `methods()`, the inventory's columns and spaces.
_REGISTRY: dict[str, Backend] = {b.name: b for b in (
    NoneBackend(), HQQBackend(), BnbBackend(), TorchaoBackend(), HiggsBackend(), GPTQBackend(),
    GGUFBackend())}


def register_backend(backend: Backend) -> Backend:
    """Add a third-party backend under its ``name`` (the ``method`` string of recipes)."""
    if backend.name in _REGISTRY:
        raise ValueError(f"method {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    _announce(backend)
    return backend


def _announce(backend: Backend) -> None:
    """Tell the helpers below the registry what a backend brings: loggers to quiet, a package
    whose objects hold tensors that count as the layer's bytes."""
    _quiet.add_loggers(backend.loggers)
    if backend.package:
        _bytes.crawl_package(backend.package[0])


for _backend in _REGISTRY.values():
    _announce(_backend)


def get_backend(method: str) -> Backend:
    try:
        return _REGISTRY[method]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown method {method!r}; known methods: {sorted(_REGISTRY)}") from None


def methods() -> list[str]:
    return list(_REGISTRY)


def packages() -> list[str]:
    """The import names of the packages the registered backends need, in registry order."""
    return list(dict.fromkeys(b.package[0] for b in _REGISTRY.values() if b.package))


def package_versions() -> dict[str, str | None]:
    """``{package: version}`` of :func:`packages` (None: not installed): what a study and the
    latency table record, since another version may quantize or time differently."""
    from .._quiet import import_quietly

    out: dict[str, str | None] = {}
    for package in packages():
        try:
            out[package] = import_quietly(package).__version__
        except ImportError:
            out[package] = None
    return out


def backend_for(cfg: QuantConfig) -> Backend:
    return get_backend(cfg.method)


def owner_of(module: nn.Module) -> Backend | None:
    """The backend that built ``module``, or None for a layer no method has touched."""
    return next((b for b in _REGISTRY.values() if b.owns(module)), None)


def full_precision() -> QuantConfig:
    """The config that keeps a layer as it is (``{method: none}``)."""
    return _REGISTRY["none"].config_cls()


#: what a quantization library raises when it fails on a layer (kernels, shape checks, memory);
def describe() -> list[dict[str, Any]]:
    """:meth:`Backend.describe` of every registered method, with the installed version of its
    package (None: not installed)."""
    versions = package_versions()
    return [{**b.describe(), "version": versions.get(b.package[0]) if b.package else None}
            for b in _REGISTRY.values()]


#: anything else (TypeError, AttributeError, ...) is a bug and is not turned into a user error
LIBRARY_FAILURES = (RuntimeError, ValueError, AssertionError, NotImplementedError, MemoryError)


def quantize_layer(linear: nn.Linear, cfg: QuantConfig, device: torch.device,
                   name: str = "") -> nn.Module:
    """``cfg``'s replacement of ``linear`` on ``device`` (``linear`` is left as it is). A library
    failure becomes a :class:`BackendError` naming the layer and the config."""
    from .._quiet import quietly  # the libraries' import-time chatter is not the user's business

    try:
        with torch.no_grad(), quietly():
            return get_backend(cfg.method).quantize(linear, cfg, device)
    except LIBRARY_FAILURES as e:
        raise BackendError(f"quantizing {name or 'a layer'} with {cfg.label} failed: "
                           f"{type(e).__name__}: {e}") from e


def config_from_dict(entry: Mapping[str, Any]) -> QuantConfig:
    """Build and validate a method config from its recipe mapping. Raises ConfigError."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"expected a mapping like {{method: hqq, bits: 4}}, got {entry!r}")
    if "method" not in entry:
        raise ConfigError(f"missing 'method' in {dict(entry)!r}")
    fields = dict(entry)
    backend = get_backend(fields.pop("method"))
    cls = backend.config_cls
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(map(str, set(fields) - allowed))
    if unknown:
        raise ConfigError(f"{backend.name}: unknown option(s) {unknown}; "
                          f"allowed: {sorted(allowed) or 'none'}")
    return cls(**fields)


__all__ = ["Backend", "QuantConfig", "register_backend", "get_backend", "methods",
           "backend_for", "owner_of", "full_precision", "describe", "config_from_dict", "quantize_layer",
           "LIBRARY_FAILURES"]

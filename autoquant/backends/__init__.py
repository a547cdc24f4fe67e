"""The registry of quantization methods. One backend = one file in this folder.

A recipe entry such as ``{method: hqq, bits: 3, group_size: 64}`` becomes a config with
:func:`config_from_dict`; :func:`get_backend` gives the backend that applies it.
"""

from __future__ import annotations

from typing import Any, Mapping

from .._errors import ConfigError
from ._base import Backend, QuantConfig

_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add a backend under its ``name`` (the ``method`` string of recipes)."""
    if backend.name in _REGISTRY:
        raise ValueError(f"method {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(method: str) -> Backend:
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ConfigError(
            f"unknown method {method!r}; known methods: {sorted(_REGISTRY)}") from None


def methods() -> list[str]:
    return list(_REGISTRY)


def backend_for(cfg: QuantConfig) -> Backend:
    return get_backend(cfg.method)


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
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(f"{backend.name}: unknown option(s) {unknown}; "
                          f"allowed: {sorted(allowed) or 'none'}")
    return cls(**fields)


# Registration order is the order of `methods()`, of the inventory's columns and of search spaces.
from . import none as _none  # noqa: E402, F401  (registers the backend)
from . import hqq as _hqq  # noqa: E402, F401  (registers the backend)
from . import bnb as _bnb  # noqa: E402, F401  (registers the backend)
from . import torchao as _torchao  # noqa: E402, F401  (registers the backend)
from . import higgs as _higgs  # noqa: E402, F401  (registers the backend)

__all__ = ["Backend", "QuantConfig", "register_backend", "get_backend", "methods",
           "backend_for", "config_from_dict"]

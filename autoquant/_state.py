"""What autoquant knows about a pipeline it loaded or quantized, as typed records on the pipeline.

- :class:`ModelSource`: where :func:`autoquant.load_pipeline` got the model (id, revision, dtype),
  so that recipes and saved folders can name their base model.
- :class:`AppliedState`: what :func:`autoquant.apply_recipe` did -- the config of every layer it
  touched, the full-precision model's fingerprint, the recipe, and (when asked to keep them) the
  replaced layers, so that :func:`autoquant.apply.revert` can put them back and
  :func:`autoquant.save_quantized` can write the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .backends import QuantConfig

_SOURCE_ATTR = "_autoquant_source"
_APPLIED_ATTR = "_autoquant_applied"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    id: str
    revision: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class AppliedState:
    configs: dict[str, QuantConfig]
    fingerprint: str
    recipe: Any = None  # the Recipe applied last, when there was one
    originals: dict[str, nn.Module] = dataclasses.field(default_factory=dict)


def source_of(target: Any) -> ModelSource | None:
    return getattr(target, _SOURCE_ATTR, None)


def set_source(target: Any, source: ModelSource) -> None:
    setattr(target, _SOURCE_ATTR, source)


def applied_state(target: Any) -> AppliedState | None:
    """What :func:`autoquant.apply_recipe` (or :func:`autoquant.load_quantized`) did to
    ``target``, or None for a model autoquant has not quantized."""
    return getattr(target, _APPLIED_ATTR, None)


def set_applied(target: Any, state: AppliedState | None) -> None:
    if state is None:
        if hasattr(target, _APPLIED_ATTR):
            delattr(target, _APPLIED_ATTR)
    else:
        setattr(target, _APPLIED_ATTR, state)

"""What autoquant did to a pipeline, as a typed record on it (where the pipeline came from is
:mod:`autoquant.models.source`).

- :class:`AppliedState`: what :func:`autoquant.apply_recipe` did -- the config of every layer it
  touched, the full-precision model's fingerprint, the recipe, and (when asked to keep them) the
  replaced layers, so that :func:`autoquant.plans.apply.revert` can put them back and
  :func:`autoquant.save_quantized` can write the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..backends import QuantConfig
from ..models.source import ModelSource, set_source, source_of  # noqa: F401  (0.2 names)

_APPLIED_ATTR = "_autoquant_applied"


@dataclasses.dataclass
class AppliedState:
    configs: dict[str, QuantConfig]
    fingerprint: str
    recipe: Any = None  # the Recipe applied last, when there was one
    originals: dict[str, nn.Module] = dataclasses.field(default_factory=dict)


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

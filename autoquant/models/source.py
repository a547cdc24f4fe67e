"""Where :func:`autoquant.load_pipeline` got a model (id, revision, dtype), recorded on the
pipeline so that recipes and saved folders can name their base model."""

from __future__ import annotations

import dataclasses
from typing import Any

_SOURCE_ATTR = "_autoquant_source"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    id: str
    revision: str | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}



def source_of(target: Any) -> ModelSource | None:
    return getattr(target, _SOURCE_ATTR, None)


def set_source(target: Any, source: ModelSource) -> None:
    setattr(target, _SOURCE_ATTR, source)

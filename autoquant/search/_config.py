"""What a search is asked to do (:class:`SearchConfig`), checked when it is made: every
option that can be refused is refused here, before a model loads."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .._errors import InputError
from ..generation.settings import EvalSettings
from ._sensitivity import MODES
from .space import SearchSpace


@dataclasses.dataclass
class SearchConfig:
    model: str
    budget: str
    space: SearchSpace
    trials: int = 30
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    out: Path = Path("autoquant-search")
    device: str | None = None
    resume: bool = False
    seed: int = 0
    settings: EvalSettings | None = None
    clip: Any = None
    progress: bool = True
    stage_fraction: float = 0.25
    stage_margin_db: float = 3.0
    #: bytes the layer cache may hold; None: half of the device's free memory at the start
    cache_bytes: float | None = None
    #: "full": one replay per (group, config); "anchored": one per group (see _sensitivity.py);
    #: "images": one generation of the search images per (group, config), scored per image;
    #: "auto": full unless one replay x the number of replays would exceed ``full_sensitivity_s``
    sensitivity: str = "auto"
    full_sensitivity_s: float = 30.0
    #: the artifact folder the study's workers share (default OUT/artifacts)
    artifacts: Path | None = None
    #: a step-time limit (``1.0x`` full precision's step, ``150ms``); with it or a ``latency``
    #: objective in the space, step time is searched too, measured in ``latency_mode``
    latency: str | None = None
    latency_mode: str = "eager"
    #: bound the search's peak GPU memory (``24GiB``; see :mod:`autoquant.runtime.memory`); None: what
    #: the device has (not enforced)
    gpu_memory: str | int | None = None

    def __post_init__(self):
        if self.sensitivity not in MODES:
            raise InputError(f"sensitivity {self.sensitivity!r}: choose one of "
                             f"{', '.join(MODES)}")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise InputError(f"the layer cache needs a positive size, got {self.cache_bytes}")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise InputError(f"trials must be a whole number >= 1, got {self.trials!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise InputError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        from ..runtime.latency import MODES as LATENCY_MODES
        from ..runtime.latency import parse_latency

        if self.latency is not None:
            parse_latency(self.latency)
        if self.latency_mode not in LATENCY_MODES:
            raise InputError(f"latency mode {self.latency_mode!r}: choose one of "
                             f"{', '.join(LATENCY_MODES)}")
        if self.gpu_memory is not None:
            from ..runtime.memory import parse_memory

            self.gpu_memory = parse_memory(self.gpu_memory)
        self.out = Path(self.out)


def default_cache_bytes(device: torch.device) -> float:
    """Half of what the device has free now: the rest is for generation and the references."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2

"""Search spaces: what a search may choose for each layer, validated on load like recipes.

```yaml
format: autoquant-space/1
components: [transformer]          # searched components (default: the denoiser)
candidates:                        # configs a group may take (recipe syntax)
  - {method: hqq, bits: 4}
  - {method: bnb, bits: 4, type: nf4}
  - {method: none}                 # full precision, limited by fp_cap
tie:                               # optional: layers sharing a config; a regex whose groups name
  - "(.*\\.attn\\d?)\\.to_[qkv]"   #   the tied set (here a block's q, k and v)
protect: ["re:.*proj_out$"]        # optional: always full precision (count towards fp_cap)
fp_cap: 0.20                       # at most this share of Linear weights in full precision
max_bits_per_weight: null          # optional hard cap (a "low-bit" space)
objectives: [bytes, psnr, clip_fidelity]
```

``fp_cap`` may be lowered by a space but not raised above 0.20 unless the caller passes
``allow_fp_cap_above_default=True`` (``--allow-fp-cap``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from ._errors import AutoquantError, ConfigError
from .backends import QuantConfig, config_from_dict

FORMAT = "autoquant-space/1"
DEFAULT_FP_CAP = 0.20
SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
OBJECTIVES = ("bytes", "psnr", "clip_fidelity")
_KEYS = ("format", "components", "candidates", "tie", "protect", "fp_cap", "max_bits_per_weight",
         "objectives", "description")


class SpaceError(AutoquantError, ValueError):
    pass


@dataclasses.dataclass
class SearchSpace:
    candidates: list[QuantConfig]
    components: list[str] | None = None
    tie: list[str] = dataclasses.field(default_factory=list)
    protect: list[str] = dataclasses.field(default_factory=list)
    fp_cap: float = DEFAULT_FP_CAP
    max_bits_per_weight: float | None = None
    objectives: list[str] = dataclasses.field(default_factory=lambda: list(OBJECTIVES))
    description: str = ""
    name: str = "custom"

    @classmethod
    def from_dict(cls, data: Any, name: str = "custom", allow_fp_cap_above_default=False):
        if not isinstance(data, dict):
            raise SpaceError(f"search space {name}: expected a mapping with format {FORMAT}")
        problems = []
        if data.get("format") != FORMAT:
            problems.append(f"format must be {FORMAT!r}, got {data.get('format')!r}")
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            problems.append(f"unknown key(s) {unknown}; allowed: {list(_KEYS)}")
        candidates = []
        for i, entry in enumerate(data.get("candidates") or []):
            try:
                candidates.append(config_from_dict(entry))
            except ConfigError as e:
                problems.append(f"candidates[{i}]: {e}")
        if not data.get("candidates"):
            problems.append("candidates: list at least one config")
        labels = [c.label for c in candidates]
        if len(set(labels)) != len(labels):
            problems.append(f"candidates repeat a config: {labels}")
        for key in ("tie", "protect"):
            for rx in data.get(key) or []:
                try:
                    re.compile(rx[3:] if rx.startswith("re:") else rx)
                except (re.error, TypeError) as e:
                    problems.append(f"{key}: bad regex {rx!r} ({e})")
        fp_cap = data.get("fp_cap", DEFAULT_FP_CAP)
        if not isinstance(fp_cap, (int, float)) or isinstance(fp_cap, bool) or not 0 <= fp_cap <= 1:
            problems.append(f"fp_cap must be a share in [0, 1], got {fp_cap!r}")
        elif fp_cap > DEFAULT_FP_CAP and not allow_fp_cap_above_default:
            problems.append(f"fp_cap={fp_cap} is above {DEFAULT_FP_CAP}: pass --allow-fp-cap "
                            f"to allow more full-precision weights")
        objectives = data.get("objectives", list(OBJECTIVES))
        if not objectives or objectives[0] != "bytes" or any(o not in OBJECTIVES for o in objectives):
            problems.append(f"objectives must start with bytes and use {list(OBJECTIVES)}")
        mbpw = data.get("max_bits_per_weight")
        if mbpw is not None and (not isinstance(mbpw, (int, float)) or mbpw <= 0):
            problems.append(f"max_bits_per_weight must be a positive number, got {mbpw!r}")
        if problems:
            raise SpaceError(f"invalid search space {name}:\n  - " + "\n  - ".join(problems))
        return cls(candidates=candidates, components=data.get("components"),
                   tie=list(data.get("tie") or []), protect=list(data.get("protect") or []),
                   fp_cap=float(fp_cap), max_bits_per_weight=mbpw, objectives=list(objectives),
                   description=data.get("description", ""), name=name)


def load_space(spec: str | Path, allow_fp_cap_above_default: bool = False) -> SearchSpace:
    """A space by name (``default``, ``hqq-only``, ``low-bit``, ``flux``, ``sd3``, ``sdxl``) or path."""
    path = Path(spec)
    if not path.is_file():
        named = SPACES_DIR / f"{spec}.yaml"
        if not named.is_file():
            known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
            raise SpaceError(f"no search space {spec!r}: not a file, not one of {known}")
        path = named
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from None
    return SearchSpace.from_dict(data, name=path.stem,
                                 allow_fp_cap_above_default=allow_fp_cap_above_default)


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(text: str) -> tuple[str, float]:
    """``("bytes", n)``, ``("share", 0.35)`` or ``("bpw", 4.25)`` from 6GB, 5.5GiB, 35%, 4.25bpw."""
    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|bpw|[kmgt]?i?b)?", t)
    if not m:
        raise AutoquantError(f"budget {text!r}: use bytes (6GB, 5.5GiB, 800MiB), a share of "
                             f"full precision (35%) or bits per weight (4.25bpw)")
    value, unit = float(m.group(1)), m.group(2) or "b"
    if unit == "%":
        if not 0 < value <= 100:
            raise AutoquantError(f"budget {text!r}: a share must be in (0, 100]%")
        return "share", value / 100
    if unit == "bpw":
        return "bpw", value
    return "bytes", value * _UNITS[unit]

"""Search spaces: what a search may choose for each layer, validated on load like recipes.

```yaml
format: autoquant-space/1
components: [transformer]          # searched components (default: the denoiser)
candidates:                        # configs a group may take (recipe syntax)
  - {method: hqq, bits: 4}
  - {method: bnb, bits: 4, type: nf4}
  - {method: none}                 # full precision, limited by fp_cap
tie:                               # optional: layers that share one config. A "re:" regex whose
  - "re:(.*\\.attn\\d?)\\.to_[qkv]"  #   groups name the tied set (here a block's q, k, v; with
                                   #   "re:(.*_blocks)\\.\\d+\\.(.*)" one layer position across
                                   #   the blocks of a kind: one compiled graph per kind)
protect: ["re:.*proj_out"]         # optional: always full precision (counts towards fp_cap);
                                   #   exact layer names or "re:" regexes, as in recipes
fp_cap: 0.20                       # at most this share of Linear weights in full precision
max_bits_per_weight: null          # optional hard cap (a "low-bit" space)
objectives: [bytes, psnr, clip_fidelity]   # bytes first, then the quality metrics to maximize
```

Patterns follow :mod:`autoquant.plans.patterns`, the rule recipes use: an exact layer name, or ``re:``
and a regex that matches the whole name. Every problem is reported at once (:class:`SpaceError`);
an entry that would do nothing on the model (a ``components`` entry it lacks, a ``tie`` or
``protect`` entry that matches no layer) is an error when the search meets the model.

``fp_cap`` may be lowered by a space but not raised above 0.20 unless the caller passes
``allow_fp_cap_above_default=True`` (``--allow-fp-cap``). The objectives' order matters: the
first quality metric picks ``best.yaml`` (the next ones break ties).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .._errors import ConfigError, SpaceError
from .._format import parse_budget
from ..backends import QuantConfig, config_from_dict
from ..plans import strict_yaml as _yaml
from ..plans.patterns import NamePattern, PatternError, parse_pattern

FORMAT = "autoquant-space/1"
DEFAULT_FP_CAP = 0.20
SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"  # package data: the shipped spaces
#: objective -> direction. bytes always comes first; the others are measured per trial.
OBJECTIVES = {"bytes": "minimize", "psnr": "maximize", "ssim": "maximize",
              "clip_fidelity": "maximize", "latency": "minimize"}
DEFAULT_OBJECTIVES = ("bytes", "psnr", "clip_fidelity")
_KEYS = ("format", "components", "candidates", "where_available", "tie", "protect", "fp_cap",
         "max_bits_per_weight", "objectives", "description")

__all__ = ["SearchSpace", "SpaceError", "load_space", "parse_budget", "spaces"]


@dataclasses.dataclass
class SearchSpace:
    candidates: list[QuantConfig]
    components: list[str] | None = None
    #: candidates only where the search's device can run them (fp8 kernels on recent GPUs)
    where_available: list[QuantConfig] = dataclasses.field(default_factory=list)
    tie: list[str] = dataclasses.field(default_factory=list)
    protect: list[str] = dataclasses.field(default_factory=list)
    fp_cap: float = DEFAULT_FP_CAP
    max_bits_per_weight: float | None = None
    objectives: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    description: str = ""
    name: str = "custom"

    @property
    def tie_patterns(self) -> list[NamePattern]:
        return [parse_pattern(t) for t in self.tie]

    @property
    def protect_patterns(self) -> list[NamePattern]:
        return [parse_pattern(p) for p in self.protect]

    def for_device(self, device) -> "SearchSpace":
        """This space with its ``where_available`` configs that ``device`` can run added to the
        candidates (before ``none``, which stays last)."""
        from ..backends import get_backend

        extra = [c for c in self.where_available
                 if get_backend(c.method).unavailable_reason(c, device) is None]
        quantized = [c for c in self.candidates if not c.full_precision]
        fp = [c for c in self.candidates if c.full_precision]
        return dataclasses.replace(self, candidates=quantized + extra + fp, where_available=[])

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what a study stores, so that its configs can be rebuilt anywhere)."""
        out: dict[str, Any] = {"format": FORMAT}
        if self.description:
            out["description"] = self.description
        if self.components is not None:
            out["components"] = list(self.components)
        out["candidates"] = [c.to_dict() for c in self.candidates]
        if self.where_available:
            out["where_available"] = [c.to_dict() for c in self.where_available]
        for key in ("tie", "protect"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        out["fp_cap"] = self.fp_cap
        if self.max_bits_per_weight is not None:
            out["max_bits_per_weight"] = self.max_bits_per_weight
        out["objectives"] = list(self.objectives)
        return out

    @classmethod
    def from_dict(cls, data: Any, name: str = "custom", allow_fp_cap_above_default=False):
        if not isinstance(data, dict):
            raise SpaceError(f"expected a mapping with format {FORMAT}, got "
                             f"{type(data).__name__}", name)
        problems: list[str] = []
        if data.get("format") != FORMAT:
            problems.append(f"format must be {FORMAT!r}, got {data.get('format')!r}")
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            problems.append(f"unknown key(s) {unknown}; allowed: {list(_KEYS)}")
        components = _string_list(data, "components", problems, allow_none=True)
        candidates = _candidates(data.get("candidates"), problems)
        optional = []
        for i, entry in enumerate(data.get("where_available") or []):
            try:
                optional.append(config_from_dict(entry))
            except (ConfigError, TypeError) as e:
                problems.append(f"where_available[{i}]: {e}")
        if set(c.label for c in optional) & set(c.label for c in candidates):
            problems.append("where_available repeats a candidate")
        tie = _string_list(data, "tie", problems) or []
        for i, entry in enumerate(tie):
            _check_tie(i, entry, problems)
        protect = _string_list(data, "protect", problems) or []
        for i, entry in enumerate(protect):
            try:
                parse_pattern(entry)
            except PatternError as e:
                problems.append(f"protect[{i}] {entry[:120]!r}: {e}")
        fp_cap = data.get("fp_cap", DEFAULT_FP_CAP)
        if not _is_number(fp_cap) or not 0 <= fp_cap <= 1:
            problems.append(f"fp_cap must be a share in [0, 1], got {fp_cap!r}")
        elif fp_cap > DEFAULT_FP_CAP and not allow_fp_cap_above_default:
            problems.append(f"fp_cap={fp_cap} is above {DEFAULT_FP_CAP}: pass --allow-fp-cap "
                            f"to allow more full-precision weights")
        objectives = data.get("objectives", list(DEFAULT_OBJECTIVES))
        _check_objectives(objectives, problems)
        mbpw = data.get("max_bits_per_weight")
        if mbpw is not None and (not _is_number(mbpw) or not 0 < mbpw <= 32):
            problems.append(f"max_bits_per_weight must be a number in (0, 32], got {mbpw!r}")
        description = data.get("description", "")
        if not isinstance(description, str):
            problems.append("description must be a string")
        if problems:
            raise SpaceError(problems, name)
        return cls(candidates=candidates, components=components, where_available=optional,
                   tie=tie, protect=protect,
                   fp_cap=float(fp_cap), max_bits_per_weight=mbpw, objectives=list(objectives),
                   description=description, name=name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string_list(data: dict, key: str, problems: list[str], allow_none: bool = False):
    value = data.get(key)
    if value is None:
        return None if allow_none else []
    if not isinstance(value, list) or not value or \
            not all(isinstance(v, str) and v for v in value):
        problems.append(f"{key} must be a non-empty list of strings, got {value!r}")
        return None if allow_none else []
    if len(set(value)) != len(value):
        problems.append(f"{key} repeats an entry: {value}")
    return list(value)


def _candidates(raw: Any, problems: list[str]) -> list[QuantConfig]:
    if not isinstance(raw, list) or not raw:
        problems.append("candidates: list at least one config")
        return []
    out = []
    for i, entry in enumerate(raw):
        try:
            out.append(config_from_dict(entry))
        except ConfigError as e:
            problems.append(f"candidates[{i}]: {e}")
        except TypeError as e:  # a config dataclass given a value it cannot hold
            problems.append(f"candidates[{i}]: {e}")
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        problems.append(f"candidates repeat a config: {labels}")
    if out and all(c.full_precision for c in out):
        problems.append(f"candidates: list at least one quantized config, not only "
                        f"{out[0].label}")
    return out


def _check_tie(i: int, entry: str, problems: list[str]) -> None:
    try:
        pattern = parse_pattern(entry)
    except PatternError as e:
        problems.append(f"tie[{i}] {entry[:120]!r}: {e}")
        return
    if not pattern.is_regex:
        problems.append(f"tie[{i}]: {entry!r} is an exact name, which ties nothing: write "
                        f"'re:' and a regex whose groups name the tied set, e.g. "
                        f"re:(.*\\.attn)\\.to_[qkv]")
    elif pattern.compiled.groups < 1:
        problems.append(f"tie[{i}]: {entry!r} has no group: a group must name the "
                        f"tied set, e.g. re:(.*\\.attn)\\.to_[qkv]")


def _check_objectives(objectives: Any, problems: list[str]) -> None:
    if not isinstance(objectives, list) or not objectives or \
            not all(isinstance(o, str) for o in objectives):
        problems.append(f"objectives must be a list like {list(DEFAULT_OBJECTIVES)}, "
                        f"got {objectives!r}")
        return
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        problems.append(f"objectives: unknown {unknown}; choose from {list(OBJECTIVES)}")
    if objectives[0] != "bytes":
        problems.append(f"objectives must start with bytes, got {objectives}")
    if len(set(objectives)) != len(objectives):
        problems.append(f"objectives repeat an entry: {objectives}")
    if len([o for o in objectives if o not in ("bytes", "latency")]) < 1:
        problems.append("objectives: name at least one quality metric (psnr, ssim, "
                        "clip_fidelity)")


def spaces() -> list[str]:
    """The names of the shipped spaces."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(spec: str | Path, allow_fp_cap_above_default: bool = False) -> SearchSpace:
    """A space by name (``default``, ``hqq-only``, ``low-bit``, ``flux``, ``sd3``, ``sdxl``) or path."""
    import os

    from .._errors import expect

    expect(spec, (str, os.PathLike), "load_space(spec)", "a space's name or a YAML file's path")
    path = Path(spec)
    if not path.is_file():
        named = SPACES_DIR / f"{spec}.yaml"
        if str(spec) not in spaces():
            raise SpaceError(f"no search space {str(spec)!r}: not a file, not one of {spaces()}")
        path = named
    try:
        data = _yaml.load_file(path)
    except _yaml.YamlProblem as e:
        raise SpaceError(str(e), str(path)) from None
    except OSError as e:
        raise SpaceError(f"cannot read it: {e.strerror or e}", str(path)) from None
    return SearchSpace.from_dict(data, name=path.stem,
                                 allow_fp_cap_above_default=allow_fp_cap_above_default)

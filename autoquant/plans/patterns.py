"""Layer-name patterns, the one rule recipes and search spaces share.

A pattern is either a layer's exact, fully qualified name (``transformer.proj_out``), or ``re:``
followed by a regular expression that must match the *whole* name
(``re:transformer\\.single_transformer_blocks\\.\\d+\\.proj_out``). There is no third form: a
string without ``re:`` is never read as a regex.

Recipes and spaces are untrusted data, so a pattern is bounded: at most ``MAX_PATTERN_CHARS``
characters, and matching one pattern against all the layer names of a model may take at most
``MATCH_SECONDS`` (a regex such as ``(.*.*)*X`` backtracks exponentially; it is refused, not run
until killed). Matching uses the ``regex`` package, which has timeouts and reads every pattern
Python's ``re`` reads.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

import regex

REGEX_PREFIX = "re:"
MAX_PATTERN_CHARS = 1000
MATCH_SECONDS = 2.0


class PatternError(ValueError):
    """A pattern that cannot be used; the message says why (the caller says where)."""


@dataclasses.dataclass(frozen=True)
class NamePattern:
    key: str  # as written, ``re:`` included
    compiled: Any = None  # the regex, or None for an exact name

    @property
    def is_regex(self) -> bool:
        return self.compiled is not None

    def fullmatch(self, name: str, timeout: float = MATCH_SECONDS):
        """A match object (``group(1)`` etc. for regexes), or None. Raises PatternError when the
        regex runs past ``timeout`` seconds."""
        if self.compiled is None:
            return _ExactMatch(name) if name == self.key else None
        try:
            return self.compiled.fullmatch(name, timeout=max(timeout, 1e-3))
        except TimeoutError:
            raise PatternError(_too_slow(self.key)) from None

    def matching(self, names: Iterable[str], seconds: float = MATCH_SECONDS) -> list[tuple[str, Any]]:
        """``(name, match)`` for every name this pattern matches, all within ``seconds``."""
        deadline = time.monotonic() + seconds
        out = []
        for name in names:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PatternError(_too_slow(self.key))
            m = self.fullmatch(name, left)
            if m is not None:
                out.append((name, m))
        return out


@dataclasses.dataclass(frozen=True)
class _ExactMatch:
    name: str

    def group(self, index: int = 0) -> str:
        if index:
            raise IndexError("an exact name has no groups")
        return self.name

    def groups(self) -> tuple:
        return ()


def _too_slow(key: str) -> str:
    return (f"{key!r} took longer than {MATCH_SECONDS:g} s to match the layer names: simplify "
            f"the regex (nested repeats such as (a+)+ or (.*.*)* backtrack exponentially)")


def parse_pattern(key: Any) -> NamePattern:
    """Check one pattern. Raises PatternError saying what is wrong with it (the caller names the
    pattern and where it stands)."""
    if not isinstance(key, str) or not key:
        raise PatternError("must be a non-empty string: a layer name or 're:REGEX'")
    if len(key) > MAX_PATTERN_CHARS:
        raise PatternError(f"{len(key):,} characters is longer than the {MAX_PATTERN_CHARS:,} "
                           f"a pattern may have")
    if not key.startswith(REGEX_PREFIX):
        return NamePattern(key)
    body = key[len(REGEX_PREFIX):]
    if not body:
        raise PatternError("an empty regex")
    try:
        return NamePattern(key, regex.compile(body))
    except (regex.error, ValueError, OverflowError, RecursionError) as e:
        raise PatternError(f"bad regex ({e})") from None

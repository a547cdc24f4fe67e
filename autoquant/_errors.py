"""Errors that autoquant raises on purpose: each says what went wrong and what to do."""

from __future__ import annotations


class AutoquantError(Exception):
    """Base class of every error autoquant raises deliberately."""


class ConfigError(AutoquantError, ValueError):
    """A quantization config (method, bits, options) is not valid."""


class BackendUnavailableError(AutoquantError, RuntimeError):
    """A method cannot run where it was asked to (missing package, device, kernel)."""


class RecipeError(AutoquantError, ValueError):
    """A recipe is malformed or does not fit the model. Lists every offending entry."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid recipe{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"invalid recipe{where}: {len(self.problems)} problems\n{lines}"
        super().__init__(msg)

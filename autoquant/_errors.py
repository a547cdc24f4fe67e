"""Errors that autoquant raises on purpose: each says what went wrong and what to do.

The command line prints them as one line (``--debug`` shows the traceback) and exits with 2 for
bad input (:class:`InputError` and its kinds) or 1 for a failure while running.
"""

from __future__ import annotations

#: a list of problems is cut after this many entries (and says how many more there were)
MAX_LISTED = 20


def listing(problems: list[str]) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return shown + (f"\n  ... and {more:,} more" if more > 0 else "")


class AutoquantError(Exception):
    """Base class of every error autoquant raises deliberately."""

    exit_code = 1


class InputError(AutoquantError):
    """Something the user gave (an argument, a file, a folder) is wrong: exit code 2."""

    exit_code = 2


class ArgumentTypeError(InputError, TypeError):
    """A public function was given the wrong kind of argument; the message says what to pass."""


def expect(value, types, name: str, what: str):
    """``value`` if it is one of ``types``, else :class:`ArgumentTypeError` saying ``what`` to
    pass as ``name``."""
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        raise ArgumentTypeError(f"{name}: expected {what}, got {type(value).__name__} "
                                f"{_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ConfigError(InputError, ValueError):
    """A quantization config (method, bits, options) is not valid."""


class BackendUnavailableError(InputError, RuntimeError):
    """A method cannot run where it was asked to (missing package, device, kernel)."""


class RecipeError(InputError, ValueError):
    """A recipe is malformed or does not fit the model. Lists every offending entry."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid recipe{where}: {self.problems[0]}"
        else:
            msg = f"invalid recipe{where}: {len(self.problems):,} problems\n{listing(self.problems)}"
        super().__init__(msg)


class SpaceError(InputError, ValueError):
    """A search space is malformed or does not fit the model. Lists every problem."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f" {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid search space{where}: {self.problems[0]}"
        else:
            msg = (f"invalid search space{where}: {len(self.problems):,} problems\n"
                   f"{listing(self.problems)}")
        super().__init__(msg)


class BackendError(AutoquantError, RuntimeError):
    """A quantization library failed on a layer (its kernels, its checks, its memory)."""


class NonFiniteError(AutoquantError, RuntimeError):
    """Images or metrics came out NaN or infinite: a failure, never a score."""

"""Keeping the libraries' chatter away from people who did not ask for it.

Importing torchao, bitsandbytes and diffusers logs things that are not the user's business
("Unable to import `torchao` Tensor objects", torch's pytree deprecation notes, "Failed to load
CPU gemm_4bit_forward from kernels-community", loading bars). The command line quiets them for
the whole run (``--debug`` keeps them); the Python API quiets only its own imports of those
libraries and its own pipeline loads, and restores every setting afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

#: the libraries every run uses; each backend adds its own package's (``Backend.loggers``,
#: through :func:`add_loggers` when the registry loads)
_LOGGERS = ["torch.utils._pytree", "diffusers", "transformers", "huggingface_hub"]
_QUIET_FOR_RUN = False


def add_loggers(names) -> None:
    """Quiet these loggers too (a backend's); at once if the command line quieted the run."""
    for name in names:
        if name not in _LOGGERS:
            _LOGGERS.append(name)
            if _QUIET_FOR_RUN:
                logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quietly():
    """Library loggers at ERROR and their warnings ignored inside the block; restored after."""
    if os.environ.get("AUTOQUANT_VERBOSE"):
        yield
        return
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*register_constant.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_quietly(name: str):
    """``importlib.import_module(name)`` without its import-time messages."""
    import importlib

    with quietly():
        return importlib.import_module(name)


def quiet_libraries(debug: bool = False) -> None:
    """For the command line: the libraries' messages and loading bars off for the whole run."""
    global _QUIET_FOR_RUN
    if debug or os.environ.get("AUTOQUANT_VERBOSE"):
        return
    _QUIET_FOR_RUN = True
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import optuna  # its own handler decides; "A new study created ..." is not news to users

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextlib.contextmanager
def quiet_loading():
    """diffusers' and transformers' loading bars and notices off while a pipeline loads."""
    if os.environ.get("AUTOQUANT_VERBOSE"):
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with quietly():
            yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()

"""``autoquant`` on the command line: the parser (``parser``), the checks that run before any
model loads (``checks``) and one function per verb (``commands``). May import every room below.
"""

from .commands import main

__all__ = ["main"]

"""``python -m autoquant``: the command line."""

import sys

from .cli.commands import main

sys.exit(main())

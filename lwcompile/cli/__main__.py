"""``python -m lwcompile.cli``: the same as the ``lwcompile`` console script."""

import sys

from .commands import main

sys.exit(main())

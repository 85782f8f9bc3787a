"""``python -m lwcompile.cli``: the same as the ``lwcompile`` console script."""

import sys

from .app import main

sys.exit(main())

"""``python -m mmalign.labs``: see :mod:`mmalign.labs.cli`."""

import sys

from .cli import main

sys.exit(main())

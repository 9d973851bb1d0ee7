"""``python -m aiobus``: the ``aiobus`` command line."""

import sys

from .cli.main import main

sys.exit(main())

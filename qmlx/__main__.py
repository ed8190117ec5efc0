"""`python -m qmlx`: the same as the `qmlx` command."""

import sys

from .cli import main

sys.exit(main())

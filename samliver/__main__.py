"""``python -m samliver <command>``: the ``samliver`` command, also under ``torchrun -m samliver``."""

import sys

from .cli import main

sys.exit(main())

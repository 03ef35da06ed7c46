"""``python -m samliver.cli <command>`` (the same as the ``samliver`` command)."""

import sys

from . import main

sys.exit(main())

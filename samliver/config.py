"""Project-wide defaults (layer 0: imports nothing from samliver).

Minimal version: the defaults other modules already import. A fuller one (training recipes,
head kinds) replaces it.
"""

from __future__ import annotations

DEFAULT_MODEL = "litemedsam"
DEFAULT_WINDOW = "abdomen"

"""Console entry point ``neurox-convert`` (declared in pyproject.toml); see :mod:`data.convert`."""
from __future__ import annotations

import sys

from data.convert import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

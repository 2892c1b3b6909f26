"""The ``layerlie`` command line (docs/design.md §6)."""

from layerlie.cli.main import main

__all__ = ["main"]

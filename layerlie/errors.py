"""The exception type for expected errors, and the warning category for one-line notes."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


class LayerlieError(ValueError):
    """An expected error. Its message is one line that says what came, what was expected,
    and what to do next; the CLI prints it without a traceback."""


class TraceError(LayerlieError):
    """The model cannot be traced to a graph."""


class Note(UserWarning):
    """A one-line note on what layerlie did with the input it was given (a model measured in
    eval mode, images cast to the model's dtype, a group left out); the CLI prints it as
    ``layerlie: note: ...``. Silence them with ``warnings.simplefilter("ignore", ll.Note)``."""


def note(message: str, category: type[Note] = Note) -> None:
    """Emit ``message`` as a :class:`Note` (or ``category``, a subclass), attributed to the first
    caller outside layerlie."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is note's caller
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)

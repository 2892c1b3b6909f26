"""The one exception type for expected errors: bad input, bad settings, bad files."""


class LayerlieError(ValueError):
    """An expected error. Its message is one line that says what came, what was expected,
    and what to do next; the CLI prints it without a traceback."""

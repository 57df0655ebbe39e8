"""The one error type every converter raises."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message says what was expected, what was
    found, and how to fix it."""

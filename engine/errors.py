"""The one exception type that entry points turn into a one-line message and a non-zero exit."""


class TesseraError(Exception):
    """Bad input: the message names the thing that is wrong and how to fix it."""

"""The one exception type users see: a one-line message naming the file or tensor and what to do."""


class QuantError(Exception):
    """A problem with the user's input, settings or output location (not a bug in this package)."""

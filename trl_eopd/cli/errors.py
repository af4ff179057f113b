"""The error type of the command line: bad user input, reported as one clear line before any model is loaded."""


class UsageError(Exception):
    """Bad user input, reported as one clear line before any model is loaded."""

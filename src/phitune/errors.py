"""Errors that reach the user as a located message and a non-zero exit, never a traceback."""


class PhituneError(Exception):
    """Bad input or configuration; str(exc) is the whole message for the user."""

    exit_code = 1


class DataError(PhituneError):
    """Training or validation data failed validation; the problems were already printed."""

"""Errors the command line maps to exit codes (DESIGN 4): bad usage or input -> 2."""


class UsageError(Exception):
    """Bad usage or bad input. The message names the file or flag and says what to do.

    The CLI prints it and exits with code 2; anything else that escapes is an internal failure
    (exit 1).
    """


class CheckpointError(UsageError, ValueError):
    """A checkpoint is missing, malformed, or does not match the architecture."""

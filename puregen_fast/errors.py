"""Errors the command line maps to exit codes (DESIGN 4): bad usage or input -> 2; a diverged
run -> 1, or 2 when a flag caused it."""


class UsageError(Exception):
    """Bad usage or bad input. The message names the file or flag and says what to do.

    The CLI prints it and exits with code 2; anything else that escapes is an internal failure
    (exit 1).
    """


class CheckpointError(UsageError, ValueError):
    """A checkpoint is missing, malformed, or does not match the architecture."""


class DivergenceError(RuntimeError):
    """A purified (or sampled) state went non-finite or far outside [-1, 1] (DESIGN 2.4).

    ``sample_ids``: the global ids of the diverged images; ``flag_cause``: a flag the user set
    (a step size, a temperature, the margin) is the likely cause, so the command exits 2, not 1.
    Nothing of the diverged batch is written.
    """

    def __init__(self, message: str, sample_ids: list[int], flag_cause: bool = False) -> None:
        super().__init__(message)
        self.sample_ids = sample_ids
        self.flag_cause = flag_cause

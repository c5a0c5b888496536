"""The errors a user meets, each with the exit code the command line ends with.

Library code raises these (never a click exception); the CLI turns one into a single line on
stderr and its `exit_code`, in one place (`tools.cli`). Lower layers keep their own exceptions
(`cj.registration.InputError`, `projections.rebuild.KeptChanging`), translated into these
where they are called (app/replay.py, app/runs.py; submit and validate parse input directly).
"""

from __future__ import annotations

# Exit codes: 0 done, 1 the command could not do its job, 2 the user's input or settings are bad.
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CjsError(Exception):
    """A problem to report as one line, without a traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(CjsError):
    """What the command names does not exist (a batch under the prefix)."""


class Conflict(CjsError):
    """The target's state refuses the operation: already imported, or changing meanwhile."""


class TimedOut(CjsError):
    """A wait ran past its deadline."""


class RedisUnavailable(CjsError):
    """No Redis to work with (REDIS_URL unset for a command that needs a shared server)."""


class ConfigError(CjsError):
    """A setting from the environment is invalid."""

    exit_code = EXIT_USAGE


class InputError(CjsError):
    """The user's input is invalid (a batch file, an option's value)."""

    exit_code = EXIT_USAGE


class BadFile(InputError):
    """A file the user gave cannot be read or is not in the expected format."""

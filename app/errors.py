"""The errors a user meets, each with the exit code the command line ends with.

Library code raises these (never a click exception); the CLI turns one into a single line on
stderr and its `exit_code`, in one place (`tools.cli`). Lower layers keep their own exceptions
(`cj.registration.InputError`, `projections.rebuild.KeptChanging`), translated into these
where they are called (app/replay.py, app/runs.py; submit and validate parse input directly).
"""

from __future__ import annotations

# Exit codes (the table in README.md): 0 done; 1 the command could not do its job or its answer
# is "no"; 2 the user's input, options or settings are bad; 3 something the command needs from
# its environment is unavailable (Redis, a port); 70 a bug; 130 interrupted; 141 the reader of
# stdout went away.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


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


class Unavailable(CjsError):
    """Something the command needs from its environment cannot be used now: retrying later,
    or elsewhere, may work."""

    exit_code = EXIT_UNAVAILABLE


class RedisUnavailable(Unavailable):
    """The Redis of REDIS_URL cannot be used: unreachable, not answering in time, refusing the
    connection (password, database number) or the command (read-only, out of memory)."""


class ConfigError(CjsError):
    """A setting from the environment is invalid."""

    exit_code = EXIT_USAGE


class InputError(CjsError):
    """The user's input is invalid (a batch file, an option's value)."""

    exit_code = EXIT_USAGE


class BadFile(InputError):
    """A file the user gave cannot be read or is not in the expected format."""

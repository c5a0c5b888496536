"""The `cjs` command line.

A command lives in a module `tools/cmd_*.py`, imported only when that command runs or shows its
help: `cjs --help`, and commands that need no scoring, load neither numpy nor scipy nor the
worker stack. A new command is a new module and a row of COMMANDS.

Errors: library code raises `app.errors.CjsError`; `Cjs.invoke` turns one into a single line on
stderr and the error's exit code, here and nowhere else. The same boundary translates the
errors of the layers below that a user can cause or meet (Redis down, a file that cannot be
read or written, a corrupt archive, Ctrl-C), so that every problem of one kind ends the same way
in every command, and a bug shows one line too (CJS_DEBUG=1 shows its traceback).
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from typing import NamedTuple

import click
from click.utils import make_default_short_help

from app import errors
from app.errors import CjsError


class Entry(NamedTuple):
    module: str  # under tools/
    attribute: str  # the click command in it
    short_help: str  # the first sentence of its help (a test holds them equal)


COMMANDS: dict[str, Entry] = {
    "archive": Entry(
        "cmd_archive",
        "archive",
        "Archive finished batches to CJS_ARCHIVE_URL, then trim the streams below the oldest "
        "entry still needed, and expire old dead letters.",
    ),
    "dashboard": Entry(
        "cmd_dashboard",
        "dashboard",
        "Serve a web dashboard of the streams, stuck items, dead letters and batches.",
    ),
    "demo": Entry(
        "cmd_demo",
        "demo",
        "Run a bundled ENG5-like batch through CJ and the mock judge until it is finalized.",
    ),
    "batches": Entry(
        "cmd_batch",
        "batches",
        "List the batches of the namespace, newest first, with their status and progress.",
    ),
    "dlq": Entry(  # a group: `cjs dlq` lists, `cjs dlq redrive` puts letters back
        "cmd_dlq",
        "dlq",
        "List dead letters: undecodable entries and entries delivered too often, each with the "
        "reason, the original stream and entry id, and the original fields.",
    ),
    "export": Entry(
        "cmd_export",
        "export",
        "Write every event of BATCH_ID from the four streams, in stream order, one JSON line "
        "each: {type, stream, entry_id, data}.",
    ),
    "import": Entry(
        "cmd_export",
        "import_",
        "Load an export FILE (.jsonl or .jsonl.gz) into a namespace and rebuild its projections, "
        "so that status, results, positions and replay work as on the original.",
    ),
    "positions": Entry(
        "cmd_positions",
        "positions",
        "Per essay: times in slot A and B and wins in each; anchors vs students; how often "
        "slot A won, with a binomial test against 50 %; the fitted position bias η.",
    ),
    "replay": Entry(
        "cmd_replay",
        "replay",
        "Rebuild BATCH_ID (or --all) from the streams and compare with the live projection.",
    ),
    "results": Entry(
        "cmd_batch", "results", "Scores, standard errors, ranks and grades of a batch."
    ),
    "status": Entry(
        "cmd_batch",
        "status",
        "Completion counters of a batch (all from the projection, equal to the streams).",
    ),
    "stuck": Entry(
        "cmd_stuck",
        "stuck",
        "Pending entries per stream and group, entries stuck longer than --idle (with their "
        "batch, correlation id and essays), and stalled batches.",
    ),
    "submit": Entry(
        "cmd_batch",
        "submit",
        "Register a batch from FILE (JSON or CSV) and submit its first wave.",
    ),
    "validate": Entry(
        "cmd_validate",
        "validate",
        "Run one batch in each mode (or take two recorded runs) and compare them: error rates "
        "by provider and error type, A/B positions of anchors and students, counters against "
        "events, late/duplicate/orphan callbacks, provider calls, bundles, tokens by kind, "
        "cost, Spearman between the modes' θ and grade agreement.",
    ),
    "worker": Entry(
        "cmd_worker",
        "worker",
        "Run CJ and/or LPS consumers (or the stalled-batch reaper, which ends batches with no "
        "event for CJS_BATCH_IDLE_TIMEOUT_S as `cjs stuck --reclaim` does) until "
        "SIGTERM/SIGINT, then drain and exit 0: reading stops, provider calls in progress "
        "finish, requests not started are handed back for another worker, and nothing stays "
        "pending for this worker's consumers.",
    ),
}


class Cjs(click.Group):
    """Commands loaded from COMMANDS on first use; CjsError shown as one line with its code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        command = getattr(importlib.import_module(f"tools.{entry.module}"), entry.attribute)
        assert isinstance(command, click.Command), entry
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # As click's, from the table: listing the commands imports none of them.
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, make_default_short_help(entry.short_help, limit))
            for name, entry in sorted(COMMANDS.items())
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(errors.EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`cjs results B --csv | head`): nothing left to say to it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(errors.EXIT_BROKEN_PIPE)
        except Exception as exc:
            message, code = failure_of(exc)
            if code == errors.EXIT_INTERNAL and os.environ.get("CJS_DEBUG"):
                raise
            from events.redact import scrub  # the line may quote a URL or a key: never shown

            failure = click.ClickException(scrub(message))
            failure.exit_code = code
            raise failure from exc
        return None  # not reached: ctx.exit raises


def failure_of(exc: Exception) -> tuple[str, int]:
    """The one line and the exit code for an error that reached the command line."""
    if isinstance(exc, CjsError):
        return exc.message, exc.exit_code
    text = str(exc).strip() or type(exc).__name__
    # Only an error of a module already imported can be raised: checking the modules loaded
    # keeps `cjs --help` from importing redis (or gzip) just to name their exceptions.
    redis_errors = sys.modules.get("redis.exceptions")
    if redis_errors is not None and isinstance(exc, redis_errors.RedisError):
        from events.redact import mask_url
        from streams.errors import Policy, policy_of

        where = mask_url(os.environ.get("REDIS_URL")) or "REDIS_URL"
        # Redis's state that passes (the workers' table, streams/errors.py: down, timing out,
        # loading, out of memory, read-only, ...) and a refused connection (password, ACL) are
        # the environment; any other error is Redis refusing that one command.
        if policy_of(exc) in (Policy.WAIT, Policy.RECONNECT) or isinstance(
            exc, redis_errors.NoPermissionError
        ):
            return f"Redis at {where} failed: {text}", errors.EXIT_UNAVAILABLE
        return f"Redis at {where} refused a command: {text}", errors.EXIT_FAILURE
    gzip = sys.modules.get("gzip")
    if isinstance(exc, zlib.error | EOFError) or (
        gzip is not None and isinstance(exc, gzip.BadGzipFile)
    ):
        return f"a compressed file is corrupt or truncated: {text}", errors.EXIT_USAGE
    if isinstance(exc, TimeoutError):
        return f"timed out: {text}", errors.EXIT_FAILURE
    if isinstance(exc, OSError):
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or text}", errors.EXIT_USAGE
        return f"{type(exc).__name__}: {text}", errors.EXIT_UNAVAILABLE
    return (
        f"internal error, a bug: {type(exc).__name__}: {text} (CJS_DEBUG=1 shows the traceback)",
        errors.EXIT_INTERNAL,
    )


@click.group(cls=Cjs, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cj-streams")
def main() -> None:
    """cj-streams: Comparative Judgement of essays with an LLM judge, on Redis Streams.

    Start with `cjs demo`. Settings come from the environment: REDIS_URL,
    CJS_PREFIX (key namespace), CJS_PROCESSING_TIMEOUT_S, CJS_MAX_DELIVERIES,
    CJS_MOCK_PROFILE, ANTHROPIC_API_KEY, ...
    """

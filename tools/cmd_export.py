"""`cjs export` and `cjs import`: a batch's events as JSON lines, and back into a namespace
(the file format and the loading are in app/archive.py)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from app import archive, settings
from events.streams import STREAMS
from tools import common

PROGRESS_EVERY = 200_000


class Progress:
    """A line on stderr every PROGRESS_EVERY entries scanned, for big streams."""

    def __init__(self) -> None:
        self.scanned = 0
        self._next = PROGRESS_EVERY

    def __call__(self, n: int, stream: str, found: int) -> None:
        self.scanned += n
        if self.scanned >= self._next:
            click.echo(
                f"export: {self.scanned} entries scanned ({stream}), {found} of the batch", err=True
            )
            self._next += PROGRESS_EVERY


@click.command(name="export")
@click.argument("batch_id")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    help="File to write (.jsonl, or .jsonl.gz to compress; - for stdout).",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def export(batch_id: str, output: str, as_json: bool) -> None:
    """Write every event of BATCH_ID from the four streams, in stream order, one JSON line each:
    {type, stream, entry_id, data}. Progress goes to stderr for big streams."""
    common.quiet_logs(as_json)
    if as_json and output == "-":
        raise click.UsageError("--json and -o - would both write to stdout")
    archive.check_output(output)
    s = settings.load()

    started = time.perf_counter()
    records = common.with_redis(
        s,
        lambda r: archive.batch_records(
            r, settings.keys_for(s), batch_id, Progress(), s.archive_options
        ),
    )
    archive.write(records, output)
    by_stream = {name: sum(rec.stream == name for rec in records) for name in STREAMS}
    view = {
        "batch_id": batch_id,
        "output": output,
        "events": len(records),
        "by_stream": by_stream,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        common.emit_json(view)
    else:
        click.echo(
            f"exported {len(records)} events of {batch_id} to {output} "
            + " ".join(f"{k}={v}" for k, v in by_stream.items()),
            err=True,
        )


@click.command(name="import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--prefix", default=None, help="Key namespace to load into [default: $CJS_PREFIX].")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def import_(file: Path, prefix: str | None, as_json: bool) -> None:
    """Load an export FILE (.jsonl or .jsonl.gz) into a namespace and rebuild its projections,
    so that status, results, positions and replay work as on the original. Refuses a namespace
    that already holds the batch."""
    common.quiet_logs(as_json)
    s = settings.load()
    keys = settings.keys_for(s, prefix)
    started = time.perf_counter()
    per = archive.read_export(file)

    view = common.with_redis(s, lambda r: archive.load(r, keys, per))
    view = {
        "file": str(file),
        "prefix": keys.prefix,
        **view,
        "events": sum(len(v) for v in per.values()),
        "by_stream": {name: len(v) for name, v in per.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        common.emit_json(view)
    else:
        kept = ", ".join(
            f"{k}: {'original ids' if v else 'new ids'}"
            for k, v in view["ids_preserved"].items()
            if view["by_stream"][k]
        )
        click.echo(
            f"imported {view['events']} events of {', '.join(view['batches'])} into prefix "
            f"{keys.prefix!r} ({kept}); projections rebuilt"
        )

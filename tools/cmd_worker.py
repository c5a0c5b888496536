"""`cjs worker`: long-running consumers for containers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import click
import structlog

from app import loop as event_loop
from app import settings
from app.connection import connect
from app.heap import freeze_startup
from app.logs import error_text
from app.logs import start as start_logs
from app.metrics import serve
from app.wiring import InProcess
from lps.providers.registry import make_provider

log = structlog.get_logger("tools.worker")

# `timeout` (and some supervisors) signal the process and then its process group: the same
# stop request arrives twice within microseconds. Only a signal this much later forces the exit.
REPEAT_WINDOW_S = 1.0


@click.command()
@click.argument("role", type=click.Choice(["cj", "lps", "reaper", "all"]))
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on this port.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help=(
        "LPS: provider calls made at once while no rate limit is known; with one "
        "(CJS_LPS_RATE_LIMIT_RPM/_TPM, or the provider's headers) as many as the shared "
        "limiter allows, up to CJS_LPS_MAX_CONCURRENCY."
    ),
)
@click.option(
    "--consumers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Consumers of the role in this process.",
)
def worker(role: str, metrics_port: int | None, concurrency: int, consumers: int) -> None:
    """Run CJ and/or LPS consumers (or the stalled-batch reaper, which ends batches with no
    event for CJS_BATCH_IDLE_TIMEOUT_S as `cjs stuck --reclaim` does) until SIGTERM/SIGINT,
    then drain and exit 0: reading
    stops, provider calls in progress finish, requests not started are handed back for
    another worker, and nothing stays pending for this worker's consumers. A second signal,
    a second or more after the first, exits at once (one sent twice at once, as `timeout`
    does, still drains). If a consumer dies of an unexpected error the process exits 1.

    Needs REDIS_URL; waits for that Redis while it is unreachable. Logs are JSON lines on
    stderr (CJS_LOG_FORMAT=console: readable lines).
    """
    s = settings.load()
    start_logs(s.log_format, auto=True)
    r, where = connect(s, embedded_ok=False)
    if metrics_port is not None:
        serve(metrics_port)
    if role in ("lps", "all"):
        # The provider SDK loads here, not at the first request: importing it mid-work blocks
        # the event loop for a second or more, keep-alives of the entries held included.
        import lps.message_batches  # noqa: F401

    async def main() -> int:
        runner = InProcess(
            r,
            settings.keys_for(s),
            s,
            make_provider,
            cj_consumers=consumers if role in ("cj", "all") else 0,
            lps_workers=consumers if role in ("lps", "all") else 0,
            concurrency=concurrency,
            reapers=1 if role in ("reaper", "all") else 0,
        )
        loop = asyncio.get_running_loop()
        first_signal_at: float | None = None

        def on_signal(sig: signal.Signals) -> None:
            nonlocal first_signal_at
            now = loop.time()
            if first_signal_at is not None:
                if now - first_signal_at < REPEAT_WINDOW_S:
                    log.info("worker_signal_repeated", role=role, signal=sig.name)
                    return
                log.warning("worker_forced_exit", role=role, signal=sig.name)
                os._exit(128 + sig.value)
            first_signal_at = now
            log.info("worker_signal", role=role, signal=sig.name)
            runner.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        log.info(
            "worker_started",
            role=role,
            redis=where,
            consumers=consumers,
            concurrency=concurrency,
            metrics_port=metrics_port,
            event_loop=event_loop.running_kind(),
        )
        runner.start()
        freeze_startup()  # everything imported and built: out of the collector's way
        stopping = asyncio.create_task(runner.stop.wait())
        await asyncio.wait([stopping, *runner.tasks], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in runner.tasks if t.done() and not t.cancelled() and t.exception()]
        for task in crashed:
            exc = task.exception()
            log.error(
                "consumer_crashed",
                role=role,
                error=error_text(exc),
                exc_info=(type(exc), exc, exc.__traceback__) if exc else None,
            )
        log.info("worker_draining", role=role)
        await runner.close()
        stopping.cancel()
        await r.aclose()
        log.info("worker_stopped", role=role, exit_code=1 if crashed else 0)
        return 1 if crashed else 0

    sys.exit(event_loop.run(main(), s.event_loop))

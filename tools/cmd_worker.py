"""`cjs worker`: long-running consumers for containers."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import click
import structlog
from prometheus_client import start_http_server

from app import settings
from app.connection import connect
from app.logs import configure
from app.wiring import InProcess
from lps.providers.registry import make_provider

log = structlog.get_logger("tools.worker")


@click.command()
@click.argument("role", type=click.Choice(["cj", "lps", "reaper", "all"]))
@click.option(
    "--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port."
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="LPS: units of work judged at once.",
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
    another worker, and nothing stays pending for this worker's consumers. A second signal
    exits at once. If a consumer dies of an unexpected error the process exits 1.

    Needs REDIS_URL. Logs are JSON lines on stderr.
    """
    configure(json_logs=True)
    s = settings.load()
    if not s.redis_url:
        raise click.UsageError("REDIS_URL is not set: workers need a shared Redis server")
    if metrics_port is not None:
        start_http_server(metrics_port)

    async def main() -> int:
        r, where = connect(s, embedded_ok=False)
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

        def on_signal(sig: signal.Signals) -> None:
            if runner.stop.is_set():
                log.warning("worker_forced_exit", role=role, signal=sig.name)
                os._exit(128 + sig.value)
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
        )
        runner.start()
        stopping = asyncio.create_task(runner.stop.wait())
        await asyncio.wait([stopping, *runner.tasks], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in runner.tasks if t.done() and not t.cancelled() and t.exception()]
        for task in crashed:
            exc = task.exception()
            log.error(
                "consumer_crashed", role=role, error=f"{type(exc).__name__}: {exc}", exc_info=exc
            )
        log.info("worker_draining", role=role)
        await runner.close()
        stopping.cancel()
        await r.aclose()
        log.info("worker_stopped", role=role, exit_code=1 if crashed else 0)
        return 1 if crashed else 0

    sys.exit(asyncio.run(main()))

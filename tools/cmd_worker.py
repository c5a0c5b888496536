"""`cjs worker`: long-running consumers for containers."""

from __future__ import annotations

import asyncio
import signal

import click
import structlog
from prometheus_client import start_http_server

from lps.providers.registry import make_provider
from tools import common
from tools.logs import configure
from tools.runtime import InProcess, connect

log = structlog.get_logger("tools.worker")


@click.command()
@click.argument("role", type=click.Choice(["cj", "lps", "all"]))
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
    """Run CJ and/or LPS consumers until SIGTERM/SIGINT (then drain and exit 0).

    Needs REDIS_URL. Logs are JSON lines on stderr.
    """
    configure(json_logs=True)
    s = common.settings()
    if not s.redis_url:
        raise click.UsageError("REDIS_URL is not set: workers need a shared Redis server")
    if metrics_port is not None:
        start_http_server(metrics_port)

    async def main() -> None:
        r, where = connect(s, embedded_ok=False)
        runner = InProcess(
            r,
            common.keys_for(s),
            s,
            make_provider,
            cj_consumers=consumers if role in ("cj", "all") else 0,
            lps_workers=consumers if role in ("lps", "all") else 0,
            concurrency=concurrency,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stop.set)
        log.info(
            "worker_started",
            role=role,
            redis=where.split("@")[-1],
            consumers=consumers,
            concurrency=concurrency,
            metrics_port=metrics_port,
        )
        runner.start()
        await runner.stop.wait()
        log.info("worker_draining", role=role)
        await runner.close()
        await r.aclose()
        log.info("worker_stopped", role=role)

    asyncio.run(main())

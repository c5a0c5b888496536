"""`cjs dashboard`: the web dashboard (web/), served by this process until Ctrl-C."""

from __future__ import annotations

import errno
import socket

import click

from app import settings
from app.connection import open_redis
from app.errors import Unavailable
from app.logs import start as start_logs
from tools import common

TOKEN_VARIABLE = "CJS_DASHBOARD_TOKEN"


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True)
def dashboard(host: str, port: int) -> None:
    """Serve a web dashboard of the streams, stuck items, dead letters and batches.

    Read-only unless CJS_DASHBOARD_TOKEN is set: then whoever enters the token at /login (or
    sends it as `Authorization: Bearer`) may reclaim, expire or dead-letter a pending entry and
    redrive or delete a dead letter; every action is logged. Pages refresh themselves; each
    has its JSON under /api (the CLI's --json contracts). Listens on 127.0.0.1 unless --host
    says otherwise.
    """
    s = settings.load()
    start_logs(s.log_format, auto=True, level="INFO")

    async def probe() -> None:
        client = await open_redis(s)  # ConfigError without REDIS_URL, Unavailable if unreachable
        await client.aclose()

    common.run(probe)
    _check_port(host, port)
    from web.server import loopback, serve  # the web stack: only this command loads it

    token = s.dashboard_token.get_secret_value() if s.dashboard_token else None
    mode = "actions allowed with the token" if token else f"read-only ({TOKEN_VARIABLE} unset)"
    click.echo(f"cjs dashboard on http://{host}:{port}/ ({mode}); Ctrl-C to stop", err=True)
    if token and not loopback(host):
        click.echo(
            "warning: beyond this machine the token and session cross the network in clear "
            "unless a TLS proxy is in front",
            err=True,
        )
    serve(s, host=host, port=port, token=token)


def _check_port(host: str, port: int) -> None:
    """Unavailable, before the server starts, when `host:port` cannot be listened on: uvicorn
    would otherwise log the error and exit with its own code."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise Unavailable(
            f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}"
            + (" (another process listens there)" if exc.errno == errno.EADDRINUSE else "")
        ) from exc

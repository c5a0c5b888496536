"""Serving a worker's Prometheus metrics: the build it runs, and no `*_created` series (one per
counter and histogram child, doubling the series for nothing a dashboard uses)."""

from __future__ import annotations

import errno
import platform
from importlib import metadata

from prometheus_client import Gauge, disable_created_metrics, start_http_server

from app.errors import Unavailable

BUILD_INFO = Gauge("cjs_build_info", "The running build: always 1", ["version", "python"])


def version() -> str:
    try:
        return metadata.version("cj-streams")
    except metadata.PackageNotFoundError:
        return "unknown"


def serve(port: int) -> None:
    """Metrics on http://0.0.0.0:`port`/metrics; Unavailable when the port cannot be had."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    BUILD_INFO.labels(version(), platform.python_version()).set(1)
    try:
        start_http_server(port)
    except OSError as exc:
        raise Unavailable(
            f"cannot serve metrics on port {port}: {exc.strerror or exc}"
            + (" (another process listens there)" if exc.errno == errno.EADDRINUSE else "")
        ) from exc

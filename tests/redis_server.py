"""A real redis-server started by the tests themselves: random port, temp dir, AOF on."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, aof: bool = True, fsync: str = "always") -> None:
        """AOF with `appendfsync always` by default: a crash loses nothing the tests wrote."""
        self._aof = aof
        binary = shutil.which("redis-server")
        assert binary, "redis-server not found"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes" if aof else "no",
                "--appendfsync",
                fsync,
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)  # waiting for an external process to listen: nothing to await
        raise RuntimeError("redis-server did not start")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start(aof=getattr(self, "_aof", True))


def redis_required() -> bool:
    return os.environ.get("CJS_REQUIRE_REDIS", "") in ("1", "true", "yes")


def skip_or_fail_without_redis() -> None:
    if shutil.which("redis-server") is None:
        if redis_required():
            pytest.fail("CJS_REQUIRE_REDIS is set but redis-server is not installed")
        pytest.skip("redis-server not installed")

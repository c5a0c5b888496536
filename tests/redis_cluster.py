"""A real Redis Cluster started by the tests: 3 masters + 3 replicas on random loopback
ports in a temp dir (AOF on), created with `redis-cli --cluster create`, torn down by
SIGKILL of every node. Readiness is polled (CLUSTER INFO `cluster_state:ok` on every node,
every replica in sync), never waited for with a fixed sleep."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.redis_server import redis_required


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(20000, 55000)
        if _bindable(port) and _bindable(port + 10000):
            return port


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.stdout


def skip_or_fail_without_cluster() -> None:
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        if redis_required():
            pytest.fail(f"CJS_REQUIRE_REDIS is set but {', '.join(missing)} not installed")
        pytest.skip(f"{', '.join(missing)} not installed")


@dataclass
class ClusterNode:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "1000",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args)

    def role(self) -> str:
        for line in self.cli("ROLE").splitlines():
            return line.strip()
        return ""


@dataclass
class RedisClusterServer:
    dir: Path
    masters: int = 3
    replicas: int = 1
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A live node's URL (a test may have killed the first: later ones still connect)."""
        node = next((n for n in self.nodes if n.alive()), self.nodes[0])
        return f"redis://127.0.0.1:{node.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        n = self.masters * (1 + self.replicas)
        self.nodes = [
            ClusterNode(port, self.dir / str(port)) for port in (cluster_port() for _ in range(n))
        ]
        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while node.cli("PING").strip() != "PONG":
                self._check(deadline)
        if self.masters == 1 and self.replicas == 0:  # `--cluster create` wants 3 masters
            self.nodes[0].cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        else:
            args = [f"127.0.0.1:{node.port}" for node in self.nodes]
            created = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *args,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}")
        self.wait_ok(deadline)

    def _check(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError("Redis Cluster did not become ready")
        time.sleep(0.05)  # polling external processes: nothing to await

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive()]

    def wait_ok(self, deadline: float | None = None) -> None:
        """Every live node says `cluster_state:ok`, agrees on one epoch's view of the
        masters, and every replica of a live master is in sync."""
        deadline = deadline or time.monotonic() + 30
        while True:
            live = self.live()
            states = [n.cli("CLUSTER", "INFO") for n in live]
            if all("cluster_state:ok" in s for s in states) and self._replicas_synced(live):
                return
            self._check(deadline)

    def _replicas_synced(self, live: list[ClusterNode]) -> bool:
        for node in live:
            info = node.cli("INFO", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def master_nodes(self) -> list[ClusterNode]:
        return [n for n in self.live() if n.role() == "master"]

    def node_of_port(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def master_of_slot(self, slot: int) -> ClusterNode:
        for line in self.live()[0].cli("CLUSTER", "NODES").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for rng in parts[8:]:
                if rng.startswith("["):
                    continue
                lo, _, hi = rng.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return self.node_of_port(int(parts[1].split(":")[1].split("@")[0]))
        raise LookupError(f"no master holds slot {slot}")

    def node_id(self, node: ClusterNode) -> str:
        return node.cli("CLUSTER", "MYID").strip()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def keyslot(port: int, key: str) -> int:
    return int(_cli(port, "CLUSTER", "KEYSLOT", key).strip())

"""The Redis engines the contract tests run on.

The contract tests (tests/contract/test_*.py) state the invariants of docs/design.md once,
against an `Engine`; the `engine` fixture (tests/contract/conftest.py) runs each of them on
every engine in `ENGINES`. An engine only says how to reach its Redis (`create_client`), like
the recorder test cases of the eventsourcing library with their abstract `create_recorder()`.
Adding one (a Redis Cluster, issue 12) is a subclass of a few lines and an entry in `ENGINES`.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import fakeredis
import pytest
import redis.asyncio as aioredis

from streams.client import connect
from streams.keys import Keys


class Engine(ABC):
    """One Redis for one test: clients to it, and a key namespace of the test's own."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.keys = self.namespace()
        self._clients: list[Any] = []

    @abstractmethod
    async def create_client(self) -> Any:
        """A new client with its own connections (bytes replies), as each worker process has."""

    async def client(self) -> Any:
        """A client closed at the end of the test."""
        client = await self.create_client()
        self._clients.append(client)
        return client

    @staticmethod
    def namespace() -> Keys:
        """A fresh key namespace. Its prefix is a hash tag, so that every key a test touches is
        in one cluster slot (the layout `CJS_PREFIX='{cjs}:'` gives a deployment)."""
        return Keys(f"{{t{uuid.uuid4().hex[:12]}}}:")

    @abstractmethod
    async def drop_watching(self, key: str) -> None:
        """Close the server side of the connection that last sent a WATCH (of `key`), as a
        network fault would; `heal` lets clients connect again."""

    async def heal(self) -> None:  # noqa: B027 (a real server accepts connections throughout)
        """After `drop_watching`: new connections are accepted again."""

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class FakeredisEngine(Engine):
    """fakeredis: an in-process server per test, shared by the test's clients."""

    name = "fakeredis"

    def __init__(self) -> None:
        super().__init__()
        self.server = fakeredis.FakeServer()

    async def create_client(self) -> Any:
        return fakeredis.FakeAsyncRedis(server=self.server)

    async def drop_watching(self, key: str) -> None:
        self.server.connected = False

    async def heal(self) -> None:
        self.server.connected = True


class RedisServerEngine(Engine):
    """A real redis-server: one for the session (tests/conftest.py), a namespace per test."""

    name = "redis"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    async def create_client(self) -> Any:
        return aioredis.from_url(self.url)

    async def drop_watching(self, key: str) -> None:
        async with aioredis.from_url(self.url) as admin:
            await _kill_watching(admin, {})


class RedisClusterEngine(Engine):
    """A real Redis Cluster (3 masters, tests/conftest.py `shared_redis_cluster`), reached as
    the workers reach one: redis-py's cluster client (streams/client.py). The namespace's hash
    tag keeps a test's keys in one slot; a unit across slots would be refused."""

    name = "cluster"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    async def create_client(self) -> Any:
        client, _ = connect(self.url, cluster=True)
        await client.initialize()
        return client

    async def drop_watching(self, key: str) -> None:
        admin = await self.create_client()
        try:
            await _kill_watching(admin, {"target_nodes": admin.get_node_from_key(key)})
        finally:
            await admin.aclose()


async def _kill_watching(admin: Any, where: dict[str, Any]) -> None:
    listing = await admin.execute_command("CLIENT", "LIST", "TYPE", "normal", **where)
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    ids = [
        fields["id"]
        for fields in (
            dict(f.split("=", 1) for f in line.split() if "=" in f) for line in text.splitlines()
        )
        if fields.get("cmd") == "watch"
    ]
    assert len(ids) == 1, f"one watching connection expected: {text}"
    await admin.execute_command("CLIENT", "KILL", "ID", ids[0], **where)


# name -> how to build the engine for one test (from the test's fixture request).
ENGINES: dict[str, Callable[[pytest.FixtureRequest], Engine]] = {
    "fakeredis": lambda request: FakeredisEngine(),
    "redis": lambda request: RedisServerEngine(request.getfixturevalue("shared_redis_server").url),
    "cluster": lambda request: RedisClusterEngine(
        request.getfixturevalue("shared_redis_cluster").url
    ),
}

# Marks per engine: a real server is a `redis` test (skipped without redis-server unless
# CJS_REQUIRE_REDIS=1, see tests/redis_server.py).
MARKS: dict[str, list[pytest.MarkDecorator]] = {
    "redis": [pytest.mark.redis],
    "cluster": [pytest.mark.redis],
}

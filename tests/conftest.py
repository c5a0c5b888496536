from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

import tools  # noqa: F401  (first: pins BLAS to one thread before numpy loads)
from streams.keys import Keys
from streams.packing import install
from tests.redis_cluster import RedisClusterServer, skip_or_fail_without_cluster
from tests.redis_server import RedisServer, skip_or_fail_without_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: for tests that stop, kill or restart it, or that
    drive the CLI under a fixed prefix."""
    skip_or_fail_without_redis()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="session")
def shared_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session, shared by every test that only needs a Redis: each
    works under a key prefix of its own. Nothing here survives a crash, so no AOF."""
    skip_or_fail_without_redis()
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"))
    server.start(aof=False)
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """One Redis Cluster (3 masters, no replicas) for the session's contract tests: each works
    under a key prefix of its own, with a hash tag (one slot)."""
    skip_or_fail_without_cluster()
    server = RedisClusterServer(tmp_path_factory.mktemp("shared-cluster"), replicas=0)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[Any]:
    # packed by hiredis, as the workers' clients are (streams.client.connect)
    client = install(aioredis.from_url(redis_server.url, decode_responses=False))
    yield client
    await client.aclose()


@pytest.fixture
async def shared_redis(shared_redis_server: RedisServer) -> AsyncIterator[Any]:
    """A client of the session's shared redis-server (use a key prefix of the test's own)."""
    client = install(aioredis.from_url(shared_redis_server.url, decode_responses=False))
    yield client
    await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis(decode_responses=False)
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> Keys:
    return Keys("t:")

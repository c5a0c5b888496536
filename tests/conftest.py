from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis

import tools  # noqa: F401  (first: pins BLAS to one thread before numpy loads)
from streams.keys import Keys
from tests.redis_server import RedisServer, skip_or_fail_without_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    skip_or_fail_without_redis()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop(kill=True)


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = aioredis.from_url(redis_server.url, decode_responses=False)
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

"""A decision's transaction on every engine: once its WATCH is lost with its connection, it
fails (WatchError or a connection error) and writes nothing. redis-py's cluster client would
otherwise re-send MULTI/EXEC on a new connection that holds no WATCH (streams/client.py), and
a stale `advance` decision could be appended after another consumer's, or twice."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ConnectionError, WatchError

from streams.keys import Keys
from tests.contract.engines import Engine


async def test_a_transaction_that_lost_its_watch_writes_nothing(
    engine: Engine, r: Any, keys: Keys
) -> None:
    key = keys.prefix + "decided"
    async with r.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        await engine.drop_watching(key)
        pipe.multi()
        pipe.set(key, "written without its WATCH")
        with pytest.raises((ConnectionError, WatchError)):
            await pipe.execute()
    await engine.heal()
    assert await r.get(key) is None

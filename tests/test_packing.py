"""Commands packed by hiredis (streams/packing.py): the bytes redis-py would send, its
refusals kept, and commands and pipelines that work against a redis-server; the client
speaks RESP2 (streams/client.py)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import redis.utils
import uvloop
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.client import connect
from streams.packing import install, packing
from tests.redis_server import RedisServer, skip_or_fail_without_redis

COMMANDS: list[tuple[Any, ...]] = [
    ("SET", "k", "v"),
    ("XADD", b"cj:requests", "*", "type", "x", "n", 1, "f", 1.5, "tiny", 1e-300, "big", 10**20),
    ("EVALSHA", "0" * 40, 2, "k1", b"k2", -0.0, float("inf"), "é☃", b"\x00\xff\r\n"),
    ("SCRIPT LOAD", "return 1"),  # a name of two words: two arguments
    (b"XGROUP CREATE", b"s", b"g", b"$", b"MKSTREAM"),
    ("SET", "k", bytearray(b"ab")),
    ("SET", "k", memoryview(b"cd")),
    ("SET", "k", "x" * 100_000),  # above redis-py's buffer cutoff: sent in pieces there
]


@pytest.mark.parametrize("args", COMMANDS, ids=range(len(COMMANDS)))
def test_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    ours = packing(Connection)().pack_command(*args)
    theirs = Connection().pack_command(*args)
    assert b"".join(ours) == b"".join(bytes(part) for part in theirs)


def test_pipelines_pack_the_same_bytes() -> None:
    ours = packing(Connection)().pack_commands(COMMANDS)
    theirs = Connection().pack_commands(COMMANDS)
    assert b"".join(ours) == b"".join(bytes(part) for part in theirs)


@pytest.mark.parametrize("value", [None, True, object(), [1]])
def test_what_redis_py_refuses_is_refused(value: Any) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        packing(Connection)().pack_command("SET", "k", value)


def test_another_encoding_keeps_redis_py_packing() -> None:
    conn = packing(Connection)(encoding="latin-1")
    assert conn.pack_command("SET", "k", "é") == Connection(encoding="latin-1").pack_command(
        "SET", "k", "é"
    )


def test_the_connection_class_of_the_url_is_kept() -> None:
    client = install(aioredis.from_url("unix:///tmp/none.sock"))
    cls = client.connection_pool.connection_class
    assert issubclass(cls, UnixDomainSocketConnection) and packing(cls) is cls
    assert issubclass(
        connect("redis://localhost:1")[0].connection_pool.connection_class, packing(Connection)
    )


async def test_commands_and_pipelines_on_a_redis_server(shared_redis_server: Any) -> None:
    r, _ = connect(shared_redis_server.url)
    key = f"pack{uuid.uuid4().hex[:6]}"
    try:
        await r.set(key, "é☃" * 5000)
        assert (await r.get(key)).decode() == "é☃" * 5000
        async with r.pipeline(transaction=True) as pipe:
            pipe.xadd(f"{key}:s", {"type": "x", "n": 3, "f": 0.25})
            pipe.hset(f"{key}:h", mapping={"a": 1, "b": b"\x00"})
            pipe.eval("return ARGV[1]", 0, 1.5)
            _, added, echoed = await pipe.execute()
        assert added == 2 and echoed == b"1.5"
        ((_, fields),) = await r.xrange(f"{key}:s")
        assert fields == {b"type": b"x", b"n": b"3", b"f": b"0.25"}
    finally:
        await r.delete(key, f"{key}:s", f"{key}:h")
        await r.aclose()


async def test_connections_name_the_driver_without_looking_its_version_up(
    shared_redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections still give CLIENT SETINFO redis-py's name and version (Redis 7.2 shows
    them; Debian's 7.0 ignores it), given once (streams/client.py), not looked up in the
    packages' metadata for every connection a pool opens."""

    def looked_up() -> str:
        raise AssertionError("redis-py looked its version up for a connection")

    monkeypatch.setattr(redis.utils, "get_lib_version", looked_up)
    r, _ = connect(shared_redis_server.url)
    try:
        for _ in range(3):  # new connections of the pool, each introduced to the server
            conn = r.connection_pool.make_connection()
            await conn.connect()
            info = conn.driver_info
            assert (info.name, info.lib_version) == ("redis-py", redis.__version__)
            await conn.disconnect()
        assert await r.ping()
    finally:
        await r.aclose()
    cluster, _ = connect(shared_redis_server.url, cluster=True)  # it connects when first used
    assert cluster.connection_kwargs["driver_info"].lib_version == redis.__version__


async def test_the_client_speaks_resp2(shared_redis_server: Any) -> None:
    """redis-py 8 asks for RESP3 unless told; its maps cost ≈ 5× the CPU of RESP2's arrays
    to read (streams/client.py), so the client asks for RESP2, and replies keep their shapes."""
    r, _ = connect(shared_redis_server.url)
    key = f"resp{uuid.uuid4().hex[:6]}"
    try:
        assert (await r.client_info())["resp"] == "2"
        await r.hset(key, mapping={"a": 1, "b": "x"})
        assert await r.hgetall(key) == {b"a": b"1", b"b": b"x"}
        await r.xadd(f"{key}:s", {"f": "v"})
        await r.xgroup_create(f"{key}:s", "g", id="0")
        ((stream, entries),) = await r.xreadgroup("g", "c", {f"{key}:s": ">"}, count=5)
        assert stream == f"{key}:s".encode() and entries[0][1] == {b"f": b"v"}
    finally:
        await r.delete(key, f"{key}:s")
        await r.aclose()


async def test_a_command_the_socket_takes_is_sent_without_a_task(
    shared_redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py sends under asyncio.wait_for (a Task per command) whenever a socket timeout is
    set; ours only when the write must wait for the server (issue 11)."""
    client = install(aioredis.from_url(shared_redis_server.url, socket_timeout=5.0))
    try:
        await client.ping()
        waits: list[object] = []
        real = asyncio.wait_for

        def counted_wait_for(*a: Any, **k: Any) -> Any:
            waits.append(a)
            return real(*a, **k)

        monkeypatch.setattr(asyncio, "wait_for", counted_wait_for)
        assert await client.echo("x") == b"x"
        async with client.pipeline(transaction=True) as pipe:
            pipe.echo("a").echo("b")
            assert await pipe.execute() == [b"a", b"b"]
        assert waits == []
    finally:
        await client.aclose()


async def test_a_hung_server_still_times_out(tmp_path: Path) -> None:
    """A stopped redis-server: a write the socket cannot take times out (the drain is waited
    for under the socket timeout), and so does the read of one it took."""
    skip_or_fail_without_redis()
    server = RedisServer(tmp_path)
    server.start(aof=False)
    assert server.proc is not None
    client = install(aioredis.from_url(server.url, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)))
    try:
        await client.ping()
        server.proc.send_signal(signal.SIGSTOP)
        for value in (b"x" * (64 << 20), b"small"):  # the drain waits; the read waits
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(client.set("k", value), 20)
            assert time.monotonic() - started < 10
    finally:
        server.proc.send_signal(signal.SIGCONT)
        await client.aclose()
        server.stop(kill=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_send_on_a_connection_that_is_gone_fails_as_a_lost_connection(
    shared_redis_server: Any, loop: str
) -> None:
    """A send on a connection that is gone failed inside redis-py with AttributeError or
    RuntimeError, which no retry or error policy takes for a lost connection:
    - closed under the send by another task (redis-py's cluster client closes its nodes'
      connections, those in use too, in a failover: it crashed an LPS worker's WAIT in
      bench/failover.py). The close is let run 0, 1, 2, ... loop steps before the send, so
      that one send meets it half done whatever the event loop's order;
    - its transport closed (the server went away): on uvloop, the workers' loop, RuntimeError
      ("the handler is closed"; a Redis restart killed an LPS worker so).
    Each is a ConnectionError now, and the next command on the connection reconnects."""
    cls = packing(Connection)
    port = shared_redis_server.port

    async def scenario() -> bool:
        met_half_closed = False
        for steps in [*range(8), -1]:  # -1: the transport closed, nothing else
            conn = cls(host="127.0.0.1", port=port, socket_timeout=5.0)
            await conn.connect()
            closing = None
            if steps < 0:
                conn._writer.transport.close()
            else:
                closing = asyncio.create_task(conn.disconnect())
                for _ in range(steps):
                    await asyncio.sleep(0)
                writer = conn._writer
                met_half_closed |= writer is not None and writer.transport.is_closing()
            try:
                await conn.send_packed_command(conn.pack_command("PING"))
                assert await conn.read_response() == b"PONG"
            except RedisConnectionError:
                pass  # lost, as a lost connection: what the callers retry
            if closing is not None:
                await closing
            await conn.disconnect()
            await conn.send_packed_command(conn.pack_command("PING"))
            assert await conn.read_response() == b"PONG"
            await conn.disconnect()
        return met_half_closed

    met_half_closed = uvloop.run(scenario()) if loop == "uvloop" else asyncio.run(scenario())
    assert met_half_closed, "no send met the close half done: the test did not test the race"

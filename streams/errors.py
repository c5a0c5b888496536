"""What a worker does about each kind of Redis error: the one table.

A Redis error is either the server's state, which passes (out of memory, a failover, a
restart, a long script), or the consumer group gone (an operator's `XGROUP DESTROY`), or a
bug. The first two get a policy and the worker carries on; only a bug stops it. A policy:

- `wait`: back off (capped exponential) and try again on the same connections;
- `reconnect`: drop the pooled connections first, so the next command connects afresh
  (after a failover the URL, its DNS name or proxy, points at the new primary), then wait;
- `recreate`: the consumer group is gone; recreate it where the group had got to (see
  `streams.reader.ensure_group`), then go on.

| reply / exception | meaning | policy |
|---|---|---|
| connection refused / reset, timeout | Redis down or unreachable | reconnect |
| `LOADING` | Redis restarting, loading its data | wait |
| `OOM` | `maxmemory` reached under `noeviction` | wait |
| `BUSY` | a script runs too long | wait |
| `NOSCRIPT` | script cache empty after a restart (the client reloads it) | wait |
| `MISCONF` | writes refused after a failed save | wait |
| `NOREPLICAS` | too few replicas for `min-replicas-to-write` | wait |
| `CLUSTERDOWN`, `TRYAGAIN` | cluster reconfiguring (also the cluster client's own errors) | wait |
| `UNBLOCKED` | a blocked read was cut off (the node became a replica) | wait |
| `READONLY` | connected to a replica (a failover demoted the node) | reconnect |
| `MASTERDOWN` | a replica lost its primary | reconnect |
| `MOVED`, `ASK` | the slot lives elsewhere (cluster) | reconnect |
| `NOGROUP` | the consumer group was destroyed | recreate |
| anything else | a bug | raise |
"""

from __future__ import annotations

import re
from enum import StrEnum

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError


class Policy(StrEnum):
    WAIT = "wait"
    RECONNECT = "reconnect"
    RECREATE = "recreate"


BY_CODE: dict[str, Policy] = {
    "LOADING": Policy.WAIT,
    "OOM": Policy.WAIT,
    "BUSY": Policy.WAIT,
    "NOSCRIPT": Policy.WAIT,
    "MISCONF": Policy.WAIT,
    "NOREPLICAS": Policy.WAIT,
    "CLUSTERDOWN": Policy.WAIT,
    "TRYAGAIN": Policy.WAIT,
    "UNBLOCKED": Policy.WAIT,
    "READONLY": Policy.RECONNECT,
    "MASTERDOWN": Policy.RECONNECT,
    "MOVED": Policy.RECONNECT,
    "ASK": Policy.RECONNECT,
    "NOGROUP": Policy.RECREATE,
}

# redis-py's classes that drop the code from the message (the parser strips it).
_BY_CLASS_NAME = {
    "OutOfMemoryError": "OOM",
    "ReadOnlyError": "READONLY",
    "BusyLoadingError": "LOADING",
    "NoScriptError": "NOSCRIPT",
    "MasterDownError": "MASTERDOWN",
    "ClusterDownError": "CLUSTERDOWN",
    "TryAgainError": "TRYAGAIN",
    "MovedError": "MOVED",
    "AskError": "ASK",
    # The cluster client's own: retries used up in a failover, a slot no node covers.
    "ClusterError": "CLUSTERDOWN",
    "RedisClusterException": "CLUSTERDOWN",
}

# The code is the reply's first word; a pipeline prefixes "Command # n (...) of pipeline
# caused error: " to it.
_CODE = re.compile(r"(?:^|caused error: \(?['\"]?)([A-Z]{2,})\b")


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of `exc` (`OOM`, `NOGROUP`, ...), None when it has none we know."""
    for cls in type(exc).__mro__:
        code = _BY_CLASS_NAME.get(cls.__name__)
        if code is not None:
            return code
    if not isinstance(exc, RedisError):
        return None
    for match in _CODE.finditer(str(exc)[:500]):
        if match.group(1) in BY_CODE:
            return match.group(1)
    return None


def policy_of(exc: BaseException) -> Policy | None:
    """What to do about `exc`, or None when it is not a state of Redis that passes (a bug)."""
    code = error_code(exc)
    if code is not None:
        return BY_CODE[code]
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ConnectionError | OSError):
        return Policy.RECONNECT
    return None


def kind_of(exc: BaseException) -> str:
    """A short label of `exc` for logs and metrics: its code, or its class name."""
    return error_code(exc) or type(exc).__name__

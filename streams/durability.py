"""Waiting for a replica to hold a commit (CJS_MIN_REPLICAS_ACK).

Redis replicates asynchronously: a master that dies right after a commit may take it with
it, and its promoted replica goes on without it. `wait_for_replicas` narrows that window
for the commits that acknowledge work — an LPS result (callback appended, request acked)
and a CJ callback apply — with WAIT: after the commit, the worker writes a probe key of the
same partition (so the same master) and WAITs on that connection for `replicas` replicas
to acknowledge it. The replication stream is ordered, so the probe acknowledged means every
earlier write of that master is on the replica too. A cluster client's pooled commands
cannot carry a keyless WAIT, so there the probe and WAIT are sent on one connection taken
from the node owning the partition's slot.

WAIT does not make Redis strongly consistent: a replica may still be promoted without a
commit that timed out waiting (the worker logs `replica_ack_short` and goes on).
"""

from __future__ import annotations

from typing import Any

import structlog

from streams.keys import Keys
from streams.metrics import REPLICA_ACK_SHORT

log = structlog.get_logger("streams.durability")

PROBE_TTL_MS = 60_000


def is_cluster(r: Any) -> bool:
    return hasattr(r, "nodes_manager")


async def wait_for_replicas(r: Any, keys: Keys, replicas: int, timeout_ms: int) -> int | None:
    """After a commit in `keys`' partition: wait until `replicas` replicas hold it (at most
    `timeout_ms`). Returns how many did, None when not asked to wait."""
    if replicas <= 0:
        return None
    probe = keys.key("replica-ack")
    if is_cluster(r):
        node = r.get_node_from_key(probe)
        conn = node.acquire_connection()
        try:
            await conn.send_packed_command(
                conn.pack_commands(
                    [
                        ("SET", probe, "1", "PX", str(PROBE_TTL_MS)),
                        ("WAIT", str(replicas), str(timeout_ms)),
                    ]
                )
            )
            await conn.read_response()
            acked = int(await conn.read_response())
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)
    else:
        async with r.pipeline(transaction=False) as pipe:
            pipe.set(probe, "1", px=PROBE_TTL_MS)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            acked = int((await pipe.execute())[-1])
    if acked < replicas:
        REPLICA_ACK_SHORT.inc()
        log.warning("replica_ack_short", probe=probe, acked=acked, wanted=replicas)
    return acked

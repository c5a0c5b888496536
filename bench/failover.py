"""What a master's failover loses, with replica acknowledgement off and on (CJS_MIN_REPLICAS_ACK
0 and 1, streams/durability.py).

    python bench/failover.py [--trials 4] [--batches 6] [--essays 12] [--budget 40]
                             [--partitions 6] [--acks 0 1] [--lag-ms 0]

Starts a Redis Cluster of 3 masters + 3 replicas (tests/redis_cluster.py, AOF always, node
timeout 1 s). Per trial: batches submitted as `cjs submit` does (spread over the partitions),
CJ and LPS in this process on the mock judge (profile `ideal`: one provider call per request
unless a result is lost), and once a fifth of the comparisons are in, the master holding most
partitions is SIGKILLed; its replica takes over; the killed node is restarted (as a supervisor
would) and rejoins as a replica before the next trial. Per trial it counts what the failover
took with it, each from its trace:

- `results_lost`: LPS results (callback, XACK, done marker) acknowledged to the worker (after
  its WAIT, when on) and lost with the master: acknowledged more often than the stream holds
  them (the request came back, was judged and committed again);
- `applies_lost`: CJ applies (projection, XACK) acknowledged and lost: applied again;
- `extra_provider_calls`: provider calls beyond one per request (a lost result, or a result
  whose commit failed in the failover, is judged again: paid twice);
- `duplicates`: results appended twice (counted once by the projection), and `waves_resent`:
  waves appended twice (a commit whose reply the failover swallowed, sent again by the
  client; its requests twice too, both judged when read together);
- `orphans`: callbacks for requests the batch does not know (a lost wave whose requests were
  judged before the loss);
- `lost_batches`: registrations lost; `inexact`: batches whose counters differ from their
  callbacks or whose replay differs from the live projection (never expected);
- `lag_bytes`: how far the victim's replica was behind it at the kill (replication offsets:
  the master's just before the kill less the replica's when last read), and `ack_short`:
  commits whose WAIT timed out;
- `failover_s`: the kill to a promoted replica; `done_s_after_kill`: the kill to the end of
  the last batch, what a user waits (median and max over the trials in the summary row);
  `trials_failed`: trials that raised (a worker's task died, say), each printed with its
  traceback and left out of the totals.

On one machine the replica is a few microseconds behind its master: a kill rarely finds
anything unreplicated. `--lag-ms N` cuts the replica off N ms before the kill (the replica
stopped with SIGSTOP, its link closed by the master with CLIENT KILL TYPE replica, SIGCONT
after the kill), as a link that fails just before its master does: what the master
acknowledged in those N ms is what the failover can take. (Stopping the replica alone would
not do: the kernel keeps what the master sends, and the replica reads it on waking; closing
the link alone neither: the replica reconnects within a few ms and catches up.)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import REGISTRY

from app.settings import Settings, keys_for
from app.wiring import InProcess
from cj.consumer import CJConsumer
from cj.continuation import advance
from cj.registration import register_once
from events import codec
from events.ids import request_key
from events.text import as_str
from events.types import (
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    WaveSubmitted,
)
from lps.providers.base import Judgement
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from lps.worker import Committer
from projections.replay import replay
from projections.store import CallbackApplier, encode_state, load_state
from streams.client import connect
from streams.consumer import GroupConsumer
from streams.durability import wait_for_replicas
from streams.keys import Keys
from streams.paging import read_stream
from streams.resilience import REDIS_ERRORS
from tests.helpers import registration, snapshot
from tests.redis_cluster import ClusterNode, RedisClusterServer


class Counting:
    """The mock judge, counting its calls per request (`events.ids.request_key`: correlation
    ids are numbered per batch)."""

    def __init__(self, inner: Any, calls: Counter[str]) -> None:
        self.inner = inner
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def judge(self, request: ComparisonRequested) -> Judgement:
        self.calls[request.key] += 1
        result: Judgement = await self.inner.judge(request)
        return result


class Acknowledged:
    """What Redis acknowledged to the workers, at the point each worker goes on (after its
    WAIT when CJS_MIN_REPLICAS_ACK=1): LPS results per correlation id, CJ applies accepted
    per callback (batch and entry id). A write acknowledged twice was lost once: the failover
    took the first, and the worker had to do it again."""

    def __init__(self) -> None:
        self.results: Counter[str] = Counter()
        self.applies: Counter[str] = Counter()
        self._stash: dict[Any, list[str]] = {}

    def install(self) -> None:
        write, apply, durable = Committer._write, CallbackApplier.apply, GroupConsumer.durable
        handle = CJConsumer.handle
        ack = self

        async def recorded_write(committer: Committer, batch: list[Any]) -> list[str]:
            outcomes = await write(committer, batch)  # the commit and its WAIT
            for item in batch:
                cid = getattr(item.callback, "correlation_id", "")
                ack.results[request_key(getattr(item.callback, "batch_id", ""), cid)] += 1
            return outcomes

        async def recorded_apply(
            applier: CallbackApplier, callback: Any, entry_id: str, *, parked: bool = False
        ) -> Any:
            result = await apply(applier, callback, entry_id, parked=parked)
            if as_str(result[0]) == "accepted":  # entry ids are per stream: with the batch
                done = f"{callback.batch_id} {entry_id}"
                ack._stash.setdefault(asyncio.current_task(), []).append(done)
            return result

        async def recorded_durable(consumer: GroupConsumer[Any]) -> None:
            # The page's accepted applies count once the worker goes on: not when its WAIT
            # fails (the page is read again), nor when an apply of the page failed.
            applied = ack._stash.pop(asyncio.current_task(), [])
            await durable(consumer)
            for entry_id in applied:
                ack.applies[entry_id] += 1

        async def recorded_handle(consumer: CJConsumer, entries: Any) -> None:
            ack._stash.pop(asyncio.current_task(), None)
            await handle(consumer, entries)

        Committer._write = recorded_write  # type: ignore[method-assign,assignment]
        CallbackApplier.apply = recorded_apply  # type: ignore[method-assign,assignment]
        GroupConsumer.durable = recorded_durable  # type: ignore[method-assign,assignment]
        CJConsumer.handle = recorded_handle  # type: ignore[method-assign,assignment]

    def reset(self) -> None:
        self.results.clear()
        self.applies.clear()
        self._stash.clear()

    @staticmethod
    def lost(counts: Counter[str]) -> int:
        return sum(n - 1 for n in counts.values() if n > 1)


ACK = Acknowledged()


def ack_short() -> float:
    return REGISTRY.get_sample_value("redis_replica_ack_short_total") or 0.0


def repl_offset(node: ClusterNode, field: str) -> int:
    for line in node.cli("INFO", "replication").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split(":", 1)[1])
    return 0


def replica_of(cluster: RedisClusterServer, master: ClusterNode) -> ClusterNode | None:
    for node in cluster.live():
        info = node.cli("INFO", "replication")
        if "role:slave" in info and f"master_port:{master.port}" in info:
            return node
    return None


async def load(r: Any, keys: Keys, batch_id: str) -> Any:
    while True:
        try:
            return await load_state(r, keys, batch_id)
        except REDIS_ERRORS:  # the poll's own read met the failover: read again
            await asyncio.sleep(0.1)


async def trial(cluster: RedisClusterServer, ack: int, args: argparse.Namespace) -> dict[str, Any]:
    s = Settings(
        prefix=f"f{uuid.uuid4().hex[:6]}:",
        partitions=args.partitions,
        redis_cluster=True,
        min_replicas_ack=ack,
        block_ms=50,
        retry_base_delay_s=0.001,
        retry_max_delay_s=0.01,
        processing_timeout_s=30.0,
    )
    r, _ = connect(cluster.url, cluster=True, retries=4, connect_timeout_s=1.0)
    await r.initialize()
    keys = keys_for(s)
    ids = []
    for k in range(args.batches):
        event = registration(args.essays, budget=args.budget, seed=int(time.time()) % 1000 + k)
        ids.append((await register_once(r, keys, event))[0])
        # As `cjs submit` does: a replica holds the batch before it is said registered.
        await wait_for_replicas(r, keys.for_batch(ids[-1]), ack, s.replica_ack_timeout_ms)
    calls: Counter[str] = Counter()
    short0 = ack_short()
    ACK.reset()
    runner = InProcess(
        r,
        keys,
        s,
        lambda name: Counting(make_provider(name, mock_profile=PROFILES["ideal"]), calls),
        concurrency=8,
    )
    runner.start()
    try:
        for b in ids:
            await advance(r, keys, b)
        target = args.batches * args.budget // 5
        while sum(calls.values()) < target:
            runner.check()
            await asyncio.sleep(0.01)
        # The master holding most partitions, its replica's lag, then SIGKILL.
        owners = Counter(r.get_node_from_key(part.batches).port for part in keys.all_partitions())
        victim = cluster.node_of_port(owners.most_common(1)[0][0])
        replica = replica_of(cluster, victim)
        assert replica is not None and replica.proc is not None, "the victim has no replica"
        if args.lag_ms:
            # The replica's link drops, and the replica cannot reconnect (stopped): the master
            # goes on alone. What it sent before is in the replica's socket, read on waking.
            replica.proc.send_signal(signal.SIGSTOP)
            victim.cli("CLIENT", "KILL", "TYPE", "replica")
            cut = repl_offset(victim, "master_repl_offset")
            await asyncio.sleep(args.lag_ms / 1000)
        else:
            cut = repl_offset(replica, "slave_repl_offset")
        lag = max(0, repl_offset(victim, "master_repl_offset") - cut)
        killed_at = time.monotonic()
        victim.kill()
        if args.lag_ms:
            replica.proc.send_signal(signal.SIGCONT)
        failover_s = None
        states: dict[str, Any] = {}
        deadline = time.monotonic() + 180
        while len(states) < len(ids):
            runner.check()
            if failover_s is None and replica.role() == "master":
                failover_s = time.monotonic() - killed_at
                victim.start()  # restarted by its supervisor: rejoins as a replica
            if time.monotonic() > deadline:
                break
            for b in ids:
                if b not in states:
                    state = await load(r, keys, b)
                    if state is not None and state.terminal:
                        states[b] = state
            await asyncio.sleep(0.05)
        done_s = time.monotonic() - killed_at
    finally:
        await runner.close()
    accepted = sum(st.accepted for st in states.values())
    found = await trace(r, keys, states)
    missing = [b for b in ids if await load(r, keys, b) is None]
    out = {
        "ack": ack,
        "lag_bytes": lag,
        "failover_s": None if failover_s is None else round(failover_s, 2),
        "done_s_after_kill": round(done_s, 2),
        "finished": len(states),
        "comparisons": accepted,
        # acknowledged more often than the streams hold them: the failover took the others
        "results_lost": sum(
            max(0, n - found.callbacks[cid]) for cid, n in ACK.results.items() if cid
        ),
        "applies_lost": ACK.lost(ACK.applies),
        "extra_provider_calls": sum(n - 1 for n in calls.values() if n > 1),
        "duplicates": sum(st.duplicates for st in states.values()),
        "waves_resent": found.waves_resent,
        "orphans": sum(st.orphans for st in states.values()),
        "lost_batches": len(missing),
        "inexact": found.inexact,
        "ack_short": int(ack_short() - short0),
    }
    await r.aclose()
    cluster.wait_ok()
    return out


class Trace:
    """What the streams hold after the failover, per batch of the trial."""

    def __init__(self) -> None:
        self.callbacks: Counter[str] = Counter()  # callbacks per request (`request_key`)
        self.waves_resent = 0  # WaveSubmitted appended again (a re-sent commit)
        self.inexact = 0


async def trace(r: Any, keys: Keys, states: dict[str, Any]) -> Trace:
    """Callbacks per correlation id, waves appended twice, and the batches whose counters are
    not those of their callbacks (the first of each correlation id) or whose replay differs
    from the live projection (never expected)."""
    out = Trace()
    for b, state in states.items():
        part = keys.for_batch(b)
        first: dict[str, Any] = {}
        async for _, fields in read_stream(r, part.callbacks):
            event = codec.decode(fields)
            if isinstance(event, ComparisonCompleted | ComparisonFailed) and event.batch_id == b:
                first.setdefault(event.correlation_id, event)
                out.callbacks[request_key(b, event.correlation_id)] += 1
        waves: Counter[int] = Counter()
        async for _, fields in read_stream(r, part.batches):
            event = codec.decode(fields)
            if isinstance(event, WaveSubmitted) and event.batch_id == b:
                waves[event.wave] += 1
        out.waves_resent += sum(n - 1 for n in waves.values())
        known = {cid for cid in first if cid in state.pairs}
        replayed, _ = await replay(r, part, {b})
        if state.accepted != len(known) or await snapshot(r, keys, b) != encode_state(
            replayed[b], keys
        ):
            out.inexact += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--essays", type=int, default=12)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--acks", type=int, nargs="*", default=[0, 1])
    parser.add_argument(
        "--lag-ms",
        type=int,
        default=0,
        help="drop the victim's replication link this long before the kill "
        "(0: the replication lag as it comes)",
    )
    args = parser.parse_args()
    ACK.install()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisClusterServer(Path(tmp))
        cluster.start()
        try:
            for ack in args.acks:
                rows = []
                failed = 0
                for _ in range(args.trials):
                    try:
                        rows.append(asyncio.run(trial(cluster, ack, args)))
                    except Exception:  # reported, and the next trial goes on
                        traceback.print_exc()
                        print({"ack": ack, "trial_failed": True})
                        failed += 1
                    for node in cluster.nodes:  # a trial that failed left its victim down
                        if not node.alive():
                            node.start()
                    cluster.wait_ok()
                if not rows:
                    print({"ack": ack, "lag_ms": args.lag_ms, "trials": 0, "trials_failed": failed})
                    continue
                for row in rows:
                    print(row)
                total = {
                    k: sum(row[k] for row in rows)
                    for k in (
                        "comparisons",
                        "results_lost",
                        "applies_lost",
                        "extra_provider_calls",
                        "duplicates",
                        "waves_resent",
                        "orphans",
                    )
                }
                total.update(
                    {
                        k: sum(row[k] for row in rows)
                        for k in ("lost_batches", "inexact", "ack_short")
                    }
                )
                lags = [row["lag_bytes"] for row in rows]
                print(
                    {
                        "ack": ack,
                        "lag_ms": args.lag_ms,
                        "trials": len(rows),
                        "trials_failed": failed,
                        **total,
                        "lag_bytes_median": statistics.median(lags),
                        "lag_bytes_max": max(lags),
                        # How long the batches took to end after the kill (the failover
                        # itself included): the user's wait.
                        "done_s_after_kill_median": statistics.median(
                            row["done_s_after_kill"] for row in rows
                        ),
                        "done_s_after_kill_max": max(row["done_s_after_kill"] for row in rows),
                        # None when no trial saw its replica promoted (within 180 s).
                        "failover_s_max": max(
                            (row["failover_s"] for row in rows if row["failover_s"] is not None),
                            default=None,
                        ),
                    }
                )
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()

"""The batch projection in Redis: its encoding, loading, and the atomic writers (the keys are
in projections/keys.py)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from importlib import resources
from typing import Any

import msgspec
import redis.asyncio as aioredis

from events import codec
from events.clock import entry_iso
from events.streams import BATCHES, CALLBACKS, STREAMS
from events.text import as_str
from events.types import (
    BatchConfig,
    BatchEvent,
    BatchFailed,
    BatchFinalized,
    BatchRegistered,
    BatchScored,
    Callback,
    Essay,
)
from projections import keys as pkeys
from projections.batch import COUNTERS, BatchState, corr_value, cost_of
from streams.keys import Keys
from streams.lua import ENTRY_ID_ORDER

_json = msgspec.json.Encoder()
_essays = msgspec.json.Decoder(list[Essay])
_config = msgspec.json.Decoder(BatchConfig)
_scores = msgspec.json.Decoder(BatchScored)
_pairs = msgspec.json.Decoder(list[tuple[int, str, str]])

# callback.lua uses `before` (entry id order), shared with the other scripts.
_CALLBACK_BODY = resources.files("projections").joinpath("callback.lua").read_text()
# callback.lua's accessors of a batch's own fields (its hash, its range hash): for one
# callback, each a command.
_WRITE_THROUGH = """
local function known(key) return redis.call('EXISTS', key) == 1 end
local function get(key, field) return redis.call('HGET', key, field) end
local function set(key, field, value) redis.call('HSET', key, field, value) end
local function add(key, field, by) redis.call('HINCRBY', key, field, by) end
local function added(key, field, by) return redis.call('HINCRBY', key, field, by) end
"""
# For a page: each field read once and written once, at the page's end (`flush`), in the
# script's one atomic step, so no one sees the difference (speed, issue 11: 9 of a callback's
# 14 commands were these, on the one or two batches a page is mostly of). `add` is for small
# counts: summed in Lua's doubles, exact to 2^53.
_WRITE_BACK = """
local exist, fields, dirty, bases, sums = {}, {}, {}, {}, {}
local function of(t, key)
  local m = t[key]
  if m == nil then m = {}; t[key] = m end
  return m
end
local function known(key)
  if exist[key] == nil then exist[key] = redis.call('EXISTS', key) == 1 end
  return exist[key]
end
local function get(key, field)
  local m = of(fields, key)
  if m[field] == nil then m[field] = redis.call('HGET', key, field) end
  return m[field]
end
local function set(key, field, value)
  of(fields, key)[field] = value
  of(dirty, key)[field] = true
end
local function add(key, field, by)
  local m = of(sums, key)
  m[field] = (m[field] or 0) + by
end
local function added(key, field, by)
  add(key, field, by)
  local base = of(bases, key)
  if base[field] == nil then base[field] = tonumber(redis.call('HGET', key, field) or 0) end
  return base[field] + sums[key][field]
end
local function flush()
  for key, m in pairs(dirty) do
    for field in pairs(m) do redis.call('HSET', key, field, fields[key][field]) end
  end
  for key, m in pairs(sums) do
    for field, by in pairs(m) do
      if by ~= 0 then redis.call('HINCRBY', key, field, string.format('%d', by)) end
    end
  end
end
"""
CALLBACK_LUA = ENTRY_ID_ORDER + _WRITE_THROUGH + _CALLBACK_BODY
# KEYS and ARGV per callback of the script.
_CALLBACK_KEYS, _CALLBACK_ARGS = 10, 8
# The same script, once per callback of a page in one call (speed, issue 11: a script call
# each cost more than its work on both sides). Its body is callback.lua's, made a function of
# one callback's keys and arguments, so the two cannot drift apart. Returns the replies of
# callback.lua in one flat list, two values per callback.
CALLBACKS_LUA = (
    ENTRY_ID_ORDER
    + _WRITE_BACK
    + "local function apply_one(K, A)\n"
    + _CALLBACK_BODY.replace("KEYS[", "K[").replace("ARGV[", "A[")
    + f"""
end
local out = {{}}
for i = 0, #ARGV / {_CALLBACK_ARGS} - 1 do
  local K, A = {{}}, {{}}
  for j = 1, {_CALLBACK_KEYS} do K[j] = KEYS[{_CALLBACK_KEYS} * i + j] end
  for j = 1, {_CALLBACK_ARGS} do A[j] = ARGV[{_CALLBACK_ARGS} * i + j] end
  local reply = apply_one(K, A)
  out[2 * i + 1] = reply[1]
  out[2 * i + 2] = reply[2]
end
flush()
return out
"""
)

TEXT_FIELDS = (
    "batch_id",
    "status",
    "registered_at",
    "last_event_at",
    "finalize_reason",
    "failure_message",
    "completed_at",
)


# Append `BatchRegistered` and record, in the same atomic step, where the batch begins in every
# stream (its range hints): its own entry in the first stream, and the last entry of each other
# stream, which every later entry (the batch's included) follows, ids only growing in a stream.
# KEYS: 1 range hash, 2.. the streams (cj:batches first); ARGV: 1 data, 2.. their names.
REGISTER_LUA = """
local id = redis.call('XADD', KEYS[2], '*', 'type', 'BatchRegistered', 'data', ARGV[1])
redis.call('HSET', KEYS[1], 'first:' .. ARGV[2], id)
for i = 3, #KEYS do
  local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  local after = '0-0'
  if #last > 0 then after = last[1][1] end
  redis.call('HSET', KEYS[1], 'after:' .. ARGV[i], after)
end
return id
"""


def queue_registration(pipe: Any, keys: Keys, event: BatchRegistered) -> None:
    """Buffer the append of `BatchRegistered` with its range hints (inside MULTI)."""
    pipe.eval(
        REGISTER_LUA,
        1 + len(STREAMS),
        pkeys.batch_range(keys, event.batch_id),
        *(keys.stream(name) for name in STREAMS),
        codec.encode_json(event),
        *STREAMS,
    )


# Append a batch's last `cj:batches` event (BatchFinalized / BatchFailed) and record its id as
# where the batch ends in that stream (a range hint), in one atomic step.
# KEYS: 1 range hash, 2 cj:batches; ARGV: 1 type, 2 data, 3 the stream's name.
_LAST_LUA = """
local id = redis.call('XADD', KEYS[2], '*', 'type', ARGV[1], 'data', ARGV[2])
redis.call('HSET', KEYS[1], 'last:' .. ARGV[3], id)
return id
"""


def queue_batch_event(pipe: Any, keys: Keys, event: BatchEvent) -> None:
    """Buffer the append of a `cj:batches` event of a running batch (inside MULTI); the one
    that ends it also records its id in the batch's range hints."""
    if isinstance(event, BatchFinalized | BatchFailed):
        fields = codec.encode(event)
        pipe.eval(
            _LAST_LUA,
            2,
            pkeys.batch_range(keys, event.batch_id),
            keys.batches,
            fields["type"],
            fields["data"],
            BATCHES,
        )
    else:
        pipe.xadd(keys.batches, codec.encode(event))


def scalar_fields(state: BatchState) -> dict[str, str]:
    fields = {name: str(getattr(state, name)) for name in TEXT_FIELDS}
    fields.update({name: str(getattr(state, name)) for name in COUNTERS})
    fields["denominator"] = str(state.denominator)
    fields["total_budget"] = str(state.config.total_budget)
    return fields


def _stored(value: object) -> str:
    """A document or pair as the projection stores it: one encoding for the whole state and
    for a decision's partial write, so the two cannot differ from what replay compares."""
    return _json.encode(value).decode()


def encode_state(state: BatchState, keys: Keys) -> dict[str, dict[str, str]]:
    """Every key of the projection with its full contents: the canonical form replay compares."""
    b = state.batch_id
    docs = {
        "essays": _stored(state.essays),
        "config": _stored(state.config),
    }
    if state.scores is not None:
        docs["scores"] = _stored(state.scores)
    out = {
        pkeys.batch(keys, b): scalar_fields(state),
        pkeys.batch_docs(keys, b): docs,
        pkeys.batch_corr(keys, b): dict(state.corr),
        pkeys.batch_pairs(keys, b): {c: _stored(p) for c, p in state.pairs.items()},
        pkeys.batch_orphans(keys, b): {c: str(n) for c, n in state.orphan_ids.items()},
    }
    return {k: v for k, v in out.items() if v}


def decode_state(
    raw: dict[str, dict[bytes | str, bytes | str]], keys: Keys, batch_id: str
) -> BatchState | None:
    scal = {as_str(k): as_str(v) for k, v in raw.get(pkeys.batch(keys, batch_id), {}).items()}
    docs = {as_str(k): v for k, v in raw.get(pkeys.batch_docs(keys, batch_id), {}).items()}
    if not scal or "essays" not in docs:
        return None
    state = BatchState(
        batch_id=batch_id,
        essays=list(_doc(batch_id, "essays", docs["essays"], _essays)),
        config=_config.decode(docs["config"]),
        denominator=int(scal["denominator"]),
        registered_at=scal["registered_at"],
    )
    _set_scalars(state, scal)
    if "scores" in docs:
        state.scores = _doc(batch_id, "scores", docs["scores"], _scores)
    state.corr = _texts(raw.get(pkeys.batch_corr(keys, batch_id), {}))
    pairs = raw.get(pkeys.batch_pairs(keys, batch_id), {})
    # Speed (issue 11): one JSON array decoded for the batch's pairs, not one decode each.
    state.pairs = dict(zip(_names(pairs), _pairs.decode(_array(pairs.values())), strict=True))
    state.orphan_ids = {
        as_str(k): int(v) for k, v in raw.get(pkeys.batch_orphans(keys, batch_id), {}).items()
    }
    return state


def _set_scalars(state: BatchState, scal: dict[str, str]) -> None:
    for name in TEXT_FIELDS[1:]:
        setattr(state, name, scal.get(name, ""))
    for name in COUNTERS:
        setattr(state, name, int(scal.get(name, 0)))


def with_scalars(
    state: BatchState, batch_hash: dict[bytes | str, bytes | str] | None
) -> BatchState:
    """A copy of `state` whose scalars (status, counters, times) are those of `batch_hash` (the
    batch hash as read; None: those of `state`): its other parts as they were. The
    dictionaries are copied, so that applying events to the copy leaves `state` as it was."""
    copy = replace(state, corr=dict(state.corr), pairs=dict(state.pairs))
    if batch_hash is not None:
        _set_scalars(copy, {as_str(k): as_str(v) for k, v in batch_hash.items()})
    return copy


DOC_MEMO_ENTRIES = 32
"""Documents (a batch's essays, its scores) whose decoding `decode_state` keeps."""
_doc_memo: dict[tuple[str, str], tuple[bytes | str, Any]] = {}


def _doc(batch_id: str, name: str, stored: bytes | str, decoder: msgspec.json.Decoder[Any]) -> Any:
    """The batch's document `name` decoded, once as long as it is stored the same (the value
    is shared: immutable). Speed (issue 11): `advance` decodes its batch at every step; the
    essays (their texts: ≈ 85 kB at 100 essays) never change, and the scores only with a
    decision. Comparing the bytes costs ≈ 1/20 of decoding them (the essays were ≈ 12 % of a
    decode at 1,000 pairs)."""
    known = _doc_memo.get((batch_id, name))
    if known is None or known[0] != stored:
        if len(_doc_memo) >= DOC_MEMO_ENTRIES:
            _doc_memo.clear()
        known = _doc_memo[batch_id, name] = (stored, decoder.decode(stored))
    return known[1]


def _names(mapping: dict[bytes | str, bytes | str]) -> list[str]:
    """The keys of `mapping` as text, in one pass in C for the usual reply (bytes, UTF-8)."""
    try:
        return list(map(bytes.decode, mapping))  # type: ignore[arg-type]
    except (TypeError, UnicodeDecodeError):
        return [as_str(k) for k in mapping]


def _array(values: Collection[bytes | str]) -> bytes:
    """JSON values (as stored) joined into one JSON array; bytes as Redis returns them are
    joined as they are."""
    try:
        return b"[" + b",".join(values) + b"]"  # type: ignore[arg-type]
    except TypeError:  # some given as str
        return b"[" + b",".join(v.encode() if isinstance(v, str) else v for v in values) + b"]"


def _texts(mapping: dict[bytes | str, bytes | str]) -> dict[str, str]:
    """`mapping` as text (`as_str`), the keys and values of a large hash in one pass."""
    try:  # the usual reply: bytes throughout, and valid UTF-8 (written by this code)
        return {k.decode(): v.decode() for k, v in mapping.items()}  # type: ignore[union-attr]
    except (AttributeError, UnicodeDecodeError):
        return {as_str(k): as_str(v) for k, v in mapping.items()}


async def read_raw(
    r: Any, keys: Keys, batch_id: str, *, atomic: bool = False
) -> dict[str, dict[bytes | str, bytes | str]]:
    """The batch's projection keys as stored; `atomic`: in one MULTI/EXEC, so that no write
    (a callback's, a decision's) falls between the reads of two keys."""
    names = pkeys.batch_keys(keys, batch_id)
    pipe = r.pipeline(transaction=atomic)
    for name in names:
        pipe.hgetall(name)
    values = await pipe.execute()
    return {name: value for name, value in zip(names, values, strict=True) if value}


async def load_essay_store(
    r: Any, keys: Keys, batch_id: str
) -> tuple[list[Essay], list[str]] | None:
    """The per-batch essay store LPS resolves requests' essay references from: the batch's
    essays as registered and its grade scale (what its content key hashes), in one read; None
    when the batch has no live projection."""
    essays, config = await r.hmget(pkeys.batch_docs(keys, batch_id), "essays", "config")
    if essays is None or config is None:
        return None
    return _essays.decode(essays), list(_config.decode(config).grade_scale)


async def load_state(r: Any, keys: Keys, batch_id: str) -> BatchState | None:
    return decode_state(await read_raw(r, keys, batch_id), keys, batch_id)


def queue_state_write(
    pipe: Any, keys: Keys, state: BatchState, *, full: bool, corr_ids: list[str] | None = None
) -> None:
    """Queue writes bringing Redis to `state`: all of it (`full`) or the scalars, the scores
    and the given correlation ids (what one CJ-written event can change: the essays and the
    config are the registration's, written with it)."""
    b = state.batch_id
    if full:
        encoded = encode_state(state, keys)
        keys = keys.for_batch(b)
        for name in pkeys.batch_keys(keys, b):
            pipe.delete(name)
        for name, mapping in encoded.items():
            pipe.hset(name, mapping=mapping)
        pipe.hset(pkeys.batch_index(keys), b, state.registered_at)
        return
    # Speed (issue 11): only those parts encoded, not the whole state (every pair of the
    # batch) at every decision, and the essays' texts not written again.
    keys = keys.for_batch(b)
    pipe.hset(pkeys.batch(keys, b), mapping=scalar_fields(state))
    if state.scores is not None:
        pipe.hset(pkeys.batch_docs(keys, b), "scores", _stored(state.scores))
    if corr_ids:
        pipe.hset(pkeys.batch_corr(keys, b), mapping={c: state.corr[c] for c in corr_ids})
        pairs = {c: _stored(state.pairs[c]) for c in corr_ids if c in state.pairs}
        if pairs:
            pipe.hset(pkeys.batch_pairs(keys, b), mapping=pairs)


CACHED_KEY_SETS = 1024
"""Batches whose callback keys a `CallbackApplier` keeps (then it starts afresh)."""


class CallbackApplier:
    """Runs callback.lua: apply + XACK in one atomic step."""

    def __init__(self, r: aioredis.Redis, keys: Keys, group: str) -> None:
        self._script = r.register_script(CALLBACK_LUA)
        self._page = r.register_script(CALLBACKS_LUA)
        self._keys = keys
        self._group = group
        # The keys of each batch's callbacks, made once: every callback of a page (mostly of
        # a few batches) named the same ten keys, built again at ≈ 6 µs (issue 11).
        self._batch_keys: dict[str, list[str]] = {}

    async def apply(self, callback: Callback, entry_id: str, *, parked: bool = False) -> Any:
        """Run the script now (a cluster client: EVALSHA on the node of the batch's slot,
        loading the script there first when that node does not know it)."""
        return await self.queue(None, callback, entry_id, parked=parked)

    async def queue(
        self, pipe: Any, callback: Callback, entry_id: str, *, parked: bool = False
    ) -> Any:
        """Buffer the script call in `pipe`; a non-transactional pipeline is enough, the
        script is atomic on its own. Without `pipe`, run it now and return its result.
        `parked`: apply a parked dead letter (a redrive)."""
        keys, args = self._call(callback, entry_id, parked)
        return await self._script(keys=keys, args=args, client=pipe)

    async def apply_page(self, callbacks: list[tuple[Callback, str]]) -> list[list[Any]]:
        """(callback, entry id) of a page applied in one script call, in order, each as
        `apply` would; the script's reply of each. Its keys must be in one slot on a cluster:
        those of a partition's callbacks are (`_keys_of`)."""
        keys: list[str] = []
        args: list[str] = []
        for callback, entry_id in callbacks:
            k, a = self._call(callback, entry_id, False)
            keys += k
            args += a
        flat = await self._page(keys=keys, args=args) if callbacks else []
        return [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]

    def _call(self, callback: Callback, entry_id: str, parked: bool) -> tuple[list[str], list[str]]:
        """callback.lua's keys and arguments for one callback."""
        b = callback.batch_id
        keys = self._batch_keys.get(b)
        if keys is None:
            if len(self._batch_keys) >= CACHED_KEY_SETS:
                self._batch_keys.clear()
            keys = self._batch_keys[b] = self._keys_of(b)
        args = [
            self._group,
            entry_id,
            callback.correlation_id,
            corr_value(callback, entry_id),
            entry_iso(entry_id),
            "parked" if parked else "",
            str(cost_of(callback)),
            # Encoded as the pairs hash's values are (`_stored`): callback.lua compares bytes.
            _stored((callback.essay_a_id, callback.essay_b_id)),
        ]
        return keys, args

    def _keys_of(self, b: str) -> list[str]:
        """callback.lua's keys for a callback of batch `b`."""
        k = self._keys
        if k.partition is None or k.partition_of(b) == k.partition:
            batch_keys = [pkeys.batch(k, b), pkeys.batch_corr(k, b), pkeys.batch_orphans(k, b)]
            range_key, pairs_key = pkeys.batch_range(k, b), pkeys.batch_pairs(k, b)
        else:  # a batch of another partition is unknown here (and a script stays in one slot)
            batch_keys = [k.key(f"proj:batch:{b}{part}") for part in ("", ":corr", ":orphans")]
            range_key = k.key(f"proj:batch:{b}:range")
            pairs_key = k.key(f"proj:batch:{b}:pairs")
        return [
            *batch_keys,
            k.callbacks,
            pkeys.stats(k),
            k.group_handled(CALLBACKS, self._group),
            k.dlq_parked(CALLBACKS),
            k.dlq(CALLBACKS),
            range_key,
            pairs_key,
        ]


async def list_batches(r: Any, keys: Keys) -> list[str]:
    """Batch ids, oldest registration first: of the partition `keys` names, or of every
    partition for a namespace-wide `Keys`."""
    index: dict[str, str] = {}
    for part in keys.all_partitions():
        raw = await r.hgetall(pkeys.batch_index(part))
        index.update({as_str(k): as_str(v) for k, v in raw.items()})
    return sorted(index, key=lambda b: (index[b], b))


async def batch_fields(r: Any, keys: Keys, *fields: str) -> list[tuple[str, list[Any]]]:
    """`fields` of every indexed batch's scalar hash (raw values, None where missing), oldest
    registration first: one pipelined round trip, no essays or scores loaded."""
    batch_ids = await list_batches(r, keys)
    if not batch_ids:
        return []
    async with r.pipeline(transaction=False) as pipe:
        for batch_id in batch_ids:
            pipe.hmget(pkeys.batch(keys, batch_id), *fields)
        rows = await pipe.execute()
    return list(zip(batch_ids, rows, strict=True))

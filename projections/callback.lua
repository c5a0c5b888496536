-- Apply one callback to its batch projection and acknowledge its entry, atomically.
-- A transcription of projections/batch.py:apply_callback; tests hold the two equal.
-- `before(a, b)`, the order of entry ids, is prepended from streams/lua.py (ENTRY_ID_ORDER).
-- So are the accessors of the batch's own fields (projections/store.py): `known`, `get`, `set`,
-- `add` (a small count) and `added` (the same, giving the new value); one callback's script
-- writes through, a page's script keeps them until the page's end.
-- KEYS: 1 batch hash, 2 corr hash, 3 orphans hash, 4 callbacks stream, 5 stats hash,
--       6 the group's handled set, 7 the parked dead letters (hash), 8 the callbacks' DLQ,
--       9 range hash (the batch's last applied callback: replay of one batch reads up to it),
--       10 pairs hash (correlation id -> [wave, essay_a, essay_b], JSON)
-- ARGV: 1 group, 2 entry id, 3 correlation id, 4 corr value ("c <entry> <winner>" / "f <entry> <type>"),
--       5 the entry id's time (ISO; the server's clock, not the producer's occurred_at),
--       6 "parked" when a redrive applies a parked dead letter, else "",
--       7 cost in nano-dollars (summed over every callback but orphans),
--       8 the callback's [essay_a_id, essay_b_id], JSON encoded as the pairs hash's values
-- Returns {outcome, in_flight}. "replayed" when the entry was no longer pending in the group:
-- another consumer already applied it (idempotence by entry id). An orphan returns in_flight
-- -2 for an unknown batch, -3 for a known id naming other essays than its pair, else -1 (the
-- caller needs no second look to tell them apart).
if ARGV[6] == 'parked' then
  -- A redrive: the entry was acknowledged when it was parked; taking it out is the gate.
  local letter = redis.call('HGET', KEYS[7], ARGV[2])
  if not letter then return {'replayed', -1} end
  redis.call('HDEL', KEYS[7], ARGV[2])
  redis.call('XDEL', KEYS[8], letter)
elseif redis.call('XACK', KEYS[4], ARGV[1], ARGV[2]) == 0 then
  return {'replayed', -1}
elseif redis.call('ZADD', KEYS[6], 'NX', tonumber(string.match(ARGV[2], '^(%d+)')), ARGV[2]) == 0 then
  -- Applied before the group was destroyed and recreated below it (streams/reader.py).
  return {'replayed', -1}
end
if not known(KEYS[1]) then
  redis.call('HINCRBY', KEYS[5], 'orphans_unknown_batch', 1)
  return {'orphan', -2}
end
local last_applied = get(KEYS[9], 'last:cj:callbacks')
if (not last_applied) or before(last_applied, ARGV[2]) then
  set(KEYS[9], 'last:cj:callbacks', ARGV[2])
end
add(KEYS[1], 'callbacks_received', 1)
local last = get(KEYS[1], 'last_event_at')
if (not last) or ARGV[5] > last then
  set(KEYS[1], 'last_event_at', ARGV[5])
end
local cid = ARGV[3]
local new = ARGV[4]
local kind = string.sub(new, 1, 1)
local counter = (kind == 'c') and 'completed' or 'failed'
local current = redis.call('HGET', KEYS[2], cid)
-- A known id answers only the pair it was asked for, in its order (apply_callback's
-- answers_pair): the recorded [wave, a, b] past the wave's comma against ARGV 8's [a, b], one
-- encoding (JSON, projections/store.py) on both sides. No pair recorded: the id decides.
local other = false
if current then
  local pair = redis.call('HGET', KEYS[10], cid)
  other = pair and ('[' .. string.sub(pair, string.find(pair, ',', 1, true) + 1)) ~= ARGV[8]
end
if (not current) or other then
  add(KEYS[1], 'orphans', 1)
  redis.call('HINCRBY', KEYS[3], cid, 1)
  return {'orphan', other and -3 or -1}
end
redis.call('HINCRBY', KEYS[1], 'cost_nusd', ARGV[7])  -- any int64: not summed in Lua's doubles
if current == 'abandoned' then
  add(KEYS[1], 'late_callbacks', 1)
  return {'late', -1}
end
if current == 'pending' then
  redis.call('HSET', KEYS[2], cid, new)
  add(KEYS[1], counter, 1)
  local left = added(KEYS[1], 'in_flight', -1)
  return {'accepted', left}
end
local old_kind, old_entry = string.match(current, '^(%a) (%S+)')
if before(ARGV[2], old_entry) then
  redis.call('HSET', KEYS[2], cid, new)
  if old_kind ~= kind then
    local old_counter = (old_kind == 'c') and 'completed' or 'failed'
    add(KEYS[1], counter, 1)
    add(KEYS[1], old_counter, -1)
  end
end
add(KEYS[1], 'duplicates', 1)
return {'duplicate', -1}

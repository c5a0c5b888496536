"""Contract tests: the invariants of docs/design.md written once, run on every engine.

engines.py        Engine (abstract `create_client`), FakeredisEngine, RedisServerEngine, ENGINES
conftest.py       the `engine` fixture (one run per engine), `r`, `keys` (a namespace per test)
recording.py      what a client sends, cut into atomic units (MULTI/EXEC, scripts, commands)
test_projection   callback.lua: accepted once, duplicates / orphans / late counted, == replay
test_dead_letters undecodable entries to the DLQ with their XACK; the consumer goes on
test_pending      reclaim, expiry at max deliveries (both sides), release, prune, gauge
test_commit       callback + request XACK + done marker in one MULTI; the CJ apply's own XACK
test_decision     exactly one BatchFinalized under racing consumers; a decision with its events
test_cooldown     the shared provider cooldown
test_slots        every atomic unit's keys in one cluster slot (on the real engine)
"""

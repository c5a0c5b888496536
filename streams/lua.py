"""Lua shared by the scripts that run in Redis (prepended to each, Python-side).

`ENTRY_ID_ORDER`: `before(a, b)`, true when stream entry id `a` (`<ms>-<seq>`) comes before
`b`, comparing numbers, not strings ("9-0" before "10-0").
"""

from __future__ import annotations

ENTRY_ID_ORDER = """
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  if am ~= bm then return am < bm end
  return as < bs
end
"""

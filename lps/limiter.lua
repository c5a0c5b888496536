-- The shared provider limiter (lps/limiter.py): GCRA in two dimensions, requests and tokens
-- per minute, with its rate adjusted AIMD, for one provider + model, on the server's clock.
-- KEYS[1]: the limiter hash. ARGV: 1 op ("take" | "ok" | "limited"), 2 configured requests
-- per minute (0 unknown), 3 configured tokens per minute (0 unknown), 4 target (share of the
-- limit paced at), then the op's own arguments (below).
-- Fields: cfg_r/cfg_t (the configuration the state was built from: another one resets it),
-- lim_r/lim_t (the provider's limit per minute, configured or told by its headers; 0 unknown),
-- rate_r/rate_t (the rate paced at now), tat_r/tat_t (theoretical arrival times, ms),
-- inc/dec (ms of the last increase / decrease).
-- Numbers go back as strings: Redis truncates a Lua number to an integer.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local op = ARGV[1]
local cfg_r, cfg_t, target = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local f = redis.call('HMGET', KEYS[1], 'cfg_r', 'cfg_t', 'lim_r', 'lim_t', 'rate_r', 'rate_t',
  'tat_r', 'tat_t', 'inc', 'dec')
local lim_r, lim_t = tonumber(f[3]) or 0, tonumber(f[4]) or 0
local rate_r, rate_t = tonumber(f[5]) or 0, tonumber(f[6]) or 0
local tat_r, tat_t = tonumber(f[7]) or 0, tonumber(f[8]) or 0
local inc, dec = tonumber(f[9]) or 0, tonumber(f[10]) or 0
if tonumber(f[1]) ~= cfg_r then
  lim_r, rate_r = cfg_r, cfg_r * target
end
if tonumber(f[2]) ~= cfg_t then
  lim_t, rate_t = cfg_t, cfg_t * target
end

-- A limit told by the provider's headers is the truth: pace at `target` of it.
local function learn(told_r, told_t)
  told_r, told_t = tonumber(told_r), tonumber(told_t)
  if told_r and told_r > 0 and told_r ~= lim_r then
    if rate_r == 0 or rate_r > told_r * target then rate_r = told_r * target end
    lim_r = told_r
  end
  if told_t and told_t > 0 and told_t ~= lim_t then
    if rate_t == 0 or rate_t > told_t * target then rate_t = told_t * target end
    lim_t = told_t
  end
end

local out
if op == 'take' then
  -- ARGV 5 takers, 6 tokens each (estimate), 7 horizon ms, 8 burst (calls at once).
  -- Grants the takers, in order, a time to call, as long as that time is within the
  -- horizon: {granted, retry ms (when not all were), rate_r, rate_t, lim_r, lim_t, waits...}.
  if rate_r <= 0 and rate_t <= 0 then
    out = {'-1', '0', '0', '0', tostring(lim_r), tostring(lim_t)}
  else
    local k, cost = tonumber(ARGV[5]), tonumber(ARGV[6])
    local horizon, burst = tonumber(ARGV[7]), math.max(1, tonumber(ARGV[8]))
    local step_r = rate_r > 0 and 60000 / rate_r or 0
    local step_t = rate_t > 0 and cost * 60000 / rate_t or 0
    local waits = {}
    local retry = 0
    for i = 1, k do
      local at = now
      if step_r > 0 then at = math.max(at, tat_r - (burst - 1) * step_r) end
      if step_t > 0 then at = math.max(at, tat_t - (burst - 1) * step_t) end
      if at - now > horizon then
        retry = at - now - horizon
        break
      end
      if step_r > 0 then tat_r = math.max(tat_r, at) + step_r end
      if step_t > 0 then tat_t = math.max(tat_t, at) + step_t end
      waits[#waits + 1] = tostring(at - now)
    end
    out = {tostring(#waits), tostring(retry), tostring(rate_r), tostring(rate_t),
      tostring(lim_r), tostring(lim_t)}
    for _, w in ipairs(waits) do out[#out + 1] = w end
  end
elseif op == 'ok' then
  -- A successful reply. ARGV 5/6 the limits its headers told ('' if none), 7/8 what they
  -- said was left ('' if none), 9 additive increase (share of the limit per second).
  learn(ARGV[5], ARGV[6])
  local step = tonumber(ARGV[9]) * math.min(1, math.max(0, now - inc) / 1000)
  -- Nothing left in a bucket: hold the rate where it is.
  if tonumber(ARGV[7]) ~= 0 and lim_r > 0 then
    rate_r = math.min(lim_r * target, rate_r + step * lim_r)
  end
  if tonumber(ARGV[8]) ~= 0 and lim_t > 0 then
    rate_t = math.min(lim_t * target, rate_t + step * lim_t)
  end
  inc = now
  out = {tostring(rate_r), tostring(rate_t), tostring(lim_r), tostring(lim_t)}
else
  -- A 429. ARGV 5/6 the limits its headers told, 7 retry-after ms, 8 multiplicative
  -- decrease, 9 floor (share of the limit), 10 ms between two decreases (the 429s of one
  -- overshoot arrive together: they are one signal).
  learn(ARGV[5], ARGV[6])
  if now - dec >= tonumber(ARGV[10]) then
    local beta, floor = tonumber(ARGV[8]), tonumber(ARGV[9])
    if rate_r > 0 then rate_r = math.max(floor * lim_r, rate_r * beta) end
    if rate_t > 0 then rate_t = math.max(floor * lim_t, rate_t * beta) end
    dec = now
  end
  -- Nobody calls before the server said to.
  local resume = now + tonumber(ARGV[7])
  tat_r, tat_t = math.max(tat_r, resume), math.max(tat_t, resume)
  inc = now
  out = {tostring(rate_r), tostring(rate_t), tostring(lim_r), tostring(lim_t)}
end
-- Nothing known, nothing paced: no key (a deployment without limits leaves none behind).
if rate_r > 0 or rate_t > 0 or lim_r > 0 or lim_t > 0 then
  redis.call('HSET', KEYS[1], 'cfg_r', ARGV[2], 'cfg_t', ARGV[3], 'lim_r', tostring(lim_r),
    'lim_t', tostring(lim_t), 'rate_r', tostring(rate_r), 'rate_t', tostring(rate_t),
    'tat_r', tostring(tat_r), 'tat_t', tostring(tat_t), 'inc', tostring(inc), 'dec', tostring(dec))
  redis.call('PEXPIRE', KEYS[1], 3600000)
end
return out

-- Admission: one atomic decision across the org-scoped layers (org, env, key), see buckets.py.
-- KEYS[1]      reservation hash of this request id
-- KEYS[2..]    per layer, 5 keys: tokens/min bucket, requests/min bucket, tokens/day bucket,
--              concurrency lease set, tokens-charged counter
-- ARGV         now_ms, request_id, ttl_ms, tokens, then per layer 5 values:
--              tpm, rpm, tpd, concurrency (0 = no limit), shadow (1 = decide and report, never refuse)
-- Returns      {status, failed_slot, retry_after_ms, shadow_slot, level_1 .. level_3L}
--              status 1 admitted, 0 refused, 2 already reserved (a repeated call admits, charges nothing)
--              slot = layer*4 + kind (kind 1 tpm, 2 rpm, 3 tpd, 4 concurrency), 0 = none
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local ttl = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local layers = (#KEYS - 1) / 5
local windows = {60000, 60000, 86400000}

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2, 0, 0, 0}
end

local levels, costs, caps = {}, {}, {}
local failed, retry, shadow_hit = 0, 0, 0
for l = 0, layers - 1 do
  local shadow = ARGV[4 + l * 5 + 5] == '1'
  for b = 1, 3 do
    local cap = tonumber(ARGV[4 + l * 5 + b])
    local i = l * 3 + b
    caps[i] = cap
    levels[i] = 0
    if cap > 0 then
      local st = redis.call('HMGET', KEYS[1 + l * 5 + b], 'v', 't')
      local level = cap
      if st[1] then
        local elapsed = now - tonumber(st[2])
        if elapsed < 0 then elapsed = 0 end
        level = tonumber(st[1]) + elapsed * cap / windows[b]
        if level > cap then level = cap end
      end
      local cost = tokens
      if b == 2 then cost = 1 end
      if cost > cap then cost = cap end
      levels[i] = level
      costs[i] = cost
      if level < cost then
        if shadow then
          if shadow_hit == 0 then shadow_hit = l * 4 + b end
        else
          local wait = math.ceil((cost - level) * windows[b] / cap)
          if wait > retry then retry = wait end
          if failed == 0 then failed = l * 4 + b end
        end
      end
    end
  end
  local limit = tonumber(ARGV[4 + l * 5 + 4])
  if limit > 0 then
    local lease = KEYS[1 + l * 5 + 4]
    redis.call('ZREMRANGEBYSCORE', lease, '-inf', now)
    if redis.call('ZCARD', lease) >= limit then
      if shadow then
        if shadow_hit == 0 then shadow_hit = l * 4 + 4 end
      else
        if retry < 1000 then retry = 1000 end
        if failed == 0 then failed = l * 4 + 4 end
      end
    end
  end
end

local out = {0, failed, retry, shadow_hit}
if failed == 0 then
  out[1] = 1
  local reservation = {'n', tokens}
  for l = 0, layers - 1 do
    for b = 1, 3 do
      local i = l * 3 + b
      if caps[i] > 0 then
        local level = levels[i] - costs[i]
        levels[i] = level
        local key = KEYS[1 + l * 5 + b]
        redis.call('HSET', key, 'v', string.format('%.17g', level), 't', now)
        redis.call('PEXPIRE', key, math.ceil((caps[i] - level) * windows[b] / caps[i]) + 1000)
        table.insert(reservation, 'c' .. i)
        table.insert(reservation, caps[i])
        table.insert(reservation, 'r' .. i)
        table.insert(reservation, costs[i])
      end
    end
    if tonumber(ARGV[4 + l * 5 + 4]) > 0 then
      local lease = KEYS[1 + l * 5 + 4]
      redis.call('ZADD', lease, now + ttl, rid)
      redis.call('PEXPIRE', lease, ttl)
      table.insert(reservation, 'l' .. l)
      table.insert(reservation, 1)
    end
    redis.call('INCRBY', KEYS[1 + l * 5 + 5], tokens)
  end
  redis.call('HSET', KEYS[1], unpack(reservation))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
for i = 1, layers * 3 do
  out[4 + i] = math.floor(levels[i])
end
return out

-- Admission: one atomic decision across the layers of one scope (see buckets.py for the maths).
-- KEYS[1]    reservation of this request id
-- KEYS[2..]  per layer 3 keys: bucket hash (fields s/st tokens-per-second, m/mt tokens-per-minute,
--            r/rt requests-per-minute, d/dt tokens-per-day: level and last update), concurrency
--            lease set, tokens-charged counter
-- ARGV       now_ms, request_id, ttl_ms, tokens, then per layer 6 values:
--            tps, tpm, rpm, tpd, concurrency (0 = no limit), shadow (1 = decide and report, never refuse)
-- Returns    {status, failed_slot, retry_after_ms, shadow_slot, level_1 .. level_4L}
--            status 1 admitted, 0 refused, 2 already reserved (a repeated call admits, charges nothing)
--            slot = layer*5 + kind (kind 1 tps, 2 tpm, 3 rpm, 4 tpd, 5 concurrency), 0 = none
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local ttl = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local layers = (#KEYS - 1) / 3
local windows = {1000, 60000, 60000, 86400000}
local fields = {'s', 'm', 'r', 'd'}
local times = {'st', 'mt', 'rt', 'dt'}

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2, 0, 0, 0}
end

local levels, costs, caps = {}, {}, {}
local failed, retry, shadow_hit = 0, 0, 0
for l = 0, layers - 1 do
  local base = 4 + l * 6
  local shadow = ARGV[base + 6] == '1'
  local st = nil
  for b = 1, 4 do
    local cap = tonumber(ARGV[base + b])
    local i = l * 4 + b
    caps[i] = cap
    levels[i] = 0
    if cap > 0 then
      if st == nil then
        st = redis.call('HMGET', KEYS[2 + l * 3], 's', 'st', 'm', 'mt', 'r', 'rt', 'd', 'dt')
      end
      local level = cap
      if st[2 * b - 1] then
        local elapsed = now - tonumber(st[2 * b])
        if elapsed < 0 then elapsed = 0 end
        level = tonumber(st[2 * b - 1]) + elapsed * cap / windows[b]
        if level > cap then level = cap end
      end
      local cost = tokens
      if b == 3 then cost = 1 end
      if cost > cap then cost = cap end
      levels[i] = level
      costs[i] = cost
      if level < cost then
        if shadow then
          if shadow_hit == 0 then shadow_hit = l * 5 + b end
        else
          local wait = math.ceil((cost - level) * windows[b] / cap)
          if wait > retry then retry = wait end
          if failed == 0 then failed = l * 5 + b end
        end
      end
    end
  end
  local limit = tonumber(ARGV[base + 5])
  if limit > 0 then
    local lease = KEYS[3 + l * 3]
    redis.call('ZREMRANGEBYSCORE', lease, '-inf', now)
    if redis.call('ZCARD', lease) >= limit then
      if shadow then
        if shadow_hit == 0 then shadow_hit = l * 5 + 5 end
      else
        if retry < 1000 then retry = 1000 end
        if failed == 0 then failed = l * 5 + 5 end
      end
    end
  end
end

local out = {0, failed, retry, shadow_hit}
if failed == 0 then
  out[1] = 1
  local held, leases = {}, {}
  for l = 0, layers - 1 do
    local update, expire = {}, 0
    for b = 1, 4 do
      local i = l * 4 + b
      if caps[i] > 0 then
        local level = levels[i] - costs[i]
        levels[i] = level
        table.insert(update, fields[b])
        table.insert(update, string.format('%.17g', level))
        table.insert(update, times[b])
        table.insert(update, now)
        local full = math.ceil((caps[i] - level) * windows[b] / caps[i])
        if full > expire then expire = full end
        table.insert(held, i .. ':' .. caps[i] .. ':' .. costs[i])
      end
    end
    if #update > 0 then
      redis.call('HSET', KEYS[2 + l * 3], unpack(update))
      redis.call('PEXPIRE', KEYS[2 + l * 3], expire + 1000)
    end
    if tonumber(ARGV[4 + l * 6 + 5]) > 0 then
      local lease = KEYS[3 + l * 3]
      redis.call('ZADD', lease, now + ttl, rid)
      redis.call('PEXPIRE', lease, ttl)
      table.insert(leases, l)
    end
    redis.call('INCRBY', KEYS[4 + l * 3], tokens)
  end
  -- "tokens|bucket:capacity:cost,...|lease layers": all settlement needs, in one string.
  redis.call('SET', KEYS[1], tokens .. '|' .. table.concat(held, ',') .. '|' .. table.concat(leases, ','),
             'PX', ttl)
end
for i = 1, layers * 4 do
  out[4 + i] = math.floor(levels[i])
end
return out

-- Settlement of one request id, exactly once: the reservation hash is deleted by the first call; a
-- later call (a replayed access-log entry) or one after the reservation expired changes nothing.
-- KEYS  the same layout as reserve.lua
-- ARGV  now_ms, request_id, actual_tokens (-1: charge what was reserved),
--       rollback ('1': the request was refused by a later scope; its request slots come back too)
-- Returns {settled (1/0), reserved_tokens}
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local actual = tonumber(ARGV[3])
local rollback = ARGV[4] == '1'
local layers = (#KEYS - 1) / 5
local windows = {60000, 60000, 86400000}

local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then
  return {0, 0}
end
redis.call('DEL', KEYS[1])
local h = {}
for i = 1, #flat, 2 do
  h[flat[i]] = flat[i + 1]
end
local reserved = tonumber(h['n'])
if actual < 0 then
  actual = reserved  -- no usage known: charge what was reserved
end
for l = 0, layers - 1 do
  for b = 1, 3 do
    local i = l * 3 + b
    if h['c' .. i] and (b ~= 2 or rollback) then
      local cap = tonumber(h['c' .. i])
      local delta = tonumber(h['r' .. i]) - actual
      if b == 2 then delta = 1 end
      local key = KEYS[1 + l * 5 + b]
      local st = redis.call('HMGET', key, 'v', 't')
      local level = cap
      if st[1] then
        local elapsed = now - tonumber(st[2])
        if elapsed < 0 then elapsed = 0 end
        level = tonumber(st[1]) + elapsed * cap / windows[b]
        if level > cap then level = cap end
      end
      level = level + delta
      if level > cap then level = cap end
      redis.call('HSET', key, 'v', string.format('%.17g', level), 't', now)
      redis.call('PEXPIRE', key, math.ceil((cap - level) * windows[b] / cap) + 1000)
    end
  end
  if h['l' .. l] then
    redis.call('ZREM', KEYS[1 + l * 5 + 4], rid)
  end
  redis.call('INCRBY', KEYS[1 + l * 5 + 5], actual - reserved)
end
return {1, reserved}

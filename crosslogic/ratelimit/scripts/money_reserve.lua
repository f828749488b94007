-- Bill cap, phase one: reserve a request's maximum cost against its org's month (crosslogic/ratelimit/money.py).
-- All keys carry the org's hash tag, so this is one atomic decision across every authz replica.
-- KEYS[1]  the month's hash: c = what the org owes (the ledger's org_monthly_spend.owed_microdollars, only
--          ever raised), h = the sum of the reservations held
-- KEYS[2]  hash request id -> reserved micro-dollars;  KEYS[3] zset request id -> expiry (ms)
-- KEYS[4]  the request's limiter reservation key (settle.lua leaves 'settled' there once the request ended)
-- ARGV     now_ms, request_id, amount, cap, owed floor (-1: unknown; the ledger's value as authz last read it),
--          reservation ttl_ms, keys' expiry (unix ms)
-- Returns  {status, owed, held}: 1 reserved, 0 refused (owed + held >= cap), 2 already reserved,
--          3 the request already ended (nothing to hold), 4 owed unknown (the caller seeds it from Postgres)
local now, rid, amount_s, cap = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local floor_s = ARGV[5]

if redis.call('GET', KEYS[4]) == 'settled' then
  return {3, 0, 0}
end
if redis.call('HEXISTS', KEYS[2], rid) == 1 then
  return {2, 0, 0}
end
local owed = redis.call('HGET', KEYS[1], 'c')
if owed then owed = tonumber(owed) end
local floor = tonumber(floor_s)
if floor >= 0 and (not owed or owed < floor) then
  owed = floor
  redis.call('HSET', KEYS[1], 'c', floor_s)
  redis.call('PEXPIREAT', KEYS[1], ARGV[7])
end
if not owed then
  return {4, 0, 0}
end

-- Reservations whose request never reached the ledger (its log entry was lost) expire.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 64)
if #expired > 0 then
  local freed = 0
  for _, old in ipairs(expired) do
    local held = redis.call('HGET', KEYS[2], old)
    if held then freed = freed + tonumber(held) end
  end
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[3], unpack(expired))
  if freed > 0 then redis.call('HINCRBY', KEYS[1], 'h', -freed) end
end

local held = tonumber(redis.call('HGET', KEYS[1], 'h') or '0')
if owed + held >= cap then
  return {0, owed, held}
end
redis.call('HSET', KEYS[2], rid, amount_s)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), rid)
held = redis.call('HINCRBY', KEYS[1], 'h', amount_s)
for i = 1, 3 do
  redis.call('PEXPIREAT', KEYS[i], ARGV[7])
end
return {1, owed, held}

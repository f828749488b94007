-- Bill cap, phase two: the ledger committed these requests' rows; what the org owes now includes them.
-- In one step: raise the owed counter to the ledger's value (read after the commit) and drop the requests'
-- reservations. Exactly once per request id: a released id is gone, so a replay releases nothing; the owed
-- counter is an absolute value (only ever raised), so replays and out-of-order writers cannot add twice.
-- KEYS   the month's hash, the reservations hash, the expiry zset (as money_reserve.lua)
-- ARGV   owed (-1: unknown), keys' expiry (unix ms), request ids...
-- Returns the number of reservations released.
local owed_s = ARGV[1]
if tonumber(owed_s) >= 0 then
  local owed = redis.call('HGET', KEYS[1], 'c')
  if not owed or tonumber(owed) < tonumber(owed_s) then
    redis.call('HSET', KEYS[1], 'c', owed_s)
    redis.call('PEXPIREAT', KEYS[1], ARGV[2])
  end
end
local freed, released = 0, 0
for i = 3, #ARGV do
  local held = redis.call('HGET', KEYS[2], ARGV[i])
  if held then
    freed = freed + tonumber(held)
    released = released + 1
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('ZREM', KEYS[3], ARGV[i])
  end
end
if freed > 0 then
  redis.call('HINCRBY', KEYS[1], 'h', -freed)
end
return released

-- Settlement of one request id, exactly once: the first call replaces the reservation with a tombstone;
-- a later call (a replayed access-log entry) or one after the reservation expired changes nothing.
-- The tombstone also answers a reservation that arrives AFTER its settlement (Envoy gave up waiting for
-- the limiter, answered and logged the request, and the reservation was made late): reserve.lua sees
-- the key and charges nothing, so no tokens or concurrency lease are held until the TTL.
-- KEYS  the same layout as the reserve.lua call that made the reservation
-- ARGV  now_ms, request_id, actual_tokens (-1: charge what was reserved),
--       rollback ('1': the request was refused by a later scope; its request slots come back too)
-- Returns {status, reserved_tokens}: status 1 settled now, 2 first sight of this request id but nothing
--         was reserved (admitted fail-open, or the reservation expired), 0 settled before (a replay)
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local actual = tonumber(ARGV[3])
local rollback = ARGV[4] == '1'

local TOMBSTONE, TOMBSTONE_TTL_MS = 'settled', 600000
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], TOMBSTONE, 'PX', TOMBSTONE_TTL_MS)
  return {2, 0}
end
if held == TOMBSTONE then
  return {0, 0}
end
local reserved_s, buckets, leases, charged = string.match(held, '^(%d+)|([^|]*)|([^|]*)|(.*)$')
if not reserved_s then  -- made before settled-tokens counters moved to settlement (3 fields)
  reserved_s, buckets, leases = string.match(held, '^(%d+)|([^|]*)|(.*)$')
  charged = ''
end
-- Scripts are not rolled back on error: check the layout before the first write.
local layers = (#KEYS - 1) / 3
for l_s in string.gmatch(leases .. ',' .. charged, '%d+') do
  if tonumber(l_s) >= layers then
    return redis.error_reply('settle: the keys do not match the reservation of ' .. rid)
  end
end
for i_s in string.gmatch(buckets, '(%d+):%d+:%d+') do
  if math.floor((tonumber(i_s) - 1) / 4) >= layers then
    return redis.error_reply('settle: the keys do not match the reservation of ' .. rid)
  end
end
redis.call('SET', KEYS[1], TOMBSTONE, 'PX', TOMBSTONE_TTL_MS)
local reserved = tonumber(reserved_s)
if actual < 0 then
  actual = reserved  -- no usage known: charge what was reserved
end

local by_layer = {}
for i_s, cap_s, cost_s in string.gmatch(buckets, '(%d+):(%d+):(%d+)') do
  local i = tonumber(i_s)
  local b = (i - 1) % 4 + 1
  if b ~= 3 or rollback then
    local l = math.floor((i - 1) / 4)
    by_layer[l] = by_layer[l] or {}
    table.insert(by_layer[l], {b, tonumber(cap_s), tonumber(cost_s)})
  end
end
for l, items in pairs(by_layer) do
  local key = KEYS[2 + l * 3]
  local st = redis.call('HMGET', key, unpack(BUCKET_FIELDS))
  local update, full = {}, 0
  for _, item in ipairs(items) do
    local b, cap, cost = item[1], item[2], item[3]
    local delta = cost - actual
    if b == 3 then delta = 1 end
    local level = refilled(st, b, cap, now) + delta
    if level > cap then level = cap end
    add_level(update, b, level, ARGV[1])
    full = math.max(full, until_full(b, cap, level))
  end
  write_buckets(key, update, full, st[9], now)  -- a debit can push "full again" further out
end
for l_s in string.gmatch(leases, '%d+') do
  redis.call('ZREM', KEYS[3 + tonumber(l_s) * 3], rid)
end
if actual > 0 then  -- the layers' settled-tokens counters: after settlement they equal the ledger
  for l_s in string.gmatch(charged, '%d+') do
    redis.call('INCRBY', KEYS[4 + tonumber(l_s) * 3], actual)
  end
end
return {1, reserved}

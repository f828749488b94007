-- Settlement of one request id, exactly once: the first call replaces the reservation with a tombstone;
-- a later call (a replayed access-log entry) or one after the reservation expired changes nothing.
-- The tombstone also answers a reservation that arrives AFTER its settlement (Envoy gave up waiting for
-- the rate-limit service, answered and logged the request, and the service reserved late): reserve.lua
-- sees the key and charges nothing, so no tokens or concurrency lease are held until the TTL.
-- KEYS  the same layout as reserve.lua
-- ARGV  now_ms, request_id, actual_tokens (-1: charge what was reserved),
--       rollback ('1': the request was refused by a later scope; its request slots come back too)
-- Returns {settled (1/0), reserved_tokens}
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local actual = tonumber(ARGV[3])
local rollback = ARGV[4] == '1'
local layers = (#KEYS - 1) / 3
local windows = {1000, 60000, 60000, 86400000}
local fields = {'s', 'm', 'r', 'd'}
local times = {'st', 'mt', 'rt', 'dt'}

local TOMBSTONE, TOMBSTONE_TTL_MS = 'settled', 600000
local held = redis.call('GET', KEYS[1])
if not held or held == TOMBSTONE then
  if not held then
    redis.call('SET', KEYS[1], TOMBSTONE, 'PX', TOMBSTONE_TTL_MS)
  end
  return {0, 0}
end
redis.call('SET', KEYS[1], TOMBSTONE, 'PX', TOMBSTONE_TTL_MS)
local reserved_s, buckets, leases = string.match(held, '^(%d+)|([^|]*)|(.*)$')
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
  local st = redis.call('HMGET', key, 's', 'st', 'm', 'mt', 'r', 'rt', 'd', 'dt')
  local update, expire = {}, 0
  for _, item in ipairs(items) do
    local b, cap, cost = item[1], item[2], item[3]
    local delta = cost - actual
    if b == 3 then delta = 1 end
    local level = cap
    if st[2 * b - 1] then
      local elapsed = now - tonumber(st[2 * b])
      if elapsed < 0 then elapsed = 0 end
      level = tonumber(st[2 * b - 1]) + elapsed * cap / windows[b]
      if level > cap then level = cap end
    end
    level = level + delta
    if level > cap then level = cap end
    table.insert(update, fields[b])
    table.insert(update, string.format('%.17g', level))
    table.insert(update, times[b])
    table.insert(update, now)
    local full = math.ceil((cap - level) * windows[b] / cap)
    if full > expire then expire = full end
  end
  redis.call('HSET', key, unpack(update))
  local current = redis.call('PTTL', key)
  if current < expire + 1000 then
    redis.call('PEXPIRE', key, expire + 1000)
  end
end
for l_s in string.gmatch(leases, '%d+') do
  redis.call('ZREM', KEYS[3 + tonumber(l_s) * 3], rid)
end
if actual ~= reserved then
  for l = 0, layers - 1 do
    redis.call('INCRBY', KEYS[4 + l * 3], actual - reserved)
  end
end
return {1, reserved}

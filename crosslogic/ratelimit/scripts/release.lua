-- Frees the concurrency leases of one request id as soon as its response ended (Envoy's Lua filter calls
-- ext_authz's /release while it still holds the response's last bytes), instead of at settlement, which
-- comes with the access log some 100 ms later. Only the leases: the reservation record stays, so
-- settle.lua still refunds or debits the tokens exactly once, and its ZREM of the same members is then a
-- no-op. Idempotent: a second call, or one after settlement (tombstone) or expiry, frees nothing.
-- KEYS  the same layout as the reserve.lua call that made the reservation
-- ARGV  request_id
-- Returns the number of leases freed now
local held = redis.call('GET', KEYS[1])
if not held then
  return 0
end
local leases = string.match(held, '^%d+|[^|]*|([^|]*)')
if not leases then  -- the settlement tombstone: settle.lua already freed them
  return 0
end
local layers = (#KEYS - 1) / 3
for l_s in string.gmatch(leases, '%d+') do  -- check the layout before the first write
  if tonumber(l_s) >= layers then
    return redis.error_reply('release: the keys do not match the reservation of ' .. ARGV[1])
  end
end
local freed = 0
for l_s in string.gmatch(leases, '%d+') do
  freed = freed + redis.call('ZREM', KEYS[3 + tonumber(l_s) * 3], ARGV[1])
end
return freed

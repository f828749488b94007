-- Admission: one atomic decision for one request across its scopes (buckets.py has the maths).
-- A scope is a group of layers with a role:
--   need    (tenant: org, env, key)     its refusal refuses the request
--   lane    (an org's reserved lane)    if it admits, later scopes are not asked; its refusal moves on
--   shared  (platform: global, region)  its refusal sheds the request
--   skip    in KEYS only so that settlement sees the same layout; not decided now
-- Nothing is written unless the request is admitted, so a refused request consumes nothing anywhere.
-- On one Valkey a call carries every scope; on Redis Cluster one scope per call (one hash tag each).
--
-- KEYS[1]    the reservation of this request id
-- KEYS[2..]  per layer 3 keys: bucket hash (buckets.lua), concurrency lease set, settled-tokens counter
--            (only settle.lua writes it)
-- ARGV       now_ms, request_id, reservation_ttl_ms, lease_ttl_ms, tokens, then per scope: role, layer
--            count, then per layer 6 values: tps, tpm, rpm, tpd, concurrency (0 = no limit), shadow
--            (bitmask: bit k-1 set = limit kind k only observes: decide and report, never refuse)
-- Returns    {status, failed_slot, retry_after_ms, shadow_slot, level_1 .. level_4L of the first scope,
--             leases: how many concurrency leases this call took (0 when refused),
--             early: 1 when a lease taken leaves its set at least half full, so it should be freed as the
--             response ends (Envoy's Lua filter calls ext_authz's /release), else 0: settlement frees it}
--            Why half: a lease left to settlement lingers ~0.1-0.3 s after its response, and only leases taken
--            below half of their limit are left, so lingering ones never fill more than half a set: a client
--            running under half its concurrency limit is never refused for leases of finished requests, and
--            one above waits for them in admission (CROSSLOGIC_CONCURRENCY_WAIT_MS) rather than being refused.
--            status 1 admitted, 0 refused, 2 already reserved or settled (admits, charges nothing; then the
--            reply is {2, 0, 0, 0, early})
--            slot = layer*5 + kind (kind 1 tps, 2 tpm, 3 rpm, 4 tpd, 5 concurrency), 0 = none
local now_s, rid = ARGV[1], ARGV[2]  -- now_s: written as given, no number formatting
local now = tonumber(now_s)
local ttl = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])

local existing = redis.call('GET', KEYS[1])
if existing then
  -- Reserved before (a check Envoy retried after a lost answer) or settled (a tombstone): admitted, charged
  -- nothing; the 5th value asks for the early release if the reservation still holds leases, since the retried
  -- check's answer is the only one Envoy acts on.
  local leases = string.match(existing, '^%d+|[^|]*|([^|]*)')
  return {2, 0, 0, 0, (leases and leases ~= '') and 1 or 0}
end

-- Per bucket i = layer*4 + kind: level, cost (numbers), and the caller's digits of capacity and cost for the
-- reservation record (Lua would print a number of 10^15 or more as "1e+15", which settle.lua cannot read).
-- String compares against '0' skip unset limits without converting them (most values are 0).
local levels, costs, caps, cost_s, cap_s, stored = {}, {}, {}, {}, {}, {}
local held_now = {}  -- per layer with a concurrency limit: leases held before this request's
local shadow_hit = 0

-- Decides layer l (0-based) whose 6 values start at ARGV[a]: {failed slot or 0, retry-after ms}.
local function decide(l, a)
  local failed, retry = 0, 0
  local shadow = 0
  if ARGV[a + 5] ~= '0' then shadow = tonumber(ARGV[a + 5]) end
  for b = 1, 4 do
    local i = l * 4 + b
    caps[i] = 0
    levels[i] = 0
    local raw = ARGV[a + b - 1]
    if raw ~= '0' then
      local cap = tonumber(raw)
      caps[i], cap_s[i] = cap, raw
      local st = stored[l]
      if st == nil then
        st = redis.call('HMGET', KEYS[2 + l * 3], unpack(BUCKET_FIELDS))
        stored[l] = st
      end
      local level = refilled(st, b, cap, now)
      local cost, cost_str = tokens, ARGV[5]
      if b == 3 then cost, cost_str = 1, '1' end
      if cost > cap then cost, cost_str = cap, raw end
      levels[i] = level
      costs[i], cost_s[i] = cost, cost_str
      if level < cost then
        if shadow ~= 0 and bit.band(shadow, 2 ^ (b - 1)) ~= 0 then
          if shadow_hit == 0 then shadow_hit = l * 5 + b end
        else
          local wait = math.ceil((cost - level) * WINDOWS[b] / cap)
          if wait > retry then retry = wait end
          if failed == 0 then failed = l * 5 + b end
        end
      end
    end
  end
  if ARGV[a + 4] ~= '0' then
    local limit = tonumber(ARGV[a + 4])
    local lease = KEYS[3 + l * 3]
    local held = redis.call('ZCARD', lease)
    if held >= limit then  -- only now drop leases whose safety-net TTL passed (settlements were lost)
      redis.call('ZREMRANGEBYSCORE', lease, '-inf', now)
      held = redis.call('ZCARD', lease)
    end
    held_now[l] = held
    if held >= limit then
      if bit.band(shadow, 16) ~= 0 then
        if shadow_hit == 0 then shadow_hit = l * 5 + 5 end
      else
        if retry < 1000 then retry = 1000 end
        if failed == 0 then failed = l * 5 + 5 end
      end
    end
  end
  return failed, retry
end

local first_layers = tonumber(ARGV[7])
local chosen = {}  -- scopes to charge: {first layer, layer count, ARGV index of its first value}
local failed, retry = 0, 0
local a, l, asked = 6, 0, true
while a <= #ARGV do
  local role, count = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  if role ~= 'skip' and asked then
    local scope_failed, scope_retry = 0, 0
    for j = 0, count - 1 do
      local f, r = decide(l + j, a + j * 6)
      if scope_failed == 0 then scope_failed = f end
      if r > scope_retry then scope_retry = r end
    end
    if scope_failed == 0 then
      table.insert(chosen, {l, count, a})
      if role == 'lane' then asked = false end
    elseif role ~= 'lane' then
      failed, retry = scope_failed, scope_retry
      break
    end
  end
  l = l + count
  a = a + count * 6
end

local out = {0, failed, retry, shadow_hit}
local lease_count, early = 0, 0
if failed == 0 then
  out[1] = 1
  local held, leases, charged = {}, {}, {}
  for _, scope in ipairs(chosen) do
    for j = 0, scope[2] - 1 do
      local ll, la = scope[1] + j, scope[3] + j * 6
      local update, full = {}, 0
      for b = 1, 4 do
        local i = ll * 4 + b
        if caps[i] > 0 then
          local level = levels[i] - costs[i]
          levels[i] = level
          add_level(update, b, level, now_s)
          full = math.max(full, until_full(b, caps[i], level))
          held[#held + 1] = i .. ':' .. cap_s[i] .. ':' .. cost_s[i]
        end
      end
      if #update > 0 then
        write_buckets(KEYS[2 + ll * 3], update, full, stored[ll][9], now)
      end
      if ARGV[la + 4] ~= '0' then
        local lease = KEYS[3 + ll * 3]
        redis.call('ZADD', lease, now + lease_ttl, rid)
        redis.call('PEXPIRE', lease, lease_ttl)
        leases[#leases + 1] = ll
        if (held_now[ll] + 1) * 2 >= tonumber(ARGV[la + 4]) then early = 1 end
      end
      charged[#charged + 1] = ll
    end
  end
  -- "tokens|bucket:capacity:cost,...|lease layers|charged layers": all settlement needs, in one string.
  redis.call('SET', KEYS[1], ARGV[5] .. '|' .. table.concat(held, ',') .. '|' .. table.concat(leases, ',')
             .. '|' .. table.concat(charged, ','), 'PX', ttl)
  lease_count = #leases
end
for i = 1, first_layers * 4 do  -- the first scope's levels: what the client's headers show
  out[4 + i] = math.floor(levels[i])
end
out[5 + first_layers * 4] = lease_count
out[6 + first_layers * 4] = early  -- ext_authz asks Envoy to free them when the response ends
return out

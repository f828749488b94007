-- Shared by reserve.lua and settle.lua (lua.py prepends this file to each): a layer's bucket hash.
-- Fields: s/st tokens-per-second, m/mt tokens-per-minute, r/rt requests-per-minute, d/dt tokens-per-day
-- (level and last update, kind b = 1..4), x: when the hash expires. Maths as in buckets.py.
local WINDOWS = {1000, 60000, 60000, 86400000}
local FIELDS = {'s', 'm', 'r', 'd'}
local TIMES = {'st', 'mt', 'rt', 'dt'}
local BUCKET_FIELDS = {'s', 'st', 'm', 'mt', 'r', 'rt', 'd', 'dt', 'x'}  -- HMGET order: st[9] = x
-- A bucket's TTL is pushed out in steps of this much, so most writes need no PEXPIRE (stored in 'x').
local EXPIRY_STEP_MS = 60000

-- The level of bucket kind b with capacity cap at time now, from the HMGET reply st (full if unseen).
local function refilled(st, b, cap, now)
  if not st[2 * b - 1] then
    return cap
  end
  local elapsed = now - tonumber(st[2 * b])
  if elapsed < 0 then elapsed = 0 end
  local level = tonumber(st[2 * b - 1]) + elapsed * cap / WINDOWS[b]
  if level > cap then level = cap end
  return level
end

-- Milliseconds until bucket kind b holds cap again.
local function until_full(b, cap, level)
  return math.ceil((cap - level) * WINDOWS[b] / cap)
end

-- Appends bucket kind b's new level to an HSET argument list; now_s: the time as the caller's string.
local function add_level(update, b, level, now_s)
  update[#update + 1] = FIELDS[b]
  update[#update + 1] = string.format('%.17g', level)
  update[#update + 1] = TIMES[b]
  update[#update + 1] = now_s
end

-- Writes the levels; extends the hash's TTL (in steps) if a bucket is full again only after `full` ms.
-- Durability: the levels reach the AOF (and replicas) only with a TTL extension, i.e. whenever the
-- moment a bucket is full again moved EXPIRY_STEP_MS later: at most one minute of refill is consumed
-- between two propagated writes. The writes in between are not propagated (measured: propagating every
-- write cost ~11% of a decision's Valkey CPU). So a Valkey restart can hand each bucket back at most a
-- minute of its refill (never more than its capacity); reservations, leases, quota and settled-token
-- counters are still propagated on every write.
local function write_buckets(key, update, full, expires, now)
  local needed = now + full + 1000  -- the hash may vanish only once every bucket is full again
  if not expires or tonumber(expires) < needed then
    update[#update + 1] = 'x'
    update[#update + 1] = needed + EXPIRY_STEP_MS
    redis.call('HSET', key, unpack(update))
    redis.call('PEXPIRE', key, needed + EXPIRY_STEP_MS - now)
  else
    redis.set_repl(redis.REPL_NONE)
    redis.call('HSET', key, unpack(update))
    redis.set_repl(redis.REPL_ALL)
  end
end

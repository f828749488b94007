"""Four-layer limits that hold exactly under concurrency (issue 3).

Pieces, one job each:
- `buckets.py`   token-bucket maths, pure (property-tested); `scripts/reserve.lua` and `settle.lua` do the
                 same steps atomically in Redis/Valkey, loaded once and called with EVALSHA (reloaded on
                 NOSCRIPT, e.g. after a Redis restart).
- `engine.py`    key scheme and script calls. A *scope* is the set of layers in one hash slot: tenant
                 scope `{o:<org>}` = org, env, key; reserved lane `{o:<org>}`; platform scope `{g}` =
                 global, region. On one Valkey a request's scopes are decided in one script call; on
                 Redis Cluster (split_scopes) one call per scope.
- `admission.py` one request: tenant scope, then the org's reserved lane (bypasses the platform) or the
                 platform scope; a platform refusal sheds the request (429 server_busy); refused
                 requests consume nothing.
- `settlement.py` two-phase accounting: the accounting sink hands each UsageRecord to the Settler, which
                 refunds/debits the difference between reservation and real usage, exactly once per
                 request id (the settle script tombstones the reservation), releases leases and adds the
                 real usage to each layer's settled-tokens counter.
                 Reservations never settled (lost log entries) expire after RESERVATION_TTL_MS.
- `quota.py`     tokens per day / hour per env and org, checked by ext_authz (403 quota_exceeded) against
                 the usage counters; the values come with ext_authz's tenant view (QUOTA_COLUMNS).
- `store.py`     limits from Postgres (plan defaults, org/env/key overrides, per-layer policy) as SQL
                 fragments ext_authz's one-join tenant view selects, and LimitStore (by key id, cached, dropped
                 on NOTIFY crosslogic_limits) for `serve ratelimit` and `limits show`.
- `resp.py`      the lean pipelined client of the per-request script calls (reserve, release).
- `gate.py`      the admission decision without a protocol (limits, admit, Redis-down policy, shadow logs):
                 called by ext_authz in its Check (admission "authz", default) and by `service.py`.
- `service.py`   Envoy's envoy.service.ratelimit.v3 <-> the gate (admission "rls"); `protocol.py` OpenAI
                 headers and bodies.
- `metrics.py`   admission counters and the limiter latency histogram (recorded by the gate).
- `explain.py`, `live.py`  `crosslogic limits show` (the store's limits and their sources) and `limits usage`
                 (live bucket levels, leases, charged tokens); read-only.
"""

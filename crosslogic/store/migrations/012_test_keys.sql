-- Test API keys (issue 12): `clsk_test_…` keys that reach the same nodes as live keys but are free. Their usage
-- is in the ledger (mode 'test', cost 0) so developers see it, and nowhere in billing: not in the month's spend,
-- the free tier, the bill cap, Stripe exports or invoices. Low limits of their own (test_key_limits) keep them
-- from being free production capacity.

-- A key's mode is fixed at creation (a rotation keeps it): the ledger reads it at write time by key_id.
ALTER TABLE api_keys ADD COLUMN mode text NOT NULL DEFAULT 'live' CHECK (mode IN ('live', 'test'));
ALTER TABLE usage_records ADD COLUMN mode text NOT NULL DEFAULT 'live' CHECK (mode IN ('live', 'test'));

-- The caps every test key gets (one row; NULL = no cap of that kind). A key's own limits may be lower, never
-- higher: the limiter takes the smaller of the two. Platform operators change them (`crosslogic limits set
-- --test-keys`); an org's admin cannot lift them.
CREATE TABLE test_key_limits (
    singleton              boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    tokens_per_min         integer CHECK (tokens_per_min IS NULL OR tokens_per_min > 0),
    requests_per_min       integer CHECK (requests_per_min IS NULL OR requests_per_min > 0),
    concurrency_limit      integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0),
    max_tokens_per_request integer CHECK (max_tokens_per_request IS NULL OR max_tokens_per_request > 0)
);
INSERT INTO test_key_limits (singleton, tokens_per_min, requests_per_min, concurrency_limit, max_tokens_per_request)
VALUES (true, 5000, 10, 2, 256);
CREATE TRIGGER test_key_limits_notify AFTER INSERT OR UPDATE OR DELETE ON test_key_limits
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();

-- Billing's partial indexes cover live rows only: test rows are never exported, and would otherwise sit in
-- both indexes (and in the unbilled-rows alert) for ever.
DROP INDEX usage_records_unexported_idx;
CREATE INDEX usage_records_unexported_idx ON usage_records (recorded_at) WHERE export_id IS NULL AND mode = 'live';
DROP INDEX usage_records_unbilled_idx;
CREATE INDEX usage_records_unbilled_idx ON usage_records (org_id) WHERE NOT billed AND mode = 'live';

-- Rate limits (issue 3, seed §13-18): plan defaults, org/env/key overrides, per-layer policy.
-- NULL everywhere means "no override": the key inherits the env, the org inherits its plan's defaults.

CREATE TABLE plan_limits (
    billing_plan             text PRIMARY KEY CHECK (billing_plan IN ('free', 'serverless', 'reserved', 'enterprise')),
    tokens_per_min           integer CHECK (tokens_per_min IS NULL OR tokens_per_min > 0),
    requests_per_min         integer CHECK (requests_per_min IS NULL OR requests_per_min > 0),
    tokens_per_day           bigint CHECK (tokens_per_day IS NULL OR tokens_per_day > 0),
    concurrency_limit        integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0)
);
INSERT INTO plan_limits (billing_plan, tokens_per_min, requests_per_min, tokens_per_day, concurrency_limit) VALUES
    ('free',       40000,    60,    1000000,   8),
    ('serverless', 2000000,  6000,  NULL,      256),
    ('reserved',   10000000, 30000, NULL,      1024),
    ('enterprise', NULL,     NULL,  NULL,      NULL);

ALTER TABLE orgs
    ADD COLUMN rate_limit_tokens_per_sec integer CHECK (rate_limit_tokens_per_sec IS NULL OR rate_limit_tokens_per_sec > 0),
    ADD COLUMN rate_limit_tokens_per_min integer CHECK (rate_limit_tokens_per_min IS NULL OR rate_limit_tokens_per_min > 0),
    ADD COLUMN rate_limit_requests_per_min integer CHECK (rate_limit_requests_per_min IS NULL OR rate_limit_requests_per_min > 0),
    ADD COLUMN rate_limit_tokens_per_day bigint CHECK (rate_limit_tokens_per_day IS NULL OR rate_limit_tokens_per_day > 0),
    ADD COLUMN concurrency_limit integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0);

ALTER TABLE environments
    ADD COLUMN rate_limit_tokens_per_sec integer CHECK (rate_limit_tokens_per_sec IS NULL OR rate_limit_tokens_per_sec > 0),
    ADD COLUMN rate_limit_tokens_per_min integer CHECK (rate_limit_tokens_per_min IS NULL OR rate_limit_tokens_per_min > 0),
    ADD COLUMN rate_limit_requests_per_min integer CHECK (rate_limit_requests_per_min IS NULL OR rate_limit_requests_per_min > 0);

ALTER TABLE api_keys
    ADD COLUMN rate_limit_tokens_per_sec integer CHECK (rate_limit_tokens_per_sec IS NULL OR rate_limit_tokens_per_sec > 0),
    ADD COLUMN rate_limit_requests_per_min integer CHECK (rate_limit_requests_per_min IS NULL OR rate_limit_requests_per_min > 0),
    ADD COLUMN concurrency_limit integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0);

-- Per layer: what to do when Redis is unreachable, and whether the layer only observes (shadow mode:
-- decide and log, never block) while a new limit is rolled out.
CREATE TABLE rate_limit_layers (
    layer        text PRIMARY KEY CHECK (layer IN ('global', 'region', 'org', 'env', 'key')),
    fail_open    boolean NOT NULL,
    shadow       boolean NOT NULL DEFAULT false
);
INSERT INTO rate_limit_layers (layer, fail_open) VALUES
    ('global', true), ('region', true), ('org', true), ('env', true), ('key', true);

-- The platform layers every tenant shares: global (one row) and per region; NULL = unlimited.
-- Saturating them sheds serverless traffic (429 server_busy); reserved capacity bypasses them.
CREATE TABLE global_limits (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    tokens_per_sec   bigint CHECK (tokens_per_sec IS NULL OR tokens_per_sec > 0),
    tokens_per_min   bigint CHECK (tokens_per_min IS NULL OR tokens_per_min > 0),
    tokens_per_day   bigint CHECK (tokens_per_day IS NULL OR tokens_per_day > 0),
    requests_per_min integer CHECK (requests_per_min IS NULL OR requests_per_min > 0),
    concurrency_limit integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0)
);
INSERT INTO global_limits (singleton) VALUES (true);
ALTER TABLE regions
    ADD COLUMN rate_limit_tokens_per_sec bigint CHECK (rate_limit_tokens_per_sec IS NULL OR rate_limit_tokens_per_sec > 0),
    ADD COLUMN rate_limit_tokens_per_min bigint CHECK (rate_limit_tokens_per_min IS NULL OR rate_limit_tokens_per_min > 0),
    ADD COLUMN rate_limit_requests_per_min integer CHECK (rate_limit_requests_per_min IS NULL OR rate_limit_requests_per_min > 0),
    ADD COLUMN concurrency_limit integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0);

CREATE FUNCTION crosslogic_notify_limits() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crosslogic_limits', TG_TABLE_NAME);
    RETURN NULL;
END $$;
CREATE TRIGGER plan_limits_notify AFTER INSERT OR UPDATE OR DELETE ON plan_limits
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();
CREATE TRIGGER rate_limit_layers_notify AFTER INSERT OR UPDATE OR DELETE ON rate_limit_layers
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();
CREATE TRIGGER global_limits_notify AFTER INSERT OR UPDATE OR DELETE ON global_limits
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();
CREATE TRIGGER orgs_limits_notify AFTER UPDATE ON orgs
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();
CREATE TRIGGER environments_limits_notify AFTER UPDATE ON environments
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();
CREATE TRIGGER api_keys_limits_notify AFTER UPDATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();
CREATE TRIGGER regions_limits_notify AFTER UPDATE ON regions
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_limits();

-- Quotas (tokens per day / hour, env and org): a refusal is 403 quota_exceeded from ext_authz.
-- environments.quota_tokens_per_day exists since 001.
ALTER TABLE orgs
    ADD COLUMN quota_tokens_per_day bigint CHECK (quota_tokens_per_day IS NULL OR quota_tokens_per_day >= 0),
    ADD COLUMN quota_tokens_per_hour bigint CHECK (quota_tokens_per_hour IS NULL OR quota_tokens_per_hour >= 0);
ALTER TABLE environments
    ADD COLUMN quota_tokens_per_hour bigint CHECK (quota_tokens_per_hour IS NULL OR quota_tokens_per_hour >= 0);

-- Per-request caps per environment (seed §13.3, §16): longest request body, most tokens one request may
-- generate. NULL = only the platform-wide limits (Envoy's max_request_bytes, the model's max_output_tokens).
ALTER TABLE environments
    ADD COLUMN max_request_bytes integer CHECK (max_request_bytes IS NULL OR max_request_bytes > 0),
    ADD COLUMN max_tokens_per_request integer CHECK (max_tokens_per_request IS NULL OR max_tokens_per_request > 0);

-- Shadow mode per org / env / key: that layer's limits are decided and logged, never enforced
-- (rolling out a new limit for one tenant); rate_limit_layers.shadow does it for a whole layer.
ALTER TABLE orgs ADD COLUMN rate_limit_shadow boolean NOT NULL DEFAULT false;
ALTER TABLE environments ADD COLUMN rate_limit_shadow boolean NOT NULL DEFAULT false;
ALTER TABLE api_keys ADD COLUMN rate_limit_shadow boolean NOT NULL DEFAULT false;

-- Tenancy, catalogue, nodes and the usage ledger (seed §9.2, §10.2, §11.1, §21.1, §34).

CREATE TABLE regions (
    region_id        text PRIMARY KEY,               -- 'ap-south', 'ap-southeast', 'eu-central', 'us-east'
    display_name     text NOT NULL,
    fallback_chain   text[] NOT NULL DEFAULT '{}',   -- regions tried in order when this one has no capacity
    price_multiplier_ppm integer NOT NULL DEFAULT 1000000 CHECK (price_multiplier_ppm > 0), -- 1.0 = 1e6
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
    model_id         text PRIMARY KEY,               -- the public name clients send, e.g. 'llama-3-8b'
    kind             text NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'completion', 'embedding')),
    served_name      text,                           -- name the vLLM node serves; NULL = model_id
    context_length   integer NOT NULL DEFAULT 8192 CHECK (context_length > 0),
    max_output_tokens integer NOT NULL DEFAULT 4096 CHECK (max_output_tokens > 0),
    default_max_tokens integer NOT NULL DEFAULT 512 CHECK (default_max_tokens > 0),
    vram_gb          integer NOT NULL DEFAULT 16,
    tokens_per_sec   integer NOT NULL DEFAULT 1000,  -- expected decode speed per node
    input_price_microdollars_per_1m  bigint NOT NULL DEFAULT 0 CHECK (input_price_microdollars_per_1m >= 0),
    output_price_microdollars_per_1m bigint NOT NULL DEFAULT 0 CHECK (output_price_microdollars_per_1m >= 0),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orgs (
    org_id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name             text NOT NULL UNIQUE,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    billing_plan     text NOT NULL DEFAULT 'serverless' CHECK (billing_plan IN ('free', 'serverless', 'reserved', 'enterprise')),
    reserved_capacity_tokens_per_sec integer NOT NULL DEFAULT 0 CHECK (reserved_capacity_tokens_per_sec >= 0),
    region_preferences jsonb NOT NULL DEFAULT '[]'::jsonb,  -- ordered list of region ids; first is the default
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE environments (
    env_id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES orgs(org_id),
    name             text NOT NULL,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    region           text REFERENCES regions(region_id),      -- NULL = org default
    model_list       jsonb NOT NULL DEFAULT '[]'::jsonb,      -- allowed model ids; empty = all active models
    quota_tokens_per_day integer CHECK (quota_tokens_per_day IS NULL OR quota_tokens_per_day >= 0),
    concurrency_limit integer CHECK (concurrency_limit IS NULL OR concurrency_limit > 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE api_keys (
    key_id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    key_hash         text NOT NULL UNIQUE,           -- hex HMAC-SHA256(server secret, key); never the key
    key_prefix       text NOT NULL,                  -- first characters, to help humans recognise a key
    org_id           uuid NOT NULL REFERENCES orgs(org_id),
    env_id           uuid NOT NULL REFERENCES environments(env_id),
    user_id          uuid,
    name             text NOT NULL DEFAULT '',
    region           text REFERENCES regions(region_id),      -- NULL = env / org default
    role             text NOT NULL DEFAULT 'developer' CHECK (role IN ('admin', 'developer', 'read-only')),
    rate_limit_tokens_per_min integer CHECK (rate_limit_tokens_per_min IS NULL OR rate_limit_tokens_per_min > 0),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive', 'suspended', 'revoked')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz
);
CREATE INDEX api_keys_env_idx ON api_keys (env_id);

CREATE TABLE nodes (
    node_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name             text NOT NULL UNIQUE,
    region           text NOT NULL REFERENCES regions(region_id),
    cloud            text NOT NULL DEFAULT 'onprem',
    spot             boolean NOT NULL DEFAULT false,
    gpu_type         text NOT NULL DEFAULT 'unknown',
    vram_total_gb    integer NOT NULL DEFAULT 0,
    vram_free_gb     integer NOT NULL DEFAULT 0,
    throughput_tokens_per_sec integer NOT NULL DEFAULT 0,
    model_list       text[] NOT NULL DEFAULT '{}',
    endpoint_host    text NOT NULL,
    endpoint_port    integer NOT NULL CHECK (endpoint_port BETWEEN 1 AND 65535),
    tailnet_ip       text,
    reserved_org_id  uuid REFERENCES orgs(org_id),   -- dedicated lane; NULL = serverless pool
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'draining', 'dead')),
    weight           integer NOT NULL DEFAULT 100 CHECK (weight BETWEEN 1 AND 10000),
    last_heartbeat_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- One row per request that passed authorisation (seed §34). request_id is Envoy's x-request-id.
CREATE TABLE usage_records (
    usage_id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id       text NOT NULL UNIQUE,
    occurred_at      timestamptz NOT NULL,
    org_id           uuid NOT NULL,
    env_id           uuid NOT NULL,
    key_id           uuid NOT NULL,
    region           text NOT NULL,
    model            text NOT NULL,
    endpoint         text NOT NULL,                  -- 'chat.completions', 'completions', 'embeddings'
    streamed         boolean NOT NULL DEFAULT false,
    status_code      integer NOT NULL,
    prompt_tokens    integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    total_tokens     integer NOT NULL DEFAULT 0,
    usage_source     text NOT NULL,                  -- 'reported' (node usage), 'partial' (stream cut), 'none'
    latency_ms       integer NOT NULL DEFAULT 0,
    cost_microdollars bigint NOT NULL DEFAULT 0,
    node_id          text,                           -- internal only; never shown to tenants
    billed           boolean NOT NULL DEFAULT false,
    recorded_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_records_org_time_idx ON usage_records (org_id, occurred_at);
CREATE INDEX usage_records_unbilled_idx ON usage_records (org_id) WHERE NOT billed;

CREATE TABLE audit_log (
    audit_id         bigserial PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    actor            text NOT NULL,
    action           text NOT NULL,
    target_type      text NOT NULL,
    target_id        text NOT NULL,
    details          jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- Change notifications: authz replicas drop cached identities, the xDS server rebuilds routes.
-- Reads the row as JSON: PL/pgSQL resolves NEW.<field> against the row, so per-table fields in one
-- CASE would fail on the other tables.
CREATE FUNCTION crosslogic_notify_tenancy() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_data jsonb;
    row_id text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row_data := to_jsonb(OLD);
    ELSE
        row_data := to_jsonb(NEW);
    END IF;
    row_id := row_data ->> CASE TG_TABLE_NAME
        WHEN 'orgs' THEN 'org_id'
        WHEN 'environments' THEN 'env_id'
        WHEN 'api_keys' THEN 'key_id'
    END;
    PERFORM pg_notify('crosslogic_tenancy', TG_TABLE_NAME || ':' || COALESCE(row_id, ''));
    RETURN NULL;
END $$;

CREATE FUNCTION crosslogic_notify_routing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crosslogic_routing', TG_TABLE_NAME);
    RETURN NULL;
END $$;

CREATE TRIGGER orgs_notify AFTER INSERT OR UPDATE OR DELETE ON orgs
    FOR EACH ROW EXECUTE FUNCTION crosslogic_notify_tenancy();
CREATE TRIGGER environments_notify AFTER INSERT OR UPDATE OR DELETE ON environments
    FOR EACH ROW EXECUTE FUNCTION crosslogic_notify_tenancy();
CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION crosslogic_notify_tenancy();
CREATE TRIGGER models_tenancy_notify AFTER INSERT OR UPDATE OR DELETE ON models
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_routing();
CREATE TRIGGER regions_notify AFTER INSERT OR UPDATE OR DELETE ON regions
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_routing();
CREATE TRIGGER nodes_notify AFTER INSERT OR UPDATE OR DELETE ON nodes
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_routing();

-- Admin API (issue 12): admin tokens with the seed's roles, and API keys that expire (rotation overlap, expiry).

-- An admin token: a bearer for the admin HTTP API and the developer dashboard. Stored like an API key, as an
-- HMAC of the server secret (never the token). org_id NULL = platform scope (every org, the catalogue, nodes);
-- otherwise the token sees and changes only that org. Roles as seed §4.9: admin (everything in its scope),
-- developer (reads, and manages API keys), read-only (reads).
CREATE TABLE admin_tokens (
    token_id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    token_hash       text NOT NULL UNIQUE,
    token_prefix     text NOT NULL,
    name             text NOT NULL DEFAULT '',
    role             text NOT NULL CHECK (role IN ('admin', 'developer', 'read-only')),
    org_id           uuid REFERENCES orgs(org_id),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_by       text NOT NULL DEFAULT 'system',
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    revoked_at       timestamptz,
    last_used_at     timestamptz
);
CREATE INDEX admin_tokens_org_idx ON admin_tokens (org_id);

-- An API key stops working at expires_at (NULL = never): set at creation, or by a rotation with an overlap
-- window (the old key keeps working until the new one is deployed). ext_authz reads it with the key's view.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;

-- Usage queries per org and time (hour / day buckets) with a key, env, model or region breakdown.
CREATE INDEX usage_records_org_key_time_idx ON usage_records (org_id, key_id, occurred_at);

-- Shadow mode per rule (issue 3 part 8): one limit of one org / env / key is decided and logged but never
-- refuses, while the other limits of that layer keep refusing -- how a new limit is rolled out. The
-- boolean rate_limit_shadow columns (002) still put every limit of the layer in shadow mode.
CREATE FUNCTION crosslogic_valid_limit_kinds(kinds text[]) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT kinds <@ ARRAY['tokens_per_sec', 'tokens_per_min', 'requests_per_min', 'tokens_per_day',
                          'concurrency']::text[]
$$;
ALTER TABLE orgs ADD COLUMN rate_limit_shadow_limits text[] NOT NULL DEFAULT '{}'
    CHECK (crosslogic_valid_limit_kinds(rate_limit_shadow_limits));
ALTER TABLE environments ADD COLUMN rate_limit_shadow_limits text[] NOT NULL DEFAULT '{}'
    CHECK (crosslogic_valid_limit_kinds(rate_limit_shadow_limits));
ALTER TABLE api_keys ADD COLUMN rate_limit_shadow_limits text[] NOT NULL DEFAULT '{}'
    CHECK (crosslogic_valid_limit_kinds(rate_limit_shadow_limits));

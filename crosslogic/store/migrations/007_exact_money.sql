-- Exact money (issue 9, items 9, 15, 16): every row priced by the versions in effect at its occurred_at,
-- priced inside the ledger's INSERT; org terms versioned like prices; rows that no version prices are held,
-- never billed at a guess; what each org owes this month (after the free tier) for the bill cap; a history
-- of node lifetimes for FinOps.

-- Org terms (pricing tier multiplier, discount) as versions, like prices: a change applies from the moment it
-- is recorded, to every row that happened from then on, whenever that row reaches the ledger.
CREATE TABLE org_terms_versions (
    org_id           uuid NOT NULL REFERENCES orgs(org_id) ON DELETE CASCADE,
    effective_from   timestamptz NOT NULL,
    tier_multiplier_ppm integer NOT NULL CHECK (tier_multiplier_ppm > 0),
    discount_ppm     integer NOT NULL CHECK (discount_ppm BETWEEN 0 AND 1000000),
    PRIMARY KEY (org_id, effective_from)
);
INSERT INTO org_terms_versions
SELECT o.org_id, '-infinity', t.multiplier_ppm, o.discount_ppm FROM orgs o JOIN pricing_tiers t ON t.tier_id = o.pricing_tier;

-- Versions are never moved into the past, and a new one waits for every ledger batch being priced:
-- * every insert takes this advisory lock exclusively until its transaction ends; the ledger takes it shared
--   for each batch (accounting/ledger.py), so a batch is priced either before the version's start or, after
--   waiting, with the version committed and visible;
-- * a start in the past (now() of an older transaction, a typo) becomes the moment the lock was granted, so
--   no row already billed can fall after the start of a version it did not see: past bills never change.
-- '-infinity' is allowed only as the first version of its model / region / org (nothing happened before it).
CREATE FUNCTION crosslogic_version_start() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    starts timestamptz;
    earlier boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(7271007);
    starts := clock_timestamp();
    IF NEW.effective_from = '-infinity' THEN
        IF TG_TABLE_NAME = 'price_versions' THEN
            earlier := EXISTS (SELECT 1 FROM price_versions WHERE model_id = NEW.model_id);
        ELSIF TG_TABLE_NAME = 'region_multiplier_versions' THEN
            earlier := EXISTS (SELECT 1 FROM region_multiplier_versions WHERE region_id = NEW.region_id);
        ELSE
            earlier := EXISTS (SELECT 1 FROM org_terms_versions WHERE org_id = NEW.org_id);
        END IF;
        IF earlier THEN
            NEW.effective_from := starts;
        END IF;
    ELSIF NEW.effective_from < starts THEN
        NEW.effective_from := starts;
    END IF;
    RETURN NEW;
END $$;
CREATE FUNCTION crosslogic_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never changed: record a new version instead', TG_TABLE_NAME;
END $$;
CREATE TRIGGER price_versions_start BEFORE INSERT ON price_versions
    FOR EACH ROW EXECUTE FUNCTION crosslogic_version_start();
CREATE TRIGGER region_multiplier_versions_start BEFORE INSERT ON region_multiplier_versions
    FOR EACH ROW EXECUTE FUNCTION crosslogic_version_start();
CREATE TRIGGER org_terms_versions_start BEFORE INSERT ON org_terms_versions
    FOR EACH ROW EXECUTE FUNCTION crosslogic_version_start();
CREATE TRIGGER price_versions_immutable BEFORE UPDATE ON price_versions
    FOR EACH ROW EXECUTE FUNCTION crosslogic_versions_immutable();
CREATE TRIGGER region_multiplier_versions_immutable BEFORE UPDATE ON region_multiplier_versions
    FOR EACH ROW EXECUTE FUNCTION crosslogic_versions_immutable();
CREATE TRIGGER org_terms_versions_immutable BEFORE UPDATE ON org_terms_versions
    FOR EACH ROW EXECUTE FUNCTION crosslogic_versions_immutable();

-- The catalogue triggers of 004 without their ON CONFLICT DO UPDATE (a version is never rewritten; starts
-- are distinct now that each one is the moment its lock was granted).
CREATE OR REPLACE FUNCTION crosslogic_version_prices() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    starts timestamptz := CASE WHEN TG_OP = 'INSERT' THEN '-infinity'::timestamptz ELSE now() END;
BEGIN
    IF TG_TABLE_NAME = 'models' THEN
        IF TG_OP = 'INSERT'
           OR NEW.input_price_microdollars_per_1m IS DISTINCT FROM OLD.input_price_microdollars_per_1m
           OR NEW.output_price_microdollars_per_1m IS DISTINCT FROM OLD.output_price_microdollars_per_1m THEN
            INSERT INTO price_versions (model_id, effective_from, input_price_microdollars_per_1m,
                                        output_price_microdollars_per_1m)
            VALUES (NEW.model_id, starts, NEW.input_price_microdollars_per_1m, NEW.output_price_microdollars_per_1m);
        END IF;
    ELSIF TG_OP = 'INSERT' OR NEW.price_multiplier_ppm IS DISTINCT FROM OLD.price_multiplier_ppm THEN
        INSERT INTO region_multiplier_versions (region_id, effective_from, multiplier_ppm)
        VALUES (NEW.region_id, starts, NEW.price_multiplier_ppm);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION crosslogic_version_org_terms() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'pricing_tiers' THEN
        IF NEW.multiplier_ppm IS DISTINCT FROM OLD.multiplier_ppm THEN
            INSERT INTO org_terms_versions
            SELECT org_id, now(), NEW.multiplier_ppm, discount_ppm FROM orgs WHERE pricing_tier = NEW.tier_id;
        END IF;
    ELSIF TG_OP = 'INSERT' OR NEW.pricing_tier IS DISTINCT FROM OLD.pricing_tier
          OR NEW.discount_ppm IS DISTINCT FROM OLD.discount_ppm THEN
        INSERT INTO org_terms_versions
        SELECT NEW.org_id, CASE WHEN TG_OP = 'INSERT' THEN '-infinity'::timestamptz ELSE now() END,
               t.multiplier_ppm, NEW.discount_ppm
        FROM pricing_tiers t WHERE t.tier_id = NEW.pricing_tier;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER orgs_terms_versions AFTER INSERT OR UPDATE ON orgs
    FOR EACH ROW EXECUTE FUNCTION crosslogic_version_org_terms();
CREATE TRIGGER pricing_tiers_terms_versions AFTER UPDATE ON pricing_tiers
    FOR EACH ROW EXECUTE FUNCTION crosslogic_version_org_terms();

-- Price book readers (ext_authz's bill-cap reservations, the ledger's held rows) reload on this channel.
CREATE FUNCTION crosslogic_notify_prices() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crosslogic_prices', TG_TABLE_NAME);
    RETURN NULL;
END $$;
CREATE TRIGGER price_versions_notify AFTER INSERT ON price_versions
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_prices();
CREATE TRIGGER region_multiplier_versions_notify AFTER INSERT ON region_multiplier_versions
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_prices();
CREATE TRIGGER org_terms_versions_notify AFTER INSERT ON org_terms_versions
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_prices();

-- One row's cost, exactly as crosslogic.accounting.pricing.cost_microdollars: one half-up rounding at the end.
CREATE FUNCTION crosslogic_cost(prompt_tokens bigint, completion_tokens bigint, input_per_1m bigint,
                                output_per_1m bigint, region_ppm bigint, tier_ppm bigint, discount_ppm bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT div((prompt_tokens::numeric * input_per_1m + completion_tokens::numeric * output_per_1m)
               * region_ppm * tier_ppm * (1000000 - discount_ppm) + 500000000000000000000000,
               1000000000000000000000000)::bigint
$$;

-- Rows whose model, region or org has no version in effect at their occurred_at: never written at a guess.
-- Kept here (durably: the backstop's file position moves on) until a version prices them; the accounting
-- service retries them on every crosslogic_prices notification and periodically.
CREATE TABLE usage_unpriced (
    request_id       text PRIMARY KEY,
    occurred_at      timestamptz NOT NULL,
    org_id           uuid NOT NULL,
    env_id           uuid NOT NULL,
    key_id           uuid NOT NULL,
    region           text NOT NULL,
    model            text NOT NULL,
    endpoint         text NOT NULL,
    streamed         boolean NOT NULL,
    status_code      integer NOT NULL,
    prompt_tokens    integer NOT NULL,
    completion_tokens integer NOT NULL,
    usage_source     text NOT NULL,
    latency_ms       integer NOT NULL,
    node_id          text,
    written_by       text NOT NULL,
    missing          text NOT NULL,                 -- 'price', 'region multiplier', 'org terms' (the first missing)
    held_at          timestamptz NOT NULL DEFAULT now()
);

-- The monthly allowance in tokens before an org pays per token (one definition, used by the ledger and the
-- Stripe reporter): free/serverless: the free tier; reserved: capacity x seconds of the month (everything
-- when overage is not billed); enterprise: none.
CREATE FUNCTION crosslogic_monthly_allowance(plan text, free_tokens bigint, reserved_tps bigint,
                                             overage_billed boolean, month date)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN plan IN ('free', 'serverless') THEN free_tokens
        WHEN plan = 'reserved' AND NOT overage_billed THEN 9223372036854775807
        WHEN plan = 'reserved' THEN reserved_tps
             * extract(epoch FROM (month + interval '1 month')::timestamp - month::timestamp)::bigint
        ELSE 0 END
$$;

-- Spends an allowance on usages in order (crosslogic.accounting.pricing.allocate_allowance): a usage inside
-- it owes 0, the one crossing it pays for its tokens beyond pro rata (half up), later ones pay in full.
CREATE FUNCTION crosslogic_allocate(used bigint, allowance bigint, tokens bigint[], costs bigint[],
                                    OUT free_tokens bigint, OUT owed bigint)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    remaining bigint := greatest(0, allowance - used);
    f bigint;
BEGIN
    free_tokens := 0;
    owed := 0;
    FOR i IN 1 .. coalesce(array_length(tokens, 1), 0) LOOP
        f := least(tokens[i], remaining);
        remaining := remaining - f;
        free_tokens := free_tokens + f;
        IF f = 0 THEN
            owed := owed + costs[i];
        ELSIF f < tokens[i] THEN
            owed := owed + div(costs[i]::numeric * (tokens[i] - f) * 2 + tokens[i], 2 * tokens[i]::numeric)::bigint;
        END IF;
    END LOOP;
END $$;

-- What each org owes this month after its allowance, kept by the ledger in the same statement as the rows
-- (the allowance spent in the order the ledger records usage). The bill cap counts this, not gross cost.
ALTER TABLE org_monthly_spend
    ADD COLUMN free_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN owed_microdollars bigint NOT NULL DEFAULT 0;
UPDATE org_monthly_spend s SET (free_tokens, owed_microdollars) = (
    SELECT a.free_tokens, a.owed
    FROM orgs o,
         LATERAL (SELECT array_agg(u.total_tokens::bigint ORDER BY u.occurred_at, u.request_id) AS tokens,
                         array_agg(u.cost_microdollars ORDER BY u.occurred_at, u.request_id) AS costs
                  FROM usage_records u
                  WHERE u.org_id = s.org_id AND u.occurred_at >= s.month::timestamp AT TIME ZONE 'UTC'
                    AND u.occurred_at < (s.month + interval '1 month')::timestamp AT TIME ZONE 'UTC') r,
         LATERAL crosslogic_allocate(0, crosslogic_monthly_allowance(o.billing_plan, o.free_tokens_per_month,
             o.reserved_capacity_tokens_per_sec, o.reserved_overage_billed, s.month), r.tokens, r.costs) a
    WHERE o.org_id = s.org_id)
WHERE EXISTS (SELECT 1 FROM orgs o WHERE o.org_id = s.org_id);

-- Bill cap when Valkey (which holds the reservations) is unreachable: false = fall back to the ledger's
-- month-to-date spend (the cap is enforced after the fact); true = refuse the org's requests with 503.
ALTER TABLE orgs ADD COLUMN bill_cap_fail_closed boolean NOT NULL DEFAULT false;

-- FinOps: every lifetime of every node (a row per span in which it was alive with the same cost-relevant
-- attributes), kept when the registry deletes dead nodes, so their GPU hours stay in the cost model.
CREATE TABLE node_lifetimes (
    lifetime_id      bigserial PRIMARY KEY,
    node_id          uuid NOT NULL,                 -- no foreign key: outlives the node row
    node_name        text NOT NULL,
    region           text NOT NULL,
    cloud            text NOT NULL,
    spot             boolean NOT NULL,
    gpu_type         text NOT NULL,
    model_list       text[] NOT NULL,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz,                   -- NULL: alive now
    ended_by         text                           -- the status reason, or 'deleted'
);
CREATE INDEX node_lifetimes_open_idx ON node_lifetimes (node_id) WHERE ended_at IS NULL;
CREATE INDEX node_lifetimes_time_idx ON node_lifetimes (started_at, ended_at);
INSERT INTO node_lifetimes (node_id, node_name, region, cloud, spot, gpu_type, model_list, started_at, ended_at,
                            ended_by)
SELECT node_id, name, region, cloud, spot, gpu_type, model_list, created_at,
       CASE WHEN status = 'dead' THEN greatest(created_at, status_changed_at) END,
       CASE WHEN status = 'dead' THEN status_reason END
FROM nodes;

-- A node costs from the moment it exists (or comes back) until it is dead or deleted; a change of what it costs
-- (region, cloud, spot, GPU, models) closes one lifetime and opens the next.
CREATE FUNCTION crosslogic_node_lifetimes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := clock_timestamp();
BEGIN
    IF TG_OP <> 'INSERT' THEN
        IF TG_OP = 'DELETE' OR NEW.status = 'dead' OR OLD.status = 'dead'
           OR (NEW.region, NEW.cloud, NEW.spot, NEW.gpu_type, NEW.model_list)
              IS DISTINCT FROM (OLD.region, OLD.cloud, OLD.spot, OLD.gpu_type, OLD.model_list) THEN
            UPDATE node_lifetimes SET ended_at = greatest(started_at, at),
                   ended_by = CASE WHEN TG_OP = 'DELETE' THEN 'deleted' ELSE NEW.status_reason END
            WHERE node_id = OLD.node_id AND ended_at IS NULL;
        ELSE
            RETURN NULL;
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status <> 'dead'
       AND NOT EXISTS (SELECT 1 FROM node_lifetimes WHERE node_id = NEW.node_id AND ended_at IS NULL) THEN
        INSERT INTO node_lifetimes (node_id, node_name, region, cloud, spot, gpu_type, model_list, started_at)
        VALUES (NEW.node_id, NEW.name, NEW.region, NEW.cloud, NEW.spot, NEW.gpu_type, NEW.model_list,
                CASE WHEN TG_OP = 'INSERT' THEN least(NEW.created_at, at) ELSE at END);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER nodes_lifetimes AFTER INSERT OR UPDATE OR DELETE ON nodes
    FOR EACH ROW EXECUTE FUNCTION crosslogic_node_lifetimes();

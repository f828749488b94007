-- Billing: versioned prices, tiers and discounts, free tier, bill caps, Stripe exports (seed §35–38, §42).

-- A price applies from effective_from until the next version of the same model starts. Rows are never
-- updated: a new price is a new row dated now or later, so a past bill never changes.
CREATE TABLE price_versions (
    price_version_id bigserial PRIMARY KEY,
    model_id         text NOT NULL REFERENCES models(model_id),
    effective_from   timestamptz NOT NULL,
    input_price_microdollars_per_1m  bigint NOT NULL CHECK (input_price_microdollars_per_1m >= 0),
    output_price_microdollars_per_1m bigint NOT NULL CHECK (output_price_microdollars_per_1m >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model_id, effective_from)
);
-- Today's catalogue prices are the first version, valid since the beginning of time.
INSERT INTO price_versions (model_id, effective_from, input_price_microdollars_per_1m,
                            output_price_microdollars_per_1m)
SELECT model_id, '-infinity', input_price_microdollars_per_1m, output_price_microdollars_per_1m FROM models;

CREATE TABLE region_multiplier_versions (
    region_id        text NOT NULL REFERENCES regions(region_id),
    effective_from   timestamptz NOT NULL,
    multiplier_ppm   integer NOT NULL CHECK (multiplier_ppm > 0),
    PRIMARY KEY (region_id, effective_from)
);
INSERT INTO region_multiplier_versions SELECT region_id, '-infinity', price_multiplier_ppm FROM regions;

-- Pricing tiers scale every price for the orgs on them (e.g. 'startup' 0.8x); discounts come on top.
CREATE TABLE pricing_tiers (
    tier_id          text PRIMARY KEY,
    multiplier_ppm   integer NOT NULL CHECK (multiplier_ppm > 0)
);
INSERT INTO pricing_tiers VALUES ('standard', 1000000);

ALTER TABLE orgs
    ADD COLUMN pricing_tier text NOT NULL DEFAULT 'standard' REFERENCES pricing_tiers(tier_id),
    ADD COLUMN discount_ppm integer NOT NULL DEFAULT 0 CHECK (discount_ppm BETWEEN 0 AND 1000000),
    ADD COLUMN free_tokens_per_month bigint NOT NULL DEFAULT 25000 CHECK (free_tokens_per_month >= 0),
    ADD COLUMN monthly_bill_cap_microdollars bigint CHECK (monthly_bill_cap_microdollars IS NULL
                                                          OR monthly_bill_cap_microdollars >= 0),
    ADD COLUMN suspend_at_cap boolean NOT NULL DEFAULT false,
    ADD COLUMN stripe_customer_id text,
    ADD COLUMN reserved_overage_billed boolean NOT NULL DEFAULT false;

-- One Stripe meter event per (org, meter, interval) batch; its identifier derives from export_id, which is
-- stored before the first send, so every retry repeats the same identifier and Stripe counts it once.
CREATE TABLE billing_exports (
    export_id        bigserial PRIMARY KEY,
    org_id           uuid NOT NULL,
    meter            text NOT NULL,                 -- Stripe meter event_name
    model            text NOT NULL,
    interval_start   timestamptz NOT NULL,
    stripe_customer_id text NOT NULL,
    value            bigint NOT NULL,               -- micro-dollars or tokens, per the meter
    tokens           bigint NOT NULL,
    identifier       text NOT NULL UNIQUE,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    retry_count      integer NOT NULL DEFAULT 0,
    regenerations    integer NOT NULL DEFAULT 0,    -- re-sent by reconciliation (new Idempotency-Key, same identifier)
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);
CREATE INDEX billing_exports_due_idx ON billing_exports (next_attempt_at) WHERE status <> 'sent';

ALTER TABLE usage_records
    ADD COLUMN price_version_id bigint,
    ADD COLUMN free_tokens integer NOT NULL DEFAULT 0,          -- covered by the monthly free tier
    ADD COLUMN billable_microdollars bigint,                    -- set when exported: cost after free tier/plan
    ADD COLUMN export_id bigint REFERENCES billing_exports(export_id),
    ADD COLUMN billing_failed boolean NOT NULL DEFAULT false,
    ADD COLUMN retry_count integer NOT NULL DEFAULT 0,
    ADD COLUMN written_by text NOT NULL DEFAULT 'als';          -- 'als' (fast path) or 'backstop' (replay)
CREATE INDEX usage_records_unexported_idx ON usage_records (recorded_at) WHERE export_id IS NULL;
CREATE INDEX usage_records_export_idx ON usage_records (export_id);

-- Month-to-date spend per org, kept by the ledger writer in the same statement as the rows: the bill cap
-- check in ext_authz reads one row instead of summing the ledger.
CREATE TABLE org_monthly_spend (
    org_id           uuid NOT NULL,
    month            date NOT NULL,
    cost_microdollars bigint NOT NULL DEFAULT 0,
    tokens           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, month)
);

-- Changing a price in the catalogue (models / regions) records a new version from now on; the old one
-- keeps pricing everything before. Future prices are inserted into the version tables directly.
CREATE FUNCTION crosslogic_version_prices() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    starts timestamptz := CASE WHEN TG_OP = 'INSERT' THEN '-infinity'::timestamptz ELSE now() END;
BEGIN
    IF TG_TABLE_NAME = 'models' THEN
        IF TG_OP = 'INSERT'
           OR NEW.input_price_microdollars_per_1m IS DISTINCT FROM OLD.input_price_microdollars_per_1m
           OR NEW.output_price_microdollars_per_1m IS DISTINCT FROM OLD.output_price_microdollars_per_1m THEN
            INSERT INTO price_versions (model_id, effective_from, input_price_microdollars_per_1m,
                                        output_price_microdollars_per_1m)
            VALUES (NEW.model_id, starts, NEW.input_price_microdollars_per_1m, NEW.output_price_microdollars_per_1m)
            ON CONFLICT (model_id, effective_from) DO UPDATE SET
                input_price_microdollars_per_1m = EXCLUDED.input_price_microdollars_per_1m,
                output_price_microdollars_per_1m = EXCLUDED.output_price_microdollars_per_1m;
        END IF;
    ELSIF TG_OP = 'INSERT' OR NEW.price_multiplier_ppm IS DISTINCT FROM OLD.price_multiplier_ppm THEN
        INSERT INTO region_multiplier_versions (region_id, effective_from, multiplier_ppm)
        VALUES (NEW.region_id, starts, NEW.price_multiplier_ppm)
        ON CONFLICT (region_id, effective_from) DO UPDATE SET multiplier_ppm = EXCLUDED.multiplier_ppm;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER models_price_versions AFTER INSERT OR UPDATE ON models
    FOR EACH ROW EXECUTE FUNCTION crosslogic_version_prices();
CREATE TRIGGER regions_price_versions AFTER INSERT OR UPDATE ON regions
    FOR EACH ROW EXECUTE FUNCTION crosslogic_version_prices();

-- Alerts already raised (one per org, month and threshold), so a threshold alerts once.
CREATE TABLE billing_alerts (
    org_id           uuid NOT NULL,
    month            date NOT NULL,
    threshold_pct    integer NOT NULL,
    raised_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, month, threshold_pct)
);

-- FinOps (seed §43): what a GPU costs us per hour, by type, cloud and spot/on-demand.
CREATE TABLE gpu_prices (
    gpu_type         text NOT NULL,
    cloud            text NOT NULL,
    spot             boolean NOT NULL,
    microdollars_per_hour bigint NOT NULL CHECK (microdollars_per_hour >= 0),
    PRIMARY KEY (gpu_type, cloud, spot)
);

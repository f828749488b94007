-- The GPU fleet (issue 14): machines the autoscaler launches through a provider (SkyPilot, or local simulated
-- nodes), the per-pool fleet policy beside the routing policy, and the lifecycle
--     provisioning -> registering -> active -> draining -> dead -> terminated
-- in the registry. Nodes nobody launched (an operator's, or an agent started by hand) keep the old
-- active -> draining -> dead -> deleted; only machines the fleet launched are terminated (given back to the cloud).

ALTER TABLE nodes DROP CONSTRAINT nodes_status_check;
ALTER TABLE nodes ADD CONSTRAINT nodes_status_check
    CHECK (status IN ('provisioning', 'registering', 'active', 'draining', 'dead', 'terminated'));
-- A machine being launched has no address yet (SkyPilot knows it once the VM is up): port 0 until it registers.
ALTER TABLE nodes DROP CONSTRAINT nodes_endpoint_port_check;
ALTER TABLE nodes ADD CONSTRAINT nodes_endpoint_port_check
    CHECK (endpoint_port BETWEEN 1 AND 65535 OR (endpoint_port = 0 AND status IN ('provisioning', 'registering',
                                                                                    'terminated')));
ALTER TABLE nodes
    ADD COLUMN engine text NOT NULL DEFAULT 'vllm',            -- what the agent found serving: vllm, sglang
    ADD COLUMN prefill_tokens_per_sec integer NOT NULL DEFAULT 0, -- warm-up benchmark (decode: throughput_...)
    ADD COLUMN price_microdollars_per_hour bigint;             -- what the provider charges; NULL = gpu_prices

-- One row per machine the fleet asked a provider for. Outlives its node row (the registry deletes old rows).
CREATE TABLE fleet_machines (
    name             text PRIMARY KEY,                -- = nodes.name once it registers
    region           text NOT NULL,
    model            text NOT NULL,
    provider         text NOT NULL,                   -- 'local', 'skypilot'
    machine_id       text NOT NULL DEFAULT '',        -- the provider's handle (SkyPilot cluster name, local pid)
    spot             boolean NOT NULL,
    gpu_type         text NOT NULL,
    price_microdollars_per_hour bigint NOT NULL DEFAULT 0,
    state            text NOT NULL DEFAULT 'provisioning'
                     CHECK (state IN ('provisioning', 'registering', 'running', 'terminating', 'terminated', 'failed')),
    reason           text NOT NULL DEFAULT '',
    replaces         text,                            -- the evicted / unregistered machine this one replaces
    claimed_by       text NOT NULL,                   -- the autoscaler replica that launches it
    launched_at      timestamptz NOT NULL DEFAULT now(),
    state_changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX fleet_machines_pool_idx ON fleet_machines (region, model) WHERE state <> 'terminated';

-- Fleet policy per (region, model) pool: rows exist only for pools the fleet manages. Validated by the CLI and
-- again by every autoscaler replica before use (a rejected row is reported in fleet_policy_status and skipped:
-- the pool keeps its last accepted policy).
CREATE TABLE fleet_policy (
    region           text NOT NULL REFERENCES regions(region_id),
    model            text NOT NULL REFERENCES models(model_id),
    min_nodes        integer NOT NULL DEFAULT 1,
    max_nodes        integer NOT NULL DEFAULT 4,
    reserved_tokens_per_sec integer NOT NULL DEFAULT 0,   -- reserved CUs sold in this pool (1 CU = 1 token/s)
    target_load      double precision NOT NULL DEFAULT 0.7, -- wanted mean node load (0..1)
    queue_capacity   integer NOT NULL DEFAULT 4,        -- waiting requests per node counted as full load
    scale_up_after_s double precision NOT NULL DEFAULT 30, -- pressure must last this long
    scale_down_after_s double precision NOT NULL DEFAULT 300,
    cooldown_s       double precision NOT NULL DEFAULT 120, -- after any scaling action, before the next
    register_deadline_s double precision NOT NULL DEFAULT 900,
    retry_base_s     double precision NOT NULL DEFAULT 30,  -- failed launch: doubles, capped at 32x
    spot             boolean NOT NULL DEFAULT true,
    on_demand_fallback boolean NOT NULL DEFAULT true,
    cloud            text NOT NULL DEFAULT 'aws',
    cloud_region     text NOT NULL DEFAULT '',          -- the cloud's own region name ('' = the provider picks)
    gpu_type         text NOT NULL DEFAULT 'L4',
    accelerators     text NOT NULL DEFAULT 'L4:1',
    engine           text NOT NULL DEFAULT 'vllm',
    node_tokens_per_sec integer NOT NULL DEFAULT 0,     -- expected capacity of one node; 0 = the model's
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, model)
);
CREATE TABLE fleet_policy_status (
    region           text NOT NULL,
    model            text NOT NULL,
    accepted         boolean NOT NULL,
    message          text NOT NULL,
    checked_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (region, model)
);

-- What the decision function remembers between ticks, whichever replica ran the last one.
CREATE TABLE fleet_pool_state (
    region           text NOT NULL,
    model            text NOT NULL,
    pressure_since   timestamptz,
    calm_since       timestamptz,
    last_scale_up_at timestamptz,
    last_scale_down_at timestamptz,
    launch_failures  integer NOT NULL DEFAULT 0,
    next_launch_at   timestamptz,
    spot_unavailable_until timestamptz,
    PRIMARY KEY (region, model)
);

-- FinOps: the price a provider quoted for a node is part of its lifetime (a price change opens a new one), and
-- terminated ends a lifetime like dead.
ALTER TABLE node_lifetimes ADD COLUMN microdollars_per_hour bigint;
CREATE OR REPLACE FUNCTION crosslogic_node_lifetimes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := clock_timestamp();
BEGIN
    IF TG_OP <> 'INSERT' THEN
        IF TG_OP = 'DELETE' OR NEW.status IN ('dead', 'terminated') OR OLD.status IN ('dead', 'terminated')
           OR (NEW.region, NEW.cloud, NEW.spot, NEW.gpu_type, NEW.model_list, NEW.price_microdollars_per_hour)
              IS DISTINCT FROM (OLD.region, OLD.cloud, OLD.spot, OLD.gpu_type, OLD.model_list,
                                OLD.price_microdollars_per_hour) THEN
            UPDATE node_lifetimes SET ended_at = greatest(started_at, at),
                   ended_by = CASE WHEN TG_OP = 'DELETE' THEN 'deleted' ELSE NEW.status_reason END
            WHERE node_id = OLD.node_id AND ended_at IS NULL;
        ELSE
            RETURN NULL;
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status NOT IN ('dead', 'terminated')
       AND NOT EXISTS (SELECT 1 FROM node_lifetimes WHERE node_id = NEW.node_id AND ended_at IS NULL) THEN
        INSERT INTO node_lifetimes (node_id, node_name, region, cloud, spot, gpu_type, model_list, started_at,
                                    microdollars_per_hour)
        VALUES (NEW.node_id, NEW.name, NEW.region, NEW.cloud, NEW.spot, NEW.gpu_type, NEW.model_list,
                CASE WHEN TG_OP = 'INSERT' THEN least(NEW.created_at, at) ELSE at END,
                NEW.price_microdollars_per_hour);
    END IF;
    RETURN NULL;
END $$;

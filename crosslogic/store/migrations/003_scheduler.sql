-- The scheduler (issue 4): agent-managed nodes, their liveness and load, and the routing policy.

ALTER TABLE nodes
    ADD COLUMN agent_managed   boolean NOT NULL DEFAULT false,  -- registered by `crosslogic agent`: heartbeats apply
    ADD COLUMN model_version   text NOT NULL DEFAULT '',
    ADD COLUMN status_reason   text NOT NULL DEFAULT '',
    ADD COLUMN status_changed_at timestamptz NOT NULL DEFAULT now();

-- Heartbeats and load, written every few seconds per node. Deliberately a separate table WITHOUT a
-- NOTIFY trigger: the scheduler reads it on its own tick, so heartbeats never cause a routing push.
CREATE TABLE node_load (
    node_id          uuid PRIMARY KEY REFERENCES nodes(node_id) ON DELETE CASCADE,
    last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
    engine_healthy   boolean NOT NULL DEFAULT true,  -- the agent's last /health probe of vLLM
    requests_running double precision NOT NULL DEFAULT 0,
    requests_waiting double precision NOT NULL DEFAULT 0,
    kv_cache_usage   double precision NOT NULL DEFAULT 0,
    generation_tokens_per_sec double precision NOT NULL DEFAULT 0,
    ttft_s           double precision NOT NULL DEFAULT 0,  -- mean TTFT over the last report interval
    ttft_baseline_s  double precision,               -- its moving average outside spikes (seed §22.2)
    metrics_at       timestamptz
);

-- Routing policy (seed §26-§27): one row per region, plus '*' = the default for every region.
-- Validated by the xDS process before anything is pushed; a rejected edit is reported in
-- routing_policy_status and Envoy keeps the last good configuration.
CREATE TABLE routing_policy (
    region           text PRIMARY KEY,               -- a region_id, or '*'
    pinning          text NOT NULL DEFAULT 'fallback', -- 'strict': never leave the region; 'fallback': chain
    spill_share      double precision NOT NULL DEFAULT 1.0, -- share of a region's traffic allowed to spill (§26.4)
    retries          integer NOT NULL DEFAULT 2,
    score_weights    jsonb NOT NULL DEFAULT '{"queue": 0.5, "kv_cache": 0.3, "throughput": 0.2}'::jsonb,
    queue_capacity   integer NOT NULL DEFAULT 16,     -- waiting requests at which the queue scorer reaches 0
    load_aware       boolean NOT NULL DEFAULT true,   -- false: every node keeps its static nodes.weight
    updated_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO routing_policy (region) VALUES ('*');

CREATE TABLE routing_policy_status (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    accepted         boolean NOT NULL,
    message          text NOT NULL,
    checked_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER routing_policy_notify AFTER INSERT OR UPDATE OR DELETE ON routing_policy
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_routing();

-- Every status change (agent, sweeper, admin CLI) stamps status_changed_at: drain and removal TTLs count from it.
CREATE FUNCTION crosslogic_node_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        NEW.status_changed_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER nodes_status_changed BEFORE UPDATE ON nodes
    FOR EACH ROW EXECUTE FUNCTION crosslogic_node_status_changed();

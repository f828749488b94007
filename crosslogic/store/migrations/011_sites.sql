-- Hybrid on-prem sites (issue 11): a site is one org's data centre with its own gateway and nodes. Its Envoy and
-- agents authenticate with a site certificate from the control-plane CA; a revoked certificate (or site) is cut
-- off by the xDS / NodeAgent site listener, which re-checks these rows per stream (NOTIFY on crosslogic_routing).

CREATE TABLE sites (
    site_id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES orgs(org_id),
    name             text NOT NULL UNIQUE,
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    -- The org's requests at this site may spill onto the cloud's shared pool when its own nodes are down.
    cloud_spill      boolean NOT NULL DEFAULT true,
    -- Where the site gateway's listener binds, on the site's machine (its Envoy gets the listener over xDS).
    gateway_host     text NOT NULL DEFAULT '0.0.0.0',
    gateway_port     integer NOT NULL DEFAULT 8443 CHECK (gateway_port BETWEEN 1 AND 65535),
    created_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz
);
CREATE INDEX sites_org_idx ON sites (org_id);

-- Every certificate issued to a site (serial as hex): rotation issues a new one while the old stays valid until
-- its own not_after, so a site swaps certificates without downtime; revocation sets revoked_at.
CREATE TABLE site_certificates (
    serial           text PRIMARY KEY,
    site_id          uuid NOT NULL REFERENCES sites(site_id),
    not_after        timestamptz NOT NULL,
    issued_at        timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz
);
CREATE INDEX site_certificates_site_idx ON site_certificates (site_id);

-- A node at a site (NULL = the cloud's pools). Site nodes are never in a cloud gateway's snapshot: they are
-- on the site's LAN, and only that site's gateway routes to them.
ALTER TABLE nodes ADD COLUMN site_id uuid REFERENCES sites(site_id);
CREATE INDEX nodes_site_idx ON nodes (site_id) WHERE site_id IS NOT NULL;

CREATE TRIGGER sites_notify AFTER INSERT OR UPDATE OR DELETE ON sites
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_routing();
CREATE TRIGGER site_certificates_notify AFTER INSERT OR UPDATE OR DELETE ON site_certificates
    FOR EACH STATEMENT EXECUTE FUNCTION crosslogic_notify_routing();

-- Flat licences (air-gapped installs): every licence file installed, by its id; the token allowance is counted
-- against usage_records of the licence's org since valid_from.
CREATE TABLE licenses (
    license_id       text PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES orgs(org_id),
    body             jsonb NOT NULL,
    installed_at     timestamptz NOT NULL DEFAULT now()
);

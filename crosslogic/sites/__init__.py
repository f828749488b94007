"""On-prem sites (docs/sites.md): bundles, the site process (local ext_authz, usage spool) and the cloud's site API."""

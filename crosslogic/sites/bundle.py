"""Site bundles: one .tar.gz with everything a site needs and nothing of any other org (docs/sites.md).

Contents (every file 0600, read by `crosslogic site up`):
  site.json            the site's settings (sites/run.py SiteConfig): ids, the cloud's site endpoints, local ports
  tls/ca.pem           the control plane's CA (the cloud's listeners are verified against it)
  tls/node.pem, .key   the site certificate (SPIFFE URI SAN with the org and site): the gateway's xDS stream, the
                       site process's sync and usage push, and the node agents' NodeAgent calls
  envoy-bootstrap.yaml the site gateway's Envoy bootstrap (paths relative to the bundle directory)
  agent.args           the node-agent settings for the site's GPU machines
  README.md            the start commands
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

from crosslogic import pki
from crosslogic.runtime.envoy import BootstrapParams, render_bootstrap
from crosslogic.sites.run import CONFIG_FILE, SiteConfig

MEMBER_MODE = 0o600


def site_params(config: SiteConfig, tls_dir: str) -> BootstrapParams:
    """The site gateway's bootstrap: xDS from the cloud's site listener over mTLS, everything else on loopback."""
    host, _, port = config.cloud_xds_address.rpartition(":")
    return BootstrapParams(
        node_id=f"site-{config.site_name}", admin_port=config.envoy_admin_port, xds_port=int(port),
        authz_port=config.authz_port, accounting_port=config.als_port, api_port=config.api_port,
        ratelimit_port=config.authz_port, release_port=config.authz_port, authz_transport="http",
        xds_host=host, xds_tls_dir=tls_dir)


def site_bootstrap(config: SiteConfig, tls_dir: str) -> str:
    return render_bootstrap(site_params(config, tls_dir))


def _readme(config: SiteConfig) -> str:
    control_plane = config.cloud_xds_address
    return f"""# CrossLogic site `{config.site_name}`

This bundle runs the site gateway of one organization ({config.org_id}) on this machine: an Envoy whose routes and
node pools come from the cloud over mutual TLS (this site's certificate, `tls/`), and the site process beside it
(local authorisation for this organization's keys, and a durable usage spool delivered to the cloud ledger).
Keep it private: `tls/node.key` is this site's identity (every file is mode 0600).

## Start the site (a machine with only the `crosslogic[server]` wheel installed)

    crosslogic site up {config.site_name}.tar.gz --dir ./site-{config.site_name}

The gateway listens on port {config.gateway_port}; clients use `http://THIS-HOST:{config.gateway_port}/v1` with their
organization's API keys. Keys of other organizations are refused (403).

## Start a node agent on each GPU machine of the site

Copy `tls/` to the machine, then (the shared arguments are also in `agent.args`):

    crosslogic agent --control-plane {control_plane} --tls-dir ./tls --reserved-org {config.org_id} \\
        --cloud onprem --name NODE --region REGION --model MODEL --advertise NODE-LAN-IP:PORT

Agents dial out to the cloud; no inbound port on a worker is needed.

## Certificates

Rotation: `crosslogic site rotate {config.site_name} --out DIR` in the cloud writes a new certificate (the old one stays
valid until it expires); copy `node.pem` and `node.key` into `tls/` and restart `crosslogic site up`.
Revocation: `crosslogic site revoke {config.site_name}` cuts the site off within seconds.
"""


def _agent_args(config: SiteConfig) -> str:
    return (f"# `crosslogic agent` arguments every node of site {config.site_name} shares (add --name, --region, "
            "--model, --advertise)\n"
            f"--control-plane {config.cloud_xds_address} --tls-dir tls --reserved-org {config.org_id} --cloud onprem\n")


def build_bundle(config: SiteConfig, ca_cert_pem: bytes, site_cert: pki.Issued) -> bytes:
    files = {
        CONFIG_FILE: json.dumps(asdict(config), indent=2).encode(),
        "tls/ca.pem": ca_cert_pem,
        "tls/node.pem": site_cert.cert_pem,
        "tls/node.key": site_cert.key_pem,
        "envoy-bootstrap.yaml": site_bootstrap(config, "tls").encode(),
        "agent.args": _agent_args(config).encode(),
        "README.md": _readme(config).encode(),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        now = time.time()
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), MEMBER_MODE, now
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_bundle(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def extract_bundle(bundle: Path, directory: Path) -> SiteConfig:
    """Unpacks into `directory` (0700), refusing any member that is not a plain file of the expected names."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "tls").mkdir(mode=0o700, exist_ok=True)
    allowed = {CONFIG_FILE, "tls/ca.pem", "tls/node.pem", "tls/node.key", "envoy-bootstrap.yaml", "agent.args",
               "README.md"}
    with tarfile.open(bundle, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or member.name not in allowed:
                raise ValueError(f"unexpected member {member.name!r} in the bundle")
            source = tar.extractfile(member)
            assert source is not None
            target = directory / member.name
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(source.read())
    return SiteConfig.load(directory)

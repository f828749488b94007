"""Mutual TLS between Envoy and the control-plane services (production mode: CROSSLOGIC_INTERNAL_TLS_DIR).

One directory holds the internal CA's certificate and one identity per party, each `<name>.pem` + `<name>.key`:
a server certificate per service Envoy calls (xds, authz, accounting, ratelimit, api), with the URI SAN
`urn:crosslogic:service:<name>` that Envoy's cluster for it checks, and Envoy's client certificate
(`urn:crosslogic:service:envoy`). Every listener Envoy reaches then requires a client certificate signed by that
CA. The CA is the project's (pki.create_ca) but its own, not the node agents' one: a node certificate lives on a
GPU machine, possibly a customer's, and must not open ext_authz or the ADS port.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from crosslogic import pki
from crosslogic.runtime.grpc_server import server_credentials

SERVICES = ("xds", "authz", "accounting", "ratelimit", "api")
ENVOY = "envoy"
CA = "ca"
URI_PREFIX = "urn:crosslogic:service:"


def service_uri(name: str) -> str:
    return URI_PREFIX + name


@dataclass(frozen=True)
class Identity:
    """A party's certificate and key, and the CA its peers must be signed by (file paths)."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()


def identity(directory: str | Path, name: str) -> Identity:
    root = Path(directory)
    return Identity(root / f"{name}.pem", root / f"{name}.key", root / f"{CA}.pem")


def issue_internal(directory: Path, hosts: list[str], days: int = 90) -> None:
    """Creates the internal CA once and (re-)issues every identity: what `crosslogic up --internal-tls` does at
    each start, and what rotation is (docs/deploy.md). Each file is replaced by a rename, so a reader (Envoy's
    watched SDS directory) never sees half a certificate."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (directory / f"{CA}.pem").exists():
        pki.write(directory, CA, pki.create_ca("CrossLogic internal CA"))
    ca = pki.load_ca(directory)
    staging = directory / ".issuing"
    for name in (*SERVICES, ENVOY):
        issued = pki.issue_service(ca, service_uri(name), hosts, server=name != ENVOY, client=name == ENVOY,
                                   days=days)
        cert, key = pki.write(staging, name, issued)
        key.replace(directory / key.name)
        cert.replace(directory / cert.name)
    staging.rmdir()
    write_envoy_sds(directory)


# Envoy reads its client certificate and the CA through file-based SDS: each secret names its files and watches the
# directory, so a certificate renamed into place (issue_internal) is picked up without a restart or drain.
SDS_CERT, SDS_CA = "envoy-cert.sds.yaml", "envoy-ca.sds.yaml"
SDS_CERT_NAME, SDS_CA_NAME = "crosslogic_envoy_client", "crosslogic_internal_ca"
_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def write_envoy_sds(directory: Path) -> None:
    root = directory.resolve()
    envoy = identity(root, ENVOY)
    (root / SDS_CERT).write_text(
        f'resources:\n- "@type": {_SECRET}\n  name: {SDS_CERT_NAME}\n  tls_certificate:\n'
        f'    certificate_chain: {{filename: "{envoy.cert}"}}\n    private_key: {{filename: "{envoy.key}"}}\n'
        f'    watched_directory: {{path: "{root}"}}\n')
    (root / SDS_CA).write_text(
        f'resources:\n- "@type": {_SECRET}\n  name: {SDS_CA_NAME}\n  validation_context:\n'
        f'    trusted_ca: {{filename: "{envoy.ca}"}}\n    watched_directory: {{path: "{root}"}}\n')


def server_ssl_context(who: Identity) -> ssl.SSLContext:
    """An asyncio / aiohttp server context that requires a client certificate signed by the CA (TLS 1.2+)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(who.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(who.cert), str(who.key))
    return context


def grpc_credentials(who: Identity | None) -> grpc.ServerCredentials | None:
    """gRPC credentials requiring a client certificate from the CA; None (plain) without an identity."""
    if who is None:
        return None
    cert, key, ca = who.read()
    return server_credentials(cert, key, ca, require_client_cert=True)


def ssl_context_of(who: Identity | None) -> ssl.SSLContext | None:
    return server_ssl_context(who) if who is not None else None


def service_identity(tls_dir: str, name: str) -> Identity | None:
    """The service's identity when internal TLS is on (a directory is set), else None (plain, development)."""
    if not tls_dir:
        return None
    who = identity(tls_dir, name)
    missing = [str(p) for p in (who.cert, who.key, who.ca) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"internal TLS: missing {', '.join(missing)} (crosslogic up --internal-tls issues "
                                "them; see docs/deploy.md)")
    return who

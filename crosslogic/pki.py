"""The control plane's own certificate authority, for mutual TLS between node agents and the NodeAgent service.

A node certificate carries its scope as a URI SAN `urn:crosslogic:node-scope:<pool:CLOUD | org:ORG_ID>`;
the NodeAgent service reads it from the verified peer certificate, so a node can only register inside it.
A site certificate (an on-prem site's gateway and node agents, docs/sites.md) carries the SPIFFE-style URI SAN
`spiffe://crosslogic/org/<org_id>/site/<site_id>`; the site listener of the xDS process derives the identity from
it and checks the serial against `site_certificates` (revocation) on every stream and call.
Files in the PKI directory: ca.pem / ca.key (keep the key offline in production), server.pem / server.key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SCOPE_URI_PREFIX = "urn:crosslogic:node-scope:"
SPIFFE_PREFIX = "spiffe://crosslogic/"
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CrossLogic"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key, days: float) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days)))


def create_ca(common_name: str = "CrossLogic control plane CA", days: int = 3650) -> Issued:
    key = _key()
    cert = (_builder(common_name, _name(common_name), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _leaf(ca: Issued, common_name: str, sans: list[x509.GeneralName], usage: ExtendedKeyUsageOID | list,
          days: float) -> Issued:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = _key()
    cert = (_builder(common_name, ca_cert.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage if isinstance(usage, list) else [usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _host_sans(hosts: list[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def issue_server(ca: Issued, hosts: list[str], days: int = 825) -> Issued:
    return _leaf(ca, hosts[0], _host_sans(hosts), ExtendedKeyUsageOID.SERVER_AUTH, days)


def issue_service(ca: Issued, service_uri: str, hosts: list[str], *, server: bool, client: bool,
                  days: int = 90) -> Issued:
    """A control-plane identity (internal mutual TLS): a URI SAN naming the service (what the other side checks),
    the hosts it answers on, server and/or client use."""
    usages = [u for u, wanted in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client))
              if wanted]
    return _leaf(ca, service_uri, [x509.UniformResourceIdentifier(service_uri), *_host_sans(hosts)], usages, days)


def issue_node(ca: Issued, node_name: str, scope: str, days: int = 90) -> Issued:
    """`scope` is `pool:<cloud>` (serverless pool nodes of one cloud) or `org:<org_id>` (one org's lane)."""
    kind, _, value = scope.partition(":")
    if kind not in ("pool", "org") or not value:
        raise ValueError(f"node scope must be pool:<cloud> or org:<org_id>, not {scope!r}")
    return _leaf(ca, node_name, [x509.UniformResourceIdentifier(SCOPE_URI_PREFIX + scope)],
                 ExtendedKeyUsageOID.CLIENT_AUTH, days)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sans.get_values_for_type(x509.UniformResourceIdentifier)


def scope_of(cert_pem: bytes) -> str | None:
    """The node scope written in a (verified) certificate, or None."""
    for uri in _uri_sans(x509.load_pem_x509_certificate(cert_pem)):
        if uri.startswith(SCOPE_URI_PREFIX):
            return uri.removeprefix(SCOPE_URI_PREFIX)
    return None


@dataclass(frozen=True)
class SiteIdentity:
    """Who a verified site certificate speaks for; `serial` (hex) is what revocation is checked against."""

    org_id: str
    site_id: str
    serial: str

    @property
    def cache_key(self) -> str:
        return f"site:{self.site_id}:{self.serial}"


def site_uri(org_id: str, site_id: str) -> str:
    return f"{SPIFFE_PREFIX}org/{org_id}/site/{site_id}"


def issue_site(ca: Issued, org_id: str, site_id: str, days: float = 90) -> Issued:
    """A site's client certificate: its gateway's xDS stream and its node agents' NodeAgent calls."""
    return _leaf(ca, f"site-{site_id}", [x509.UniformResourceIdentifier(site_uri(org_id, site_id))],
                 ExtendedKeyUsageOID.CLIENT_AUTH, days)


def serial_of(cert_pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


def not_after_of(cert_pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def site_identity_of(cert_pem: bytes) -> SiteIdentity | None:
    """The site identity in a (verified) certificate's URI SAN, or None (a node-scope or server certificate)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    for uri in _uri_sans(cert):
        parts = uri.removeprefix(SPIFFE_PREFIX).split("/") if uri.startswith(SPIFFE_PREFIX) else []
        if len(parts) == 4 and parts[0] == "org" and parts[2] == "site" and parts[1] and parts[3]:
            return SiteIdentity(parts[1], parts[3], format(cert.serial_number, "x"))
    return None


def write(directory: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    """The certificate, and its private key 0600 from the first byte (in a folder created 0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.write_bytes(issued.cert_pem)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when an older version left the file readable
    with os.fdopen(fd, "wb") as f:
        f.write(issued.key_pem)
    return cert, key


def load_ca(directory: Path) -> Issued:
    return Issued((directory / CA_CERT).read_bytes(), (directory / CA_KEY).read_bytes())


def init_pki(directory: Path, server_hosts: list[str]) -> None:
    """Creates the CA (once) and a server certificate for the NodeAgent service."""
    if not (directory / CA_CERT).exists():
        write(directory, "ca", create_ca())
    write(directory, "server", issue_server(load_ca(directory), server_hosts))

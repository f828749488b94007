"""Who is on the other end of a site-listener call: the verified client certificate's site identity, still admitted
by the database (site active, certificate neither revoked nor expired). Used by ADS and NodeAgent alike."""

from __future__ import annotations

import grpc

from crosslogic import pki
from crosslogic.store import sites
from crosslogic.store.tenancy import Db


class IdentityRefused(Exception):
    """The peer has no site certificate, or one that no longer admits it."""


def peer_certificate(context: grpc.aio.ServicerContext) -> bytes:
    """The client certificate the mutual-TLS handshake verified (b"" on a plaintext port)."""
    return (context.auth_context().get("x509_pem_cert") or [b""])[0]


async def site_identity(context: grpc.aio.ServicerContext, db: Db) -> pki.SiteIdentity:
    pem = peer_certificate(context)
    identity = pki.site_identity_of(pem) if pem else None
    if identity is None:
        raise IdentityRefused("the client certificate carries no site identity")
    if not await sites.verify(db, identity):
        raise IdentityRefused(f"site certificate {identity.serial} is revoked or expired, or its site is revoked")
    return identity

"""Flat licences for air-gapped installs (docs/sites.md): a JSON file naming an org, its seats (active API keys),
its token allowance and its validity, signed with ed25519. The vendor keeps the signing key; an installation
trusts only the public key (CROSSLOGIC_LICENSE_PUBLIC_KEY), so a licence edited anywhere (the file, the
`licenses` table) no longer verifies and counts as none.

    {"license": {"license_id", "org_id", "org_name", "seats", "tokens", "valid_from", "expires_at", "issued_at"},
     "signature": "<base64 ed25519 signature of the canonical JSON of `license`>"}
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class LicenseInvalid(ValueError):
    pass


@dataclass(frozen=True)
class License:
    license_id: str
    org_id: str
    org_name: str
    seats: int  # active API keys the org may hold
    tokens: int  # prompt + completion tokens allowed from valid_from to expires_at
    valid_from: str  # ISO 8601, UTC
    expires_at: str
    issued_at: str

    @property
    def expires(self) -> datetime:
        return datetime.fromisoformat(self.expires_at)

    @property
    def starts(self) -> datetime:
        return datetime.fromisoformat(self.valid_from)


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """license-signing.key (0600: the vendor's secret) and license-signing.pub (what installations trust)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = directory / "license-signing.key", directory / "license-signing.pub"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def issue(signing_key_pem: bytes, org_id: str, org_name: str, seats: int, tokens: int, valid_from: datetime,
          expires_at: datetime) -> dict:
    if seats < 1 or tokens < 0 or expires_at <= valid_from:
        raise ValueError("a licence needs seats >= 1, tokens >= 0 and an expiry after its start")
    key = serialization.load_pem_private_key(signing_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an ed25519 key")
    body = asdict(License(str(uuid.uuid4()), org_id, org_name, seats, tokens, valid_from.astimezone(UTC).isoformat(),
                          expires_at.astimezone(UTC).isoformat(), datetime.now(UTC).isoformat()))
    return {"license": body, "signature": base64.b64encode(key.sign(_canonical(body))).decode()}


def verify(document: dict, public_key_pem: bytes) -> License:
    """The licence if its signature is the trusted key's; raises LicenseInvalid otherwise (expiry is not checked
    here: an expired licence is still a licence, refused at admission with its own error)."""
    key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise LicenseInvalid("the licence public key is not an ed25519 key")
    try:
        body, signature = document["license"], base64.b64decode(document["signature"], validate=True)
        key.verify(signature, _canonical(body))
        return License(**body)
    except InvalidSignature:
        raise LicenseInvalid("the signature does not match: the licence was altered or signed by another key") \
            from None
    except (KeyError, TypeError, ValueError) as exc:
        raise LicenseInvalid(f"not a licence file: {exc}") from None

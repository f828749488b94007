"""`POST /release`: frees a finished request's concurrency leases the moment its response ends.

Settlement frees them too, but only once the access log reached the accounting service (~100 ms later): a
client sending back-to-back requests at its concurrency limit was refused with nothing in flight. Envoy's Lua
filter (`envoy_assets/lua/usage.lua`) calls this endpoint for requests whose admission took a lease (ext_authz's
metadata `lease`), while it still holds the response's last bytes, so the client cannot send its next
request before the slot is free. Tokens are not touched: settlement still refunds or debits them exactly
once. Idempotent; a failed call only means the lease is freed at settlement, as before.

Body: `{"request_id", "org_id", "env_id", "key_id", "region"}` (JSON strings, from ext_authz's metadata).
Answers 200 `{"released": n}`, 400 for a malformed body, 503 when Valkey cannot be reached. Served by ext_authz's
HTTP server (http_transport.py) on the port of the HTTP transport, beside the checks (which Envoy sends under
contract.AUTHZ_CHECK_PREFIX, so no client path can reach this one).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from crosslogic.ratelimit.admission import release_leases
from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE
from crosslogic.ratelimit.engine import Limiter

log = logging.getLogger("crosslogic.extauthz")
_FIELDS = ("request_id", "org_id", "env_id", "key_id", "region")
MAX_BODY_BYTES = 4096  # a release body is ~200 bytes


@dataclass(frozen=True)
class LeaseRelease:
    request_id: str
    org_id: str
    env_id: str
    key_id: str
    region: str


def parse_release(body: bytes) -> LeaseRelease:
    """Raises ValueError unless the body is a JSON object with every field a non-empty string."""
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"the body must be at most {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body is not a JSON object")
    values = [data.get(name) for name in _FIELDS]
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"every one of {', '.join(_FIELDS)} must be a non-empty string")
    return LeaseRelease(*values)


class LeaseReleaser:
    """The endpoint's answer to one call; the HTTP framing is http_transport.py's."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def answer(self, body: bytes) -> tuple[int, dict]:
        try:
            what = parse_release(body)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        try:
            freed = await release_leases(self.limiter, what.org_id, what.env_id, what.key_id, what.region,
                                         what.request_id)
        except REDIS_UNAVAILABLE as exc:
            log.warning("cannot release the leases of %s yet (%s): settlement will", what.request_id, exc)
            return 503, {"error": "limiter unavailable"}
        return 200, {"released": freed}

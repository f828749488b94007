"""One check, whatever the transport: the decision (decision.py) with its last resorts, as a verdict.

Both transports (grpc_transport.py: Envoy's envoy.service.auth.v3.Authorization; http_transport.py: Envoy's
`http_service`) call a `Checker` and only translate its verdict into their wire format, so the guards here and
the failure budget around them (throttle.py) exist once.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from crosslogic import errors
from crosslogic.extauthz.decision import Allowed, Authorizer, Refused
from crosslogic.ratelimit.connect import REDIS_UNAVAILABLE
from crosslogic.store.db import POSTGRES_UNAVAILABLE

log = logging.getLogger("crosslogic.extauthz")


@dataclass(frozen=True, slots=True)
class Denied:
    """A refusal: OpenAI's error (status and JSON body), the headers the client gets with it (content-type is
    always application/json) and the metadata the access log records it with (limiter refusals carry it)."""

    error: errors.ClientError
    headers: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, object] = field(default_factory=dict)


Verdict = Allowed | Denied


def verdict_status(verdict: Verdict) -> int:
    return 200 if isinstance(verdict, Allowed) else verdict.error.status


class Checker(Protocol):
    async def check(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Verdict:
        """`peer`: the address of the client's connection to Envoy. Never raises: every outcome is a verdict."""
        ...


class GuardedAuthorizer:
    """`Authorizer.decide` with its last resorts, so Envoy always gets an answer in OpenAI's words: a backend
    outage is a 503, anything else unexpected a 500 (an RPC error or a dropped connection would become Envoy's
    own reply)."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def check(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Verdict:
        try:
            return await self.authorizer.decide(method, path, headers, body)
        except errors.ClientError as error:
            return Denied(error)
        except Refused as refused:
            return Denied(refused.error, refused.headers, refused.metadata)
        except (*POSTGRES_UNAVAILABLE, *REDIS_UNAVAILABLE) as exc:
            log.warning("authorisation backend unavailable: %s", exc)
            return Denied(errors.service_unavailable())
        except Exception as exc:  # noqa: BLE001 - the last resort: Envoy must always get an answer
            return Denied(unexpected(exc, method, path))


def unexpected(exc: BaseException, method: str, path: str) -> errors.ClientError:
    """A bug, not a client mistake: what the client's input could cause is answered as a 400 inside the decision
    (decision._validated), so what reaches here is our fault, answered as OpenAI's 500 and logged as one line
    naming where it happened (no traceback in the log, nothing internal in the reply)."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else "?"
    log.error("unexpected error deciding %.10s %.100s (%s: %.200s at %s); answered 500", method, path,
              type(exc).__name__, exc, place)
    return errors.internal_error()

"""The failure budget (abuse.py) around a check, for either transport: refuse a spamming client before any
expensive work."""

from __future__ import annotations

import math

from crosslogic import contract, errors
from crosslogic.extauthz.abuse import FailureBudget, forwarded_client
from crosslogic.extauthz.check import Checker, Denied, Verdict, verdict_status

# Refusals that cost the client's budget: the client's mistakes. Not 429 (a limit counted it already) nor
# 5xx (ours).
FAILURES = frozenset({400, 401, 403, 404, 413})
# Answers given only once the key authenticated (decision.py checks the key first): the credential is real.
AUTHENTICATED = frozenset({200, 400, 403, 404, 413, 429})


class ThrottledChecker:
    def __init__(self, inner: Checker, budget: FailureBudget, trusted_hops: int = 0) -> None:
        self.inner = inner
        self.trusted_hops = trusted_hops  # our proxies in front of Envoy (settings.xff_trusted_hops)
        self.budget = budget

    async def check(self, peer: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Verdict:
        if not self.budget.enabled:
            return await self.inner.check(peer, method, path, headers, body)
        # The connection's peer, or the x-forwarded-for entry our trusted hops point at: never a value the
        # client wrote itself (Envoy appended the peer).
        address = forwarded_client(peer, headers.get("x-forwarded-for", ""), self.trusted_hops)
        authorization = headers.get(contract.AUTHORIZATION_HEADER, "")
        client = self.budget.client(address, authorization)
        wait_ms = self.budget.retry_after_ms(client)
        if wait_ms:
            retry_after = max(1, math.ceil(wait_ms / 1000))
            return Denied(errors.too_many_failed_requests(retry_after), {"retry-after": str(retry_after)})
        verdict = await self.inner.check(peer, method, path, headers, body)
        status = verdict_status(verdict)
        if status in AUTHENTICATED:
            self.budget.proven(address, authorization)
        if status in FAILURES:
            self.budget.failed(self.budget.client(address, authorization))
        return verdict

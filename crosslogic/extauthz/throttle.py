"""The failure budget (abuse.py) around the Check call: refuse a spamming client before any expensive work."""

from __future__ import annotations

import math
from collections.abc import Callable

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from crosslogic import errors
from crosslogic.extauthz.abuse import FailureBudget, forwarded_client

# Refusals that cost the client's budget: the client's mistakes. Not 429 (a limit counted it already) nor
# 5xx (ours).
FAILURES = frozenset({400, 401, 403, 404, 413})
# Answers given only once the key authenticated (decision.py checks the key first): the credential is real.
AUTHENTICATED = frozenset({200, 400, 403, 404, 413, 429})


class ThrottledAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, inner: external_auth_pb2_grpc.AuthorizationServicer, budget: FailureBudget,
                 deny: Callable[..., external_auth_pb2.CheckResponse], trusted_hops: int = 0) -> None:
        self.inner = inner
        self.trusted_hops = trusted_hops  # our proxies in front of Envoy (settings.xff_trusted_hops)
        self.budget = budget
        self.deny = deny  # service.denied_response

    async def Check(self, request, context):  # noqa: N802 (gRPC name)
        if not self.budget.enabled:
            return await self.inner.Check(request, context)
        # The connection's peer, or the x-forwarded-for entry our trusted hops point at: never a value the
        # client wrote itself (Envoy appended the peer).
        headers = request.attributes.request.http.headers
        address = forwarded_client(request.attributes.source.address.socket_address.address,
                                   headers.get("x-forwarded-for", ""), self.trusted_hops)
        authorization = headers.get("authorization", "")
        client = self.budget.client(address, authorization)
        wait_ms = self.budget.retry_after_ms(client)
        if wait_ms:
            retry_after = max(1, math.ceil(wait_ms / 1000))
            return self.deny(errors.too_many_failed_requests(retry_after), {"retry-after": str(retry_after)})
        response = await self.inner.Check(request, context)
        status = response.denied_response.status.code if response.HasField("denied_response") else 200
        if status in AUTHENTICATED:
            self.budget.proven(address, authorization)
        if status in FAILURES:
            self.budget.failed(self.budget.client(address, authorization))
        return response

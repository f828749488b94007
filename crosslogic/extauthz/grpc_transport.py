"""Envoy's standard envoy.service.auth.v3.Authorization protocol (`grpc_service`) <-> check verdicts.

Any Envoy can use it (CROSSLOGIC_AUTHZ_TRANSPORT=grpc); the lean HTTP transport (http_transport.py) is the
default because a Python gRPC server costs ~0.5 ms of CPU per call whatever it does (docs/architecture.md).
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from crosslogic.extauthz.check import Checker, Denied, unexpected
from crosslogic.extauthz.decision import Allowed
from crosslogic.tracing import TRACEPARENT_HEADER

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def allowed_response(allowed: Allowed) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
    response.ok_response.headers.extend(_header(k, v) for k, v in allowed.headers.items())
    response.ok_response.headers_to_remove.extend(allowed.remove)
    response.ok_response.response_headers_to_add.extend(_header(k, v) for k, v in allowed.response_headers.items())
    response.dynamic_metadata.update(allowed.metadata)
    return response


def denied_response(denied: Denied) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED))
    answer = response.denied_response
    answer.status.code = denied.error.status
    answer.body = denied.error.body().decode()
    answer.headers.extend(_header(k, v) for k, v in {"content-type": "application/json", **denied.headers}.items())
    if denied.metadata:
        response.dynamic_metadata.update(denied.metadata)
    return response


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, checker: Checker) -> None:
        self.checker = checker

    async def Check(self, request, context):  # noqa: N802 (gRPC name)
        http = request.attributes.request.http
        headers = dict(http.headers)
        # Envoy's tracer puts the ext_authz call's trace context on the gRPC call, not in the client's headers.
        for key, value in (context.invocation_metadata() or ()) if context is not None else ():
            if key == TRACEPARENT_HEADER:
                headers[TRACEPARENT_HEADER] = value
        verdict = await self.checker.check(request.attributes.source.address.socket_address.address, http.method,
                                           http.path, headers, http.raw_body)
        try:
            return allowed_response(verdict) if isinstance(verdict, Allowed) else denied_response(verdict)
        except Exception as exc:  # noqa: BLE001 - e.g. a value protobuf cannot carry
            return denied_response(Denied(unexpected(exc, http.method, http.path)))

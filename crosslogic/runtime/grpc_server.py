"""One lifecycle for every gRPC service process: register servicers (and grpc.health.v1), listen, stop
gracefully."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import grpc

from crosslogic.runtime.grpc_health import add_health
from crosslogic.runtime.readiness import Readiness

log = logging.getLogger("crosslogic")


def server_credentials(cert: bytes, key: bytes, ca: bytes | None = None,
                       require_client_cert: bool = True) -> grpc.ServerCredentials:
    """TLS for a gRPC listener: its certificate chain and key (PEM); with `ca`, clients are verified against it,
    and with `require_client_cert` one is required (mutual TLS: internal hops, node agents, site links)."""
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=bool(ca) and require_client_cert)


@asynccontextmanager
async def grpc_server(listen: str, register: Callable[[grpc.aio.Server], None], name: str,
                      grace_s: float = 1.0, readiness: Readiness | None = None, services: Iterable[str] = (),
                      credentials: grpc.ServerCredentials | None = None) -> AsyncIterator[grpc.aio.Server]:
    """A started grpc.aio server on `listen` (insecure unless `credentials`: loopback or a private network);
    stopped on exit, letting in-flight calls finish for `grace_s`. With `readiness`, the server also answers
    grpc.health.v1 for "" and each of `services` (full gRPC service names) from those checks."""
    server = grpc.aio.server()
    register(server)
    if readiness is not None:
        add_health(server, readiness, services)
    if credentials is not None:
        server.add_secure_port(listen, credentials)
    else:
        server.add_insecure_port(listen)
    await server.start()
    log.info("%s listening on %s", name, listen)
    try:
        yield server
    finally:
        await server.stop(grace_s)

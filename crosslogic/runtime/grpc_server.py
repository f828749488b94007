"""One lifecycle for every gRPC service process: register servicers, listen, stop gracefully."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc

log = logging.getLogger("crosslogic")


@asynccontextmanager
async def grpc_server(listen: str, register: Callable[[grpc.aio.Server], None], name: str,
                      grace_s: float = 1.0) -> AsyncIterator[grpc.aio.Server]:
    """A started grpc.aio server on `listen` (insecure: loopback or a private network); stopped on exit,
    letting in-flight calls finish for `grace_s`."""
    server = grpc.aio.server()
    register(server)
    server.add_insecure_port(listen)
    await server.start()
    log.info("%s listening on %s", name, listen)
    try:
        yield server
    finally:
        await server.stop(grace_s)

"""`grpc.health.v1.Health` on every gRPC service, answered from the process's readiness checks.

Not the stock servicer (a status somebody must remember to set): every Check runs the real checks
(runtime/readiness.py), so SERVING means "Postgres answered a query and Valkey a PING just now". The overall
service ("") and each service name the process registered are known; any other name is NOT_FOUND, as the
protocol asks. Watch sends the status at once and again whenever it changes (checked every `watch_interval_s`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crosslogic.runtime.readiness import Readiness, all_ok

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, readiness: Readiness, services: Iterable[str] = (), watch_interval_s: float = 1.0) -> None:
        self.readiness = readiness
        self.services = {"", *services}
        self.watch_interval_s = watch_interval_s

    async def _status(self) -> int:
        return SERVING if all_ok(await self.readiness.run()) else NOT_SERVING

    async def Check(self, request, context):  # noqa: N802 (gRPC name)
        if request.service not in self.services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=await self._status())

    async def Watch(self, request, context):  # noqa: N802 (gRPC name)
        if request.service not in self.services:
            yield health_pb2.HealthCheckResponse(status=SERVICE_UNKNOWN)
            return
        last = None
        while True:
            status = await self._status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self.watch_interval_s)


def add_health(server: grpc.aio.Server, readiness: Readiness, services: Iterable[str]) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(ReadinessHealth(readiness, services), server)

"""The operator endpoints of one process, on its metrics port: `/metrics` (Prometheus), `/healthz` (alive),
`/readyz` (its dependencies answer: runtime/readiness.py).

A thread beside the service's event loop, like prometheus_client's own server: a scrape never waits for the
request path. `/healthz` and `/readyz` do go through the loop (the probe is scheduled on it), so a loop that is
stuck fails liveness instead of looking alive. Answers are JSON; 200 when alive / ready, 503 when not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prometheus_client
from prometheus_client.exposition import choose_encoder

from crosslogic.runtime.readiness import Readiness, all_ok

log = logging.getLogger("crosslogic")

# (ready, {check: {"ok", "detail"}}): what /readyz answers
Probe = Callable[[], tuple[bool, dict[str, dict]]]
LOOP_PROBE_TIMEOUT_S = 3.0


class _Handler(BaseHTTPRequestHandler):
    server: _OpsServer

    def do_GET(self) -> None:  # noqa: N802 (http.server name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.server.registry), content_type)
        elif path == "/healthz":
            alive = self.server.alive()
            self._json(200 if alive else 503, {"status": "alive" if alive else "stuck", "service": self.server.name})
        elif path == "/readyz":
            ready, checks = self.server.probe()
            self._json(200 if ready else 503, {"status": "ready" if ready else "not ready",
                                               "service": self.server.name, "checks": checks})
        else:
            self._json(404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]})

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
        return


class _OpsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], name: str, registry: prometheus_client.CollectorRegistry,
                 alive: Callable[[], bool], probe: Probe) -> None:
        super().__init__(address, _Handler)
        self.name, self.registry, self.alive, self.probe = name, registry, alive, probe


@contextmanager
def serve_ops(port: int, name: str, alive: Callable[[], bool], probe: Probe, host: str = "127.0.0.1",
              registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY) -> Iterator[None]:
    """Serves the three endpoints on host:port while the block runs; port 0 = none."""
    if not port:
        yield
        return
    server = _OpsServer((host, port), name, registry, alive, probe)
    thread = threading.Thread(target=server.serve_forever, name=f"{name}-ops", daemon=True)
    thread.start()
    log.info("%s: /metrics, /healthz, /readyz on http://%s:%d", name, host, port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=1.0)


def loop_probes(loop: asyncio.AbstractEventLoop, readiness: Readiness) -> tuple[Callable[[], bool], Probe]:
    """alive / ready callables for a thread, answered by coroutines on the service's `loop`."""

    def alive() -> bool:
        async def pong() -> bool:
            return True

        try:
            return asyncio.run_coroutine_threadsafe(pong(), loop).result(LOOP_PROBE_TIMEOUT_S)
        except (FutureTimeout, RuntimeError):  # stuck, or the loop is closing
            return False

    def probe() -> tuple[bool, dict[str, dict]]:
        try:
            results = asyncio.run_coroutine_threadsafe(readiness.run(), loop).result(LOOP_PROBE_TIMEOUT_S)
        except (FutureTimeout, RuntimeError):
            return False, {"event_loop": {"ok": False, "detail": "the service's event loop did not answer"}}
        return all_ok(results), {n: {"ok": r.ok, "detail": r.detail} for n, r in results.items()}

    return alive, probe


@asynccontextmanager
async def ops_server(port: int, name: str, readiness: Readiness, host: str = "127.0.0.1",
                     registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY
                     ) -> AsyncIterator[None]:
    """`serve_ops` for an asyncio service: probes run on the calling loop."""
    alive, probe = loop_probes(asyncio.get_running_loop(), readiness)
    with serve_ops(port, name, alive, probe, host, registry):
        yield


def add_health_routes(app, name: str, readiness: Readiness) -> None:
    """/healthz and /readyz on a service's own aiohttp app (the fleet service serves /metrics on its listen
    address), answered like serve_ops's."""
    from aiohttp import web

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "service": name})

    async def readyz(_request: web.Request) -> web.Response:
        results = await readiness.run()
        ready = all_ok(results)
        return web.json_response({"status": "ready" if ready else "not ready", "service": name,
                                  "checks": {n: {"ok": r.ok, "detail": r.detail} for n, r in results.items()}},
                                 status=200 if ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

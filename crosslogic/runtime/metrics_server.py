"""Prometheus /metrics of one service process (the default registry), on loopback like the other ports."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import prometheus_client

log = logging.getLogger("crosslogic")


@contextmanager
def metrics_server(port: int, name: str, host: str = "127.0.0.1") -> Iterator[None]:
    """Serves /metrics on host:port while the block runs; port 0 = no endpoint."""
    if not port:
        yield
        return
    server, thread = prometheus_client.start_http_server(port, host)
    log.info("%s metrics on http://%s:%d/metrics", name, host, port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=1.0)

"""Readiness of one service process for an orchestrator (deploy/kubernetes): its port answers and the stores it
cannot decide without answer too. `python -m crosslogic.runtime.probe --port 9001 --postgres --redis`; exit 0 =
ready, 1 = not (the reason on stderr).

Readiness, not liveness: a replica whose Postgres is away is taken out of its Service (Envoy's health checks see
the same through the TCP port only when the process is gone), but never restarted for it; the manifests' liveness
probe is the port alone.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from crosslogic.settings import Settings


def _port_answers(port: int, host: str = "127.0.0.1") -> None:
    with socket.create_connection((host, port), timeout=1.0):
        pass


async def _postgres(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=2.0)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def _redis(url: str, cluster: bool) -> None:
    from crosslogic.ratelimit.connect import redis_client

    client = redis_client(url, cluster, connect_timeout=1.0, timeout=1.0)
    try:
        await client.ping()
    finally:
        await client.aclose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crosslogic.runtime.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the service's own port (127.0.0.1)")
    parser.add_argument("--postgres", action="store_true", help="CROSSLOGIC_DATABASE_URL must answer SELECT 1")
    parser.add_argument("--redis", action="store_true", help="CROSSLOGIC_REDIS_URL must answer PING")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    try:
        _port_answers(args.port)
        if args.postgres:
            asyncio.run(_postgres(settings.require_database()))
        if args.redis:
            asyncio.run(_redis(settings.require_redis(), settings.redis_cluster))
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready", said in one line
        print(f"not ready: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

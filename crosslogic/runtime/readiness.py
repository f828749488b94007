"""What "ready" means for one process: named checks of its real dependencies, run on demand.

`/readyz` (runtime/ops_http.py) and `grpc.health.v1` (runtime/grpc_health.py) both ask the same `Readiness`:
every check runs at once, each bounded by a timeout, and the process is ready only when all pass. A check is a
coroutine that returns a short detail ("1 ADS stream") or raises; a dependency that hangs fails its check after
the timeout instead of hanging the probe.

Liveness (`/healthz`) is separate on purpose: a process whose Postgres is down is alive (it serves what it can,
degraded, and comes back by itself); restarting it would not bring Postgres back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Check = Callable[[], Awaitable[object]]
CHECK_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


class Readiness:
    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> Readiness:
        self.checks[name] = check
        return self

    async def _one(self, check: Check) -> CheckResult:
        try:
            detail = await asyncio.wait_for(check(), self.timeout_s)
        except TimeoutError:
            return CheckResult(False, f"no answer within {self.timeout_s:g}s")
        except Exception as exc:  # noqa: BLE001 - any failure of a dependency is "not ready", with its reason
            return CheckResult(False, f"{type(exc).__name__}: {exc}"[:300])
        return CheckResult(True, "ok" if detail is None or detail is True else str(detail))

    async def run(self) -> dict[str, CheckResult]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._one(self.checks[n]) for n in names))
        return dict(zip(names, results, strict=True))


def all_ok(results: dict[str, CheckResult]) -> bool:
    return all(r.ok for r in results.values())


def postgres_check(pool) -> Check:
    """A real query on the process's own pool (asyncpg): the connection it would use for its work."""

    async def check() -> str:
        await pool.fetchval("SELECT 1")
        return "SELECT 1 ok"

    return check


def redis_check(client) -> Check:
    """PING on the process's own redis-py client."""

    async def check() -> str:
        if not await client.ping():
            raise ConnectionError("PING not answered with PONG")
        return "PONG"

    return check

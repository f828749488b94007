"""Running a long-lived service process from the command line (no control-plane dependency: the node agent
uses it too)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


def run_service(make: Callable[[], Awaitable[None]]) -> int:
    """Runs one service until SIGTERM/SIGINT, then lets it shut down in order."""

    async def main() -> None:
        task = asyncio.ensure_future(make())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        import uvloop  # a faster event loop where available: the services' hot paths are loop-bound
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0

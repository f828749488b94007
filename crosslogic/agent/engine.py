"""Supervises the inference engine (vLLM or SGLang) command: start, restart with backoff, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from crosslogic.runtime.backoff import Backoff

__all__ = ["Backoff", "Engine"]
log = logging.getLogger("crosslogic.agent.engine")


class Engine:
    def __init__(self, argv: list[str], backoff: Backoff, stop_timeout_s: float = 30.0) -> None:
        self.argv = argv
        self.backoff = backoff
        self.stop_timeout_s = stop_timeout_s
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False

    async def supervise(self) -> None:
        """Runs the command until stop(); restarts it when it exits, waiting longer after each quick crash."""
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            self.process = await asyncio.create_subprocess_exec(*self.argv, start_new_session=True)
            code = await self.process.wait()
            if self._stopping:
                return
            failures = 1 if loop.time() - started >= self.backoff.healthy_after_s else failures + 1
            delay = self.backoff.delay(failures)
            log.warning("engine exited with %s; restarting in %.1f s", code, delay)
            self.restarts += 1
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout_s)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

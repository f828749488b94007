"""Holds the current snapshot and wakes every ADS stream when it changes."""

from __future__ import annotations

import asyncio

from crosslogic.xds.snapshot import Snapshot


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._watchers: set[asyncio.Queue[Snapshot]] = set()
        self._ready = asyncio.Event()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def wait_ready(self) -> Snapshot:
        await self._ready.wait()
        assert self._snapshot is not None
        return self._snapshot

    def set(self, snapshot: Snapshot) -> bool:
        """Install a snapshot; returns whether any resource type changed (and streams were woken)."""
        previous = self._snapshot
        self._snapshot = snapshot
        self._ready.set()
        if previous is not None and all(
            previous.version(t) == snapshot.version(t) for t in set(previous.types) | set(snapshot.types)
        ):
            return False
        for queue in self._watchers:
            # Only the newest snapshot matters: a slow stream skips the ones in between (coalescing).
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(snapshot)
        return True

    def watch(self) -> asyncio.Queue[Snapshot]:
        queue: asyncio.Queue[Snapshot] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[Snapshot]) -> None:
        self._watchers.discard(queue)

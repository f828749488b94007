"""Holds the current snapshot and wakes every ADS stream when it changes; `SiteCaches`: one cache per verified
site identity (go-control-plane's snapshot cache keyed by node), closed when that identity is revoked."""

from __future__ import annotations

import asyncio

from crosslogic.xds.snapshot import Snapshot


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._watchers: set[asyncio.Queue[Snapshot | None]] = set()
        self._ready = asyncio.Event()
        self.closed = False

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    async def wait_ready(self) -> Snapshot | None:
        """The first snapshot; None if the cache was closed before it had one."""
        await self._ready.wait()
        return None if self.closed else self._snapshot

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

    def watch(self) -> asyncio.Queue[Snapshot | None]:
        queue: asyncio.Queue[Snapshot | None] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(None)
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[Snapshot | None]) -> None:
        self._watchers.discard(queue)

    def close(self) -> None:
        """Ends every stream on this cache: each watcher receives None (its identity was revoked)."""
        self.closed = True
        self._ready.set()
        for queue in self._watchers:
            queue.put_nowait(None)


class SiteCaches:
    """One SnapshotCache per site certificate (`site:<site>:<serial>`), filled from its site's snapshot."""

    def __init__(self) -> None:
        self.by_identity: dict[str, tuple[str, SnapshotCache]] = {}  # key -> (site id, cache)
        self.site_snapshots: dict[str, Snapshot] = {}

    def cache_for(self, key: str, site_id: str) -> SnapshotCache:
        entry = self.by_identity.get(key)
        if entry is None or entry[1].closed:
            entry = (site_id, SnapshotCache())
            self.by_identity[key] = entry
            if site_id in self.site_snapshots:
                entry[1].set(self.site_snapshots[site_id])
        return entry[1]

    def update(self, snapshots: dict[str, Snapshot], admitted: set[str]) -> int:
        """Installs each site's snapshot in its identities' caches and closes those no longer `admitted` (keys of
        unrevoked, unexpired certificates of active sites); returns how many caches changed."""
        self.site_snapshots = snapshots
        changed = 0
        for key, (site_id, cache) in list(self.by_identity.items()):
            if key not in admitted or site_id not in snapshots:
                cache.close()
                del self.by_identity[key]
                changed += 1
            elif cache.set(snapshots[site_id]):
                changed += 1
        return changed

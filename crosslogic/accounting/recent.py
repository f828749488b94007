"""Request ids the gRPC fast path has committed to the ledger recently, so the durable backstop need not
write (and settle) them a second time.

Only a shortcut: the ledger's unique request id and the settle script's tombstone keep both paths exactly
once on their own. Bounded (oldest forgotten first) and in memory: after a restart it is empty and the
backstop simply does the full work again for the lines it replays.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class RecentIds:
    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add_many(self, ids: Iterable[str]) -> None:
        for request_id in ids:
            self._ids[request_id] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

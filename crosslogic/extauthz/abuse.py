"""A failure budget per client address: what stops spam of bad keys or bad payloads (seed §18, issue 9).

A refused request (401, 400, 404, 413, 403) never reaches a limit: limits are admitted only after the key
and the payload were checked, and those checks (HMAC, identity lookup, JSON parse of up to 1 MiB) are the
expensive part of a Check call. So each refusal takes one token from the client's bucket, and while the
bucket is empty the client's requests are refused with 429 before any of that work. Successes take nothing.

Whose bucket: the client address (an IPv6 address by its /64, which one host can hold entirely), split by
credential once the credential proved real: a key that authenticated from an address gets its own bucket
there, so a client whose key works is not throttled for the bad-key spam of a neighbour behind the same NAT,
and a valid key sending bad payloads drains only its own budget. Credentials are remembered by a salted
process-local hash, never in plain text.

In memory, per ext_authz process: the aim is to shed load cheaply, not to count exactly across replicas
(N replicas allow N budgets). Both tables are bounded; a client pushed out of them starts again full.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from crosslogic.ratelimit.buckets import Bucket, BucketState, adjust, full, refill, wait_ms

ClientKey = tuple[str, int | None]  # (address or /64, credential hash once it proved real)


def forwarded_client(peer: str, forwarded_for: str, trusted_hops: int) -> str:
    """The client as Envoy's `xff_num_trusted_hops` sees it. Envoy (use_remote_address) has appended the peer
    to x-forwarded-for, so with N trusted hops of ours in front the client is the (N+1)-th entry from the right;
    with fewer entries, or none trusted, the peer itself. ext_authz's source address is always the peer
    (measured), hence this."""
    if trusted_hops <= 0 or not forwarded_for:
        return peer
    hops = [part.strip() for part in forwarded_for.split(",")]
    return hops[-(trusted_hops + 1)] if len(hops) > trusted_hops else peer


def client_address(address: str) -> str:
    """The unit one client controls: an IPv4 address, or the /64 of an IPv6 one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # e.g. a unix socket path: one client
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False).network_address)
    return str(ip)


def credential_hash(authorization: str) -> int | None:
    # hash() of a str is salted per process (PYTHONHASHSEED): nobody outside can aim for a collision.
    return hash(authorization) if authorization else None


class FailureBudget:
    def __init__(self, burst: int, refill_per_s: float, *, max_clients: int = 100_000,
                 clock_ms: Callable[[], int] = lambda: time.monotonic_ns() // 1_000_000) -> None:
        """`burst` failures at once, refilled at `refill_per_s`; burst 0 turns the budget off."""
        self.enabled = burst > 0 and refill_per_s > 0
        self.bucket = Bucket(capacity=max(1, burst), window_ms=max(1, round(max(1, burst) * 1000 / max(
            refill_per_s, 1e-9))))
        self.max_clients = max_clients
        self.clock_ms = clock_ms
        self._levels: OrderedDict[ClientKey, BucketState] = OrderedDict()
        self._proven: OrderedDict[ClientKey, None] = OrderedDict()

    def client(self, address: str, authorization: str) -> ClientKey:
        """Whose budget a request from `address` with this Authorization header draws on."""
        own = (client_address(address), credential_hash(authorization))
        return own if own[1] is not None and own in self._proven else (own[0], None)

    def retry_after_ms(self, client: ClientKey) -> int:
        """0 when the client may go on; else how long until its next failure is allowed."""
        state = self._levels.get(client)
        if not self.enabled or state is None:
            return 0
        return wait_ms(self.bucket, refill(self.bucket, state, self.clock_ms()), 1)

    def failed(self, client: ClientKey) -> None:
        if not self.enabled:
            return
        now = self.clock_ms()
        state = adjust(self.bucket, self._levels.pop(client, None) or full(self.bucket, now), now, -1)
        self._levels[client] = state
        _bound(self._levels, self.max_clients)

    def proven(self, address: str, authorization: str) -> None:
        """The credential authenticated from this address: from now on it draws on a budget of its own."""
        fingerprint = credential_hash(authorization)
        if not self.enabled or fingerprint is None:
            return
        key = (client_address(address), fingerprint)
        self._proven[key] = None
        self._proven.move_to_end(key)
        _bound(self._proven, self.max_clients)


def _bound(table: OrderedDict, size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)  # the least recently touched client

"""CROSSLOGIC_REDIS_URL naming a Redis / Valkey primary through its Sentinels:

    redis+sentinel://[[user]:password@]host1[:26379][,host2[:26379],...]/<master-name>[/<db>]
        [?sentinel_username=...&sentinel_password=...]

The convention redis-sentinel-url, prefect-redis and docket accept (redis-py itself has no URL form for it):
members default to port 26379; the userinfo authenticates to the data nodes (primary and replicas); the
`sentinel_username` / `sentinel_password` options to the Sentinel daemons (which have their own `requirepass`).
TLS (`rediss+sentinel`) is not supported yet: refused here rather than silently sent in the clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

SCHEME = "redis+sentinel"
DEFAULT_PORT = 26379
Address = tuple[str, int]


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[Address, ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in (SCHEME, "rediss+sentinel")


def parse_sentinel_url(url: str) -> SentinelURL:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SCHEME:
        raise ValueError(f"not a {SCHEME}:// URL (rediss+sentinel is not supported)")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # `password@host`, as redis:// URLs are often written
            username, password = None, unquote(user)
    sentinels = tuple(_address(member) for member in hosts.split(",") if member)
    if not sentinels:
        raise ValueError(f"{SCHEME}:// URL names no Sentinel")
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"{SCHEME}:// URL path must be /<master-name>[/<db>]")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"{SCHEME}:// URL: database {parts[1]!r} is not a number")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(options) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(f"{SCHEME}:// URL: unsupported options {sorted(unknown)}")
    return SentinelURL(sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0, username, password,
                       options.get("sentinel_username"), options.get("sentinel_password"))


def _address(member: str) -> Address:
    if member.startswith("["):  # [ipv6]:port
        host, _, port = member[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = member.rpartition(":") if ":" in member else (member, "", "")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{SCHEME}:// URL: bad Sentinel address {member!r}")
    return host, int(port) if port else DEFAULT_PORT

"""Air-gapped mode (`crosslogic up --airgap`, docs/sites.md): no process of the platform opens a socket to anything
but this machine.

An audit hook (sys.addaudithook, PEP 578) sees every `socket.connect`, `socket.sendto` and `socket.getaddrinfo` of
the process, whatever library makes it (asyncpg, redis, aiohttp, grpc's Python side, stripe, urllib), and refuses
any whose address is not loopback with PermissionError before the call is made. `crosslogic up --airgap` sets
CROSSLOGIC_AIRGAP=1 for every child it starts, and each installs the hook first thing (commands.main). Envoy is
not Python: its connections go only to the clusters its bootstrap and xDS name, which in this mode are all local.

With CROSSLOGIC_AIRGAP_AUDIT_LOG set, every attempt (allowed or refused) is appended there as one JSON line, which
is how tests/test_airgap.py checks a whole run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys

_installed = False
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: object) -> bool:
    if not isinstance(host, str | bytes):
        return False
    name = host.decode() if isinstance(host, bytes) else host
    name = name.strip("[]").split("%", 1)[0]
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_of(event: str, args: tuple) -> object | None:
    """The remote host an event is about, or None when it concerns no internet address (a Unix socket)."""
    if event == "socket.getaddrinfo":
        return args[0] if args and args[0] is not None else "localhost"  # None: the local host
    sock, address = args[0], args[1]
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    return address[0] if isinstance(address, tuple) and address else address


def install(audit_log: str | None = None) -> None:
    """Installs the guard in this process (once; an audit hook cannot be removed)."""
    global _installed
    if _installed:
        return
    _installed = True
    log_fd = os.open(audit_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if audit_log else None

    def hook(event: str, args: tuple) -> None:
        if event not in ("socket.connect", "socket.sendto", "socket.getaddrinfo"):
            return
        host = _host_of(event, args)
        if host is None:
            return
        allowed = is_loopback(host)
        if log_fd is not None:
            line = json.dumps({"pid": os.getpid(), "event": event, "host": str(host), "allowed": allowed})
            os.write(log_fd, (line + "\n").encode())
        if not allowed:
            raise PermissionError(f"air-gapped mode: no connection to {host!s} (only this machine's loopback)")

    sys.addaudithook(hook)


def install_from_environment() -> bool:
    """The guard when CROSSLOGIC_AIRGAP is set (every child of `crosslogic up --airgap`)."""
    from crosslogic.settings import SupervisorSettings

    settings = SupervisorSettings()
    if not settings.airgap:
        return False
    install(settings.airgap_audit_log or None)
    return True

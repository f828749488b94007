"""Child processes with explicit lifecycles: start, wait until ready, stop cleanly."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LISTEN_PORTS_FLOOR = 20_000
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on, chosen BELOW the kernel's ephemeral range: a port from bind(0) lies inside it,
    and between this call and the child's bind any outgoing connection may take it as its local port
    (seen: Envoy's admin port "already in use" while tests opened thousands of client connections)."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(LISTEN_PORTS_FLOOR, low) if low - LISTEN_PORTS_FLOOR > 1_000 else 0
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _handed_out.add(port)
        return port
    raise OSError("no free port to listen on")


def reserve_port(port: int) -> None:
    """A port this process will use but did not get from free_port (e.g. `up --port`): never handed out."""
    _handed_out.add(port)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


class ChildProcess:
    """One supervised subprocess, its output appended to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        run_as: dict | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.run_as = run_as or {}
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen | None = None

    def start(self) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open_private(self.log_path, os.O_APPEND)  # logs may hold secrets (URLs, errors): owner only
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                **self.run_as,
                start_new_session=True,  # Ctrl-C in the terminal goes to the supervisor, which stops us in order
            )
        finally:
            os.close(log)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def kill_leftovers(self) -> None:
        """SIGKILLs what is left of the child's process group once the child itself has exited (the backends
        of a killed postmaster, an engine's workers): a restart must not find the old one's processes."""
        if self.proc is None or self.proc.poll() is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the child led its own session, so its group has its pid
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.running:
            return
        assert self.proc is not None
        try:
            self.proc.send_signal(self.stop_signal)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        except ProcessLookupError:
            pass
        self.kill_leftovers()

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(5)
        self.kill_leftovers()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def open_private(path: Path, flags: int = os.O_TRUNC) -> int:
    """A file descriptor for writing `path`, created 0600 and tightened to 0600 if it already existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_private(path: Path, text: str) -> None:
    """Writes `path` atomically, mode 0600 from the first byte (secrets: never readable by others, not even
    for a moment); the previous file is replaced whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def inherit_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env

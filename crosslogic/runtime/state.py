"""The state directory of `crosslogic up`: data of Postgres/Valkey, logs, the key secret, runtime.json.

runtime.json lets the admin CLI find the running stack without any environment variables; explicit
CROSSLOGIC_* variables always win.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import replace
from pathlib import Path

from crosslogic.settings import Settings

DEFAULT_STATE_DIR = Path(".state")
RUNTIME_FILE = "runtime.json"


def ensure_key_secret(state_dir: Path) -> str:
    """A per-installation HMAC secret, created once and reused so stored key hashes stay valid."""
    path = state_dir / "key_secret"
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


def write_runtime(state_dir: Path, info: dict) -> None:
    path = state_dir / RUNTIME_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


def read_runtime(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return {}


def resolve_settings(state_dir: Path | None = None) -> Settings:
    """Settings from the environment, filled in from a running `crosslogic up` state dir where unset."""
    settings = Settings()
    state_dir = state_dir or Path(os.environ.get("CROSSLOGIC_STATE_DIR", DEFAULT_STATE_DIR))
    runtime = read_runtime(state_dir)
    secret_file = state_dir / "key_secret"
    return replace(
        settings,
        database_url=settings.database_url or runtime.get("database_url", ""),
        redis_url=settings.redis_url or runtime.get("redis_url", ""),
        key_secret=settings.key_secret or (secret_file.read_text().strip() if secret_file.exists() else ""),
    )

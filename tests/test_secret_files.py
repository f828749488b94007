"""Secrets on disk: everything `crosslogic up` writes is its user's alone (files 0600, folders 0700), the ready
file with the demo key included; a state dir an older version left open is closed on the next start."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from crosslogic.runtime.state import secure_state_dir
from tests.conftest import repo_root


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _postgres_group() -> int | None:
    try:
        return grp.getgrnam("crosslogic_pg").gr_gid
    except KeyError:
        return None


def test_every_file_of_the_running_stack_is_private(gateway):
    state = Path(gateway["state_dir"])
    ready = state / "ready.json"
    assert gateway["api_key"] in ready.read_text()  # the file this is about: it holds the demo key
    # up.log is the test harness's capture of up's output, not up's file.
    files = [p for p in state.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "up.log"]
    names = {p.relative_to(state).as_posix() for p in files}
    for expected in ("ready.json", "runtime.json", "key_secret", "pki/ca.key", "pki/server.key",
                     "logs/authz.log", "usage/envoy-usage.jsonl", "logs/envoy-gateway-1.yaml"):
        assert expected in names, expected
    assert any(n.startswith("valkey/") for n in names) and any(n.startswith("postgres/pgdata/") for n in names)
    loose = {p.relative_to(state).as_posix(): oct(_mode(p)) for p in files if _mode(p) & 0o077}
    assert not loose, loose


def test_every_folder_of_the_running_stack_is_closed_to_others(gateway):
    """Only Postgres's own user may pass through (x, never read) the folders to its data dir, when the stack
    runs as root and Postgres as that user."""
    state = Path(gateway["state_dir"])
    pg_group = _postgres_group() if os.geteuid() == 0 else None
    for folder in [state, *(p for p in state.rglob("*") if p.is_dir() and not p.is_symlink())]:
        mode = _mode(folder)
        assert mode & 0o007 == 0, (folder, oct(mode))
        if mode & 0o070:
            assert mode & 0o070 == 0o010 and folder.stat().st_gid == pg_group, (folder, oct(mode))


def test_an_old_state_dir_left_open_is_closed(tmp_path):
    state = tmp_path / "state"
    (state / "pki").mkdir(parents=True)
    (state / "logs").mkdir()
    for name in ("runtime.json", "key_secret", "pki/ca.key", "logs/authz.log"):
        (state / name).write_text("secret")
        (state / name).chmod(0o644)
    for folder in (state, state / "pki", state / "logs"):
        folder.chmod(0o755)
    secure_state_dir(state)
    assert {p.relative_to(state).as_posix(): _mode(p) for p in state.rglob("*")} == {
        "runtime.json": 0o600, "key_secret": 0o600, "pki": 0o700, "pki/ca.key": 0o600, "logs": 0o700,
        "logs/authz.log": 0o600}
    assert _mode(state) == 0o700


def test_readme_says_where_the_demo_key_is_kept():
    readme = (repo_root() / "README.md").read_text()
    assert "runtime.json" in readme and "0600" in readme and "demo key" in readme.lower()

"""Disk cleanup of old model files (seed §45 item 9): a node that served other models before (an upgrade, a
re-purposed machine) keeps their weights until its disk fills and the next model download fails. The agent
removes what in the configured model directory does not belong to the model it serves now.

Kept: entries named after a served model (its plain name, its last path part, or the Hugging Face cache form
`models--org--name`), and anything modified within `min_age_s` (a download in progress, a model being staged
for an upgrade). `plan_cleanup` is pure; `clean_model_dir` applies it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("crosslogic.agent.disk")


@dataclass(frozen=True)
class Entry:
    name: str
    modified_at: float  # epoch seconds, the newest file inside
    size_bytes: int


def served_names(models: Iterable[str]) -> set[str]:
    names = set()
    for model in models:
        names |= {model, model.rsplit("/", 1)[-1], "models--" + model.replace("/", "--")}
    return names


def plan_cleanup(entries: list[Entry], models: Iterable[str], now: float, min_age_s: float) -> list[Entry]:
    """The entries to remove, largest first."""
    keep = served_names(models)
    doomed = [e for e in entries if e.name not in keep and now - e.modified_at >= min_age_s and
              not e.name.startswith(".")]
    return sorted(doomed, key=lambda e: (-e.size_bytes, e.name))


def _scan(path: Path) -> Entry:
    newest, size = path.lstat().st_mtime, 0
    if path.is_dir() and not path.is_symlink():
        for child in path.rglob("*"):
            info = child.lstat()
            newest = max(newest, info.st_mtime)
            size += info.st_size
    else:
        size = path.lstat().st_size
    return Entry(path.name, newest, size)


def clean_model_dir(directory: Path, models: Iterable[str], min_age_s: float) -> list[Entry]:
    """Removes old models' files from `directory`; returns what went."""
    if not directory.is_dir():
        return []
    entries = {p.name: p for p in directory.iterdir()}
    removed = []
    for entry in plan_cleanup([_scan(p) for p in entries.values()], models, time.time(), min_age_s):
        path = entries[entry.name]
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)
            continue
        log.info("removed old model files %s (%.1f MiB)", path, entry.size_bytes / 2**20)
        removed.append(entry)
    return removed

"""Atomic file writes: a reader (or a resumed run) never sees a half-written file, and the
temporaries of writes that were killed are recognised and removed at the next start."""
from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_temporaries"]


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# `.<name>.<12 hex digits>.tmp`: the temporary `atomic_write` writes beside `<name>`
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (no window for other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to create a temporary file beside `path`, fsync it, then rename it over
    `path` (an atomic replace on the same filesystem) and fsync the folder: a crash leaves either the
    old file or the new one, never a torn one. The file gets the mode of any newly created file
    (0666 less the umask), whatever mode the writer's library gave its temporary (safetensors: 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"))
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed `atomic_write` calls left in `folder` (only files named
    like ours, `.<name>.<12 hex>.tmp`); call it when nothing else is writing there (a run's start)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in sorted(folder.iterdir()) if _TEMPORARY.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale

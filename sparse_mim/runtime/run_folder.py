"""A run's output folder, shared by pretrain, finetune and bench: checked before any work starts, and
removed again when the run fails during start-up in a folder this invocation created.

    check_output_dir(path, ConfigError)           # one-line error if it cannot be created or written
    with RunFolder(path) as folder:               # start-up: builds, loads, writes config.yaml ...
        ...
        folder.started()                          # from here on the folder is the run's and stays

A folder that existed before the invocation (a run being resumed) is never removed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Type

__all__ = ["check_output_dir", "RunFolder", "run_started"]

_started = {"any": False}  # whether a run of this process got past its start-up (see run_started)


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (None when ``path`` exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            return missing
        missing = p
    return missing


def check_output_dir(path: str | os.PathLike, error: Type[Exception], key: str = "output_dir") -> None:
    """Raise ``error`` (one line, naming the path and the fix) unless ``path`` can be created and
    written to. Probes by creating the missing folders and a temporary file, and removes both again,
    so a refused run leaves nothing behind (under torchrun only rank 0, the one that writes, probes)."""
    path = Path(path).expanduser()
    fix = f"pass {key}=<a folder you can write>"
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = f"{key} is a file, not a folder: {p}" if p == path else \
                    f"{key}'s parent {p} is a file, not a folder"
                raise error(f"{where}; {fix}")
            break
    if os.environ.get("RANK", "0") != "0":
        return  # only rank 0 writes the run's files; probes of several ranks would remove each other's
    created = _first_missing(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise error(f"{key} {path} cannot be written ({why}: {e.filename or path}); {fix}") from None
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)


class RunFolder:
    """Start-up guard of one run's output folder: leaving the ``with`` block by an exception (an error,
    Ctrl-C) before ``started()`` removes the folders this invocation created; a folder that existed
    before is left alone. Inactive (never removes) on ranks other than 0."""

    def __init__(self, path: str | os.PathLike, active: bool = True):
        self.path = Path(path).expanduser()
        self.active = active
        self.created: Optional[Path] = None
        self.is_started = False

    def __enter__(self) -> "RunFolder":
        self.created = _first_missing(self.path.absolute())
        return self

    def started(self) -> None:
        """The run got past its start-up: its folder stays, whatever happens next."""
        self.is_started = True
        _started["any"] = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not self.is_started and self.active and self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        return False


def run_started() -> bool:
    """Whether a run of this process got past its start-up (so an interruption may have left files)."""
    return _started["any"]

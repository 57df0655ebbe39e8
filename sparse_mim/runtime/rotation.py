"""Step checkpoints: when one is due, the last ``keep`` kept, and the newest good one to resume from.

``checkpoint.pth`` is always the newest checkpoint (README commands and ``sparse-mim convert`` use
that name). With ``train.keep_checkpoints=K > 1`` the K-1 before it stay beside it as
``checkpoint_step<step>.pth``: just before a new ``checkpoint.pth`` replaces the old one, the old one
gets a second name (a hard link: no copy; a copy where links are not supported), and the oldest
beyond K are deleted. A crash at any moment leaves complete files only (every write is atomic).

On resume, ``checkpoint.pth`` is tried first, then the step files newest first; a file that cannot
be read (truncated, corrupt, foreign) is reported and skipped, never loaded in part.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .atomic import atomic_write
from .checkpoint import CHECKPOINT_NAME

__all__ = ["SaveSchedule", "step_checkpoint_name", "step_checkpoints", "keep_previous", "prune",
           "ResumePoint", "newest_good_checkpoint"]

_STEP_FILE = re.compile(r"checkpoint_step(\d+)\.pth")


def step_checkpoint_name(step: int) -> str:
    return f"checkpoint_step{int(step):07d}.pth"


def step_checkpoints(output_dir: Path) -> List[Tuple[int, Path]]:
    """``(step, path)`` of the kept older checkpoints, newest first."""
    found = []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            match = _STEP_FILE.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def keep_previous(output_dir: Path, step: int) -> Optional[Path]:
    """Give the current ``checkpoint.pth`` (of ``step``) its step name before it is replaced."""
    current, kept = Path(output_dir) / CHECKPOINT_NAME, Path(output_dir) / step_checkpoint_name(step)
    if not current.is_file():
        return None

    def link_or_copy(tmp: str) -> None:
        try:
            os.link(current, tmp)
        except OSError:  # filesystems without hard links
            shutil.copyfile(current, tmp)

    return atomic_write(kept, link_or_copy)  # replaces a stale file of that name


def prune(output_dir: Path, keep: int) -> List[Path]:
    """Delete the step checkpoints beyond the ``keep - 1`` newest (``checkpoint.pth`` is the keep-th)."""
    removed = []
    for _, path in step_checkpoints(output_dir)[max(keep - 1, 0):]:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class SaveSchedule:
    """Whether a checkpoint is due after a step: every ``every_steps`` steps and/or every
    ``every_minutes`` minutes since the last save (either one suffices; both None: never)."""

    def __init__(self, every_steps: Optional[int], every_minutes: Optional[float],
                 clock: Callable[[], float] = time.monotonic):
        self.every_steps, self.every_minutes, self.clock = every_steps, every_minutes, clock
        self.last = clock()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.every_minutes is not None and self.clock() - self.last >= 60.0 * self.every_minutes
        return by_steps or by_time

    def saved(self) -> None:
        self.last = self.clock()


@dataclass
class ResumePoint:
    path: Path
    checkpoint: Dict[str, Any]
    skipped: List[str]  # "<path>: <why>" for each newer file that could not be used

    @property
    def is_newest_name(self) -> bool:
        return self.path.name == CHECKPOINT_NAME


def newest_good_checkpoint(output_dir: Path, load: Callable[[Path], Dict[str, Any]]) -> Optional[ResumePoint]:
    """The newest checkpoint in ``output_dir`` that ``load`` reads (it raises ``ValueError`` for a
    bad file); None when there is none at all. Raises ``ValueError`` when every file is bad."""
    output_dir = Path(output_dir)
    candidates = [output_dir / CHECKPOINT_NAME] if (output_dir / CHECKPOINT_NAME).is_file() else []
    candidates += [path for _, path in step_checkpoints(output_dir)]
    skipped: List[str] = []
    for path in candidates:
        try:
            return ResumePoint(path, load(path), skipped)
        except ValueError as e:
            skipped.append(f"{path.name}: {e}")
    if skipped:
        raise ValueError(f"no usable checkpoint in {output_dir}:\n  - " + "\n  - ".join(skipped)
                         + "\nmove these files away to start afresh, or use another output_dir")
    return None

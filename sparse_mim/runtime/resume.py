"""Whether a checkpoint may continue under this run's settings and data, and the notes a resume prints.

A resumed run must see the same images in the same order: besides the settings a mode names, the
dataset size and the steps per epoch must match the checkpoint's (a folder that gained or lost
images would silently change every later batch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Type

__all__ = ["flatten", "check_resumable", "resume_position"]

#: What the sampler state of a checkpoint must share with the run that resumes it.
DATA_MUST_MATCH = ("dataset_size", "steps_per_epoch")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}``."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(ckpt: Mapping[str, Any], config: Mapping[str, Any], path: Path | str,
                    data_state: Mapping[str, int], must_match: Sequence[str], error: Type[Exception],
                    quiet: Sequence[str] = ()) -> List[str]:
    """Raise ``error`` (one message listing every clash) if ``ckpt`` cannot continue under ``config``
    and ``data_state`` (``dataset_size``, ``steps_per_epoch``); return the notes to print for
    settings that changed harmlessly (keys in ``quiet`` are not mentioned)."""
    old, new = flatten(ckpt["config"]), flatten(config)
    clashes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in must_match if old.get(k) != new.get(k)]
    saved = ckpt["rng"].get("sampler", {})
    clashes += [f"{k}: {saved.get(k)} -> {data_state[k]}" for k in DATA_MUST_MATCH if saved.get(k) != data_state[k]]
    if clashes:
        raise error(f"cannot resume {path}: these differ from the checkpoint's run (" + "; ".join(clashes)
                    + "). Restore them, or use a new output_dir")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in quiet]


def resume_position(step: int, total_steps: int, steps_per_epoch: int) -> str:
    """Where step ``step`` is: ``step 6 (end of epoch 3); at step 6 of 12, 6 to go`` (or ``(epoch 2,
    after batch 1)`` within an epoch)."""
    epoch, batch = divmod(step, steps_per_epoch)
    where = f"end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, after batch {batch}"
    return f"step {step} ({where}); at step {step} of {total_steps}, {max(total_steps - step, 0)} to go"

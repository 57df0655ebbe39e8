"""The resumable checkpoint every training run writes: its file name, its format strings, the
generators it carries, and how it is written (atomically) and read back (tensors only).

``checkpoint.pth``::

    {"format": PRETRAIN_FORMAT or FINETUNE_FORMAT,
     "model": the bare model's state_dict (no DDP prefix), "optimizer": optimizer state_dict,
     "epoch": completed epochs, "step": completed optimizer steps,
     "config": the run's config (plain dict), "arch": backbone name,
     "rng": {"torch", "cuda", "numpy", "python": rank 0's generators,
             "other_ranks": [the same for ranks 1, 2, ...],
             "sampler": {"seed", "epoch", "batch_in_epoch", "steps_per_epoch", "dataset_size"}},
     ...: what the mode adds (fine-tuning: "classes", "seconds")}

Everything in it loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from .atomic import atomic_write

__all__ = ["CHECKPOINT_NAME", "PRETRAIN_FORMAT", "FINETUNE_FORMAT", "rng_state", "set_rng_state", "rank_rng_state",
           "write_checkpoint", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pth"
PRETRAIN_FORMAT = "sparse-mim/pretrain-v1"
FINETUNE_FORMAT = "sparse-mim/finetune-v1"


# -- random number generators ----------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python generators, as plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
            "python": random.getstate()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def rank_rng_state(rng: Mapping[str, Any], rank: int) -> Optional[Mapping[str, Any]]:
    """The generators ``rank`` saved in a checkpoint's ``rng``, or None if that rank did not exist."""
    if rank == 0:
        return rng
    others = rng.get("other_ranks") or []
    return others[rank - 1] if rank - 1 < len(others) else None


# -- writing and reading ---------------------------------------------------------------------------
def write_checkpoint(output_dir: str | os.PathLike, fmt: str, *, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, epoch: int, step: int, config: Dict[str, Any], arch: str,
                     rng: Dict[str, Any], **extra: Any) -> Path:
    """Write ``output_dir/checkpoint.pth`` of format ``fmt``; ``model`` is the bare module (not the
    DDP wrapper), ``rng`` and ``extra`` see the module docstring."""
    ckpt = {"format": fmt, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": int(epoch), "step": int(step), "config": config, "arch": arch, "rng": rng, **extra}
    return atomic_write(Path(output_dir) / CHECKPOINT_NAME, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str | os.PathLike, fmt: str, kind: str) -> Dict[str, Any]:
    """Read a checkpoint of format ``fmt`` (a ``kind`` run's, named in errors) with tensors only, no
    arbitrary code; ``ValueError`` for a file that cannot be read or is of another format."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read the checkpoint {path}: {e}; move it away to start afresh") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a sparse-mim {kind} checkpoint (format {found!r}, expected "
                         f"{fmt!r}); use another output_dir")
    return ckpt

"""Pretraining checkpoints: one resumable file plus an encoder export, both written atomically.

``checkpoint.pth``::

    {"format": "sparse-mim/pretrain-v1",
     "model": SparK state_dict (no DDP prefix), "optimizer": optimizer state_dict,
     "epoch": completed epochs, "step": completed optimizer steps,
     "config": the run's config (plain dict), "arch": backbone name,
     "rng": {"torch", "cuda", "numpy", "python": rank 0's generators,
             "other_ranks": [the same for ranks 1, 2, ...],
             "sampler": {"seed", "epoch", "batch_in_epoch", "steps_per_epoch", "dataset_size"}}}

Everything in it loads with ``torch.load(..., weights_only=True)``. Beside it,
``encoder_<arch>.safetensors`` holds the encoder alone with timm's key names and metadata
``{"arch": ..., "key_names": "timm", "step": the checkpoint step it was exported at}``, ready for
``timm.create_model(arch).load_state_dict(..., strict=False)`` (no head).

Each file is written to a temporary file in the same folder, flushed to disk, then renamed over the
old one, so a crash or kill at any moment leaves either the previous file or the new one. A kill
between the two renames leaves an export older than the checkpoint: ``refresh_encoder_export`` (run at
every start) sees it by the step and exports again.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from sparse_mim.convert.reader import PRETRAIN_FORMAT as FORMAT
from sparse_mim.convert.writers import atomic_write

__all__ = ["FORMAT", "CHECKPOINT_NAME", "encoder_export_name", "rng_state", "set_rng_state", "rank_rng_state",
           "save_checkpoint", "save_encoder", "export_step", "refresh_encoder_export", "load_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pth"


def encoder_export_name(arch: str) -> str:
    """``encoder_<arch>.safetensors``, with ``:`` (``sparsify:resnet50``) spelled ``-``: a colon is not
    allowed in Windows file names and reads as a drive or remote in many tools."""
    return f"encoder_{arch.replace(':', '-')}.safetensors"


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


# -- writing ---------------------------------------------------------------------------------------
def save_encoder(encoder: torch.nn.Module, path: str | os.PathLike, arch: str, step: Optional[int] = None) -> Path:
    """The encoder's weights (timm names) as safetensors; ``step``: the checkpoint step they belong to."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    metadata = {"arch": arch, "key_names": "timm", **({"step": str(int(step))} if step is not None else {})}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def export_step(path: str | os.PathLike) -> Optional[int]:
    """The checkpoint step an encoder export records; None if it is missing, unreadable or has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # noqa: BLE001 -- any unreadable or foreign file counts as "no export"
        return None


def refresh_encoder_export(output_dir: str | os.PathLike, encoder: torch.nn.Module, arch: str,
                           step: int) -> Optional[str]:
    """Export ``encoder`` (loaded from the checkpoint at ``step``) unless the export already records
    ``step``; return a note saying what was replaced, or None when the export was current."""
    path = Path(output_dir) / encoder_export_name(arch)
    found = export_step(path)
    if found == step:
        return None
    was = ("missing" if not path.exists() else f"from step {found}" if found is not None
           else "unreadable or without a step")
    save_encoder(encoder, path, arch, step)
    return f"re-exported {path.name} from the checkpoint at step {step} (the export was {was})"


def save_checkpoint(output_dir: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, step: int, config: Dict[str, Any], arch: str, rng: Dict[str, Any]) -> Path:
    """Write ``checkpoint.pth`` and ``encoder_<arch>.safetensors`` into ``output_dir``.

    ``model`` is the bare SparK module (not the DDP wrapper); ``rng`` see the module docstring.
    """
    output_dir = Path(output_dir)
    ckpt = {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": int(epoch), "step": int(step), "config": config, "arch": arch, "rng": rng}
    path = atomic_write(output_dir / CHECKPOINT_NAME, lambda tmp: torch.save(ckpt, tmp))
    save_encoder(model.encoder, output_dir / encoder_export_name(arch), arch, step)
    return path


# -- reading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, fmt: str = FORMAT, kind: str = "pretraining") -> Dict[str, Any]:
    """Read a ``checkpoint.pth`` of format ``fmt`` (``save_checkpoint``'s by default; the fine-tuning
    run's too) with tensors only, no arbitrary code."""
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



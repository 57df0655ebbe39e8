"""Pretraining checkpoints: one resumable file plus an encoder export, both written atomically.

``checkpoint.pth`` is the run's resumable checkpoint (``sparse_mim.runtime.checkpoint``, format
``sparse-mim/pretrain-v1``, ``model`` the SparK / FCMAE state_dict). Beside it,
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
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from sparse_mim.runtime.atomic import atomic_write
from sparse_mim.runtime.checkpoint import PRETRAIN_FORMAT, load_checkpoint as load_run_checkpoint, write_checkpoint

__all__ = ["encoder_export_name", "save_checkpoint", "save_encoder", "export_step", "refresh_encoder_export",
           "load_checkpoint"]


def encoder_export_name(arch: str) -> str:
    """``encoder_<arch>.safetensors``, with ``:`` (``sparsify:resnet50``) spelled ``-``: a colon is not
    allowed in Windows file names and reads as a drive or remote in many tools."""
    return f"encoder_{arch.replace(':', '-')}.safetensors"


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

    ``model`` is the bare SparK / FCMAE module (not the DDP wrapper); ``rng`` see
    ``sparse_mim.runtime.checkpoint``.
    """
    path = write_checkpoint(output_dir, PRETRAIN_FORMAT, model=model, optimizer=optimizer, epoch=epoch, step=step,
                            config=config, arch=arch, rng=rng)
    save_encoder(model.encoder, Path(output_dir) / encoder_export_name(arch), arch, step)
    return path


# -- reading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a pretraining ``checkpoint.pth`` (tensors only, no arbitrary code); ``ValueError`` for a
    file that cannot be read or is not a pretraining checkpoint."""
    return load_run_checkpoint(path, PRETRAIN_FORMAT, "pretraining")

"""Checkpoint files -> their raw Python content: torch.save files (zip, or a plain pickle as older
torch wrote) and safetensors, recognised by their content, not their name. Pickles are read with
torch's restricted unpickler; a trusted file that names other Python objects falls back to the full
one with a warning."""
from __future__ import annotations

import argparse
import os
import pickle
import warnings
from pathlib import Path

import torch

from .errors import ConversionError

__all__ = ["ACCEPTED", "SAFE_CHECKPOINT_GLOBALS", "read_file"]

ACCEPTED = ("accepted: torch.save files (.pth/.pt: a sparse-mim or SparK checkpoint, or an encoder "
            "state_dict) and .safetensors files")


def _file_kind(path: Path) -> str:
    """"torch" (torch.save's zip, or a plain pickle as older torch wrote), "safetensors" (an 8-byte
    header length, then the JSON header), or a ConversionError naming what the file is not."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    what = "it is empty" if not head else f"it starts with {head[:12]!r}"
    raise ConversionError(f"{path} is not a torch or safetensors checkpoint ({what}); {ACCEPTED}")


def read_file(path: str | os.PathLike) -> tuple[object, str | None]:
    """The raw content of a checkpoint file and the arch its safetensors metadata records (if any);
    a missing, foreign or unreadable file raises ConversionError."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    kind = _file_kind(path)
    try:
        if kind == "safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata.get("arch")
        return _torch_load(path), None
    except Exception as e:  # a corrupt or foreign file: say which, without a traceback
        raise ConversionError(f"could not read checkpoint {path}: {e}") from e


#: Python objects that checkpoints of well-known training scripts hold beside their tensors and that
#: the restricted unpickler may rebuild: the official MAE / ConvNeXt(-V2) / SparK scripts save their
#: `argparse.Namespace` under `args`.
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A checkpoint whose config holds arbitrary Python objects needs the full unpickler, which
        # can run code from the file. Fall back only for a readable checkpoint that names such
        # objects (a corrupt file fails here and is reported as unreadable).
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not unsafe:
            raise
        warnings.warn(
            f"{path} holds Python objects beyond tensors and plain containers "
            f"({', '.join(unsafe[:5])}); loading it with weights_only=False "
            "(only do this for checkpoints you trust)",
            stacklevel=4,
        )
        return torch.load(path, map_location="cpu", weights_only=False)

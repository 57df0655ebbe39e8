"""Write converted weights so a reader never sees a half-written file."""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from sparse_mim.runtime.atomic import atomic_write

from .errors import ConversionError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: copy the second and later sharers."""
    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """`.pth`/`.pt`: a plain torch.save of the state_dict (loads straight into the target model);
    `.safetensors`: the tensors plus string `metadata` (e.g. the arch)."""
    suffix = Path(path).suffix
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = _unshared(state_dict)
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if suffix in (".pth", ".pt"):
        return atomic_write(path, lambda tmp: torch.save(dict(state_dict), tmp))
    raise ConversionError(
        f"cannot tell the file format from {str(path)!r}: use one of {', '.join(STATE_DICT_SUFFIXES)}"
    )


# Protocol 4: the highest that every Python >= 3.8 reads (Detectron2 users may run older stacks).
PICKLE_PROTOCOL = 4


class _PortablePickler(pickle.Pickler):
    """Writes numpy arrays as ``numpy.ndarray(shape, dtype string, bytearray of the data)``: names that
    numpy 1.x and 2.x both have. numpy 2's own reduction refers to ``numpy._core``, which numpy 1.x
    cannot import ("No module named 'numpy._core'"). The bytearray keeps the loaded array writable."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray and not obj.dtype.hasobject:
            # tobytes() is C order for any layout (np.ascontiguousarray would make 0-d arrays 1-d)
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(obj.tobytes(order="C")))
        return NotImplemented


def save_pickle(obj: object, path: str | os.PathLike) -> Path:
    """Pickle `obj` (plain containers and numpy arrays) so that numpy 1.x and 2.x both load it."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            _PortablePickler(f, protocol=PICKLE_PROTOCOL).dump(obj)

    return atomic_write(path, write)

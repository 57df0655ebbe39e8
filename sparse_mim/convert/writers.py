"""Write converted weights so a reader never sees a half-written file."""
from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .errors import ConversionError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to create a temporary file beside `path`, fsync it, then rename it over
    `path` (an atomic replace on the same filesystem) and fsync the folder: a crash leaves either the
    old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"))
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


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


def save_pickle(obj: object, path: str | os.PathLike) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)

    return atomic_write(path, write)

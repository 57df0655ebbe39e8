"""Write converted weights so a reader never sees a half-written file."""
from __future__ import annotations

import os
import pickle
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
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

"""Rules that tie several settings together, shared by ``pretrain``, ``finetune`` and ``bench``.

A single value's type and range is the schema's job (``sparse_mim.config_schema``); a rule here needs
two settings, the machine (CUDA, MinkowskiEngine) or the file system. Each returns the one-line
messages of what is wrong, worded with the command's own key names, so a command can report every
problem at once; ``raise_if`` turns them into the command's error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence, Type

from omegaconf import DictConfig, OmegaConf

from .config_schema import is_int, is_number

__all__ = ["missing_settings", "raise_if", "image_and_mask_errors", "crop_scale_errors", "batch_split_errors",
           "warmup_errors", "file_errors", "needs_cuda", "backend_errors"]


def missing_settings(cfg: DictConfig, example: str) -> str:
    """The error for required settings (``???`` in the YAML) not given, or ''."""
    missing = []

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif value == "???":
                missing.append(f"{prefix}{key}")

    walk(OmegaConf.to_container(cfg, resolve=False))
    if not missing:
        return ""
    return f"required setting(s) not given: {', '.join(missing)}; pass them as key=value, e.g. {example}"


def raise_if(errors: Sequence[str], error: Type[Exception], title: str = "invalid config") -> None:
    """Raise ``error`` naming the problem on one line, or listing several, one per line; a problem two
    checks found (the schema's choices and the engine's backend check) is listed once."""
    errors = list(dict.fromkeys(errors))
    if len(errors) == 1:
        raise error(f"{title}: {errors[0]}")
    if errors:
        raise error(f"{title}:\n  - " + "\n  - ".join(errors))


def image_and_mask_errors(size, ratios: Iterable, size_key: str, ratio_key: str) -> List[str]:
    """The image size must be a positive multiple of the 32-pixel patch; each mask ratio must leave at
    least one visible and one masked patch of that size's grid (SparK's rounding)."""
    from sparse_mim.spark.masking import check_mask_ratio

    errors = []
    size_ok = is_int(size) and size > 0 and size % 32 == 0
    if not size_ok:
        near = max(32, round(size / 32) * 32) if is_number(size) else 224
        errors.append(f"{size_key} must be a positive multiple of 32 (the patch size), got {size!r}; "
                      f"e.g. {size_key}={near}")
    for r in ratios:
        if not is_number(r):
            errors.append(f"{ratio_key}: {r!r} is not a number")
        elif not 0.0 < r < 1.0:
            errors.append(f"{ratio_key} must lie strictly between 0 and 1, got {r!r}")
        elif size_ok:
            try:
                check_mask_ratio(float(r), (size // 32) ** 2)
            except ValueError:
                errors.append(_mask_advice(size, float(r), size_key, ratio_key))
    return errors


def _mask_advice(size: int, ratio: float, size_key: str, ratio_key: str) -> str:
    """Why ``ratio`` leaves no visible or no masked patch at ``size``, and values that would work."""
    from sparse_mim.spark.masking import check_mask_ratio, len_keep

    def fits(s: int) -> bool:
        try:
            check_mask_ratio(ratio, (s // 32) ** 2)
            return True
        except ValueError:
            return False

    fit = next((s for s in range(size + 32, 32 * 65, 32) if fits(s)), None)
    larger = f"{size_key}={fit} or larger" if fit else "larger images"
    n = (size // 32) ** 2
    if n < 2:
        return (f"{size_key}={size} is a single 32x32 patch, which cannot be split into visible and masked "
                f"patches; use {larger}")
    if len_keep(n, ratio) < 1:
        return (f"{ratio_key}={ratio} leaves no visible patch of the {n} at {size_key}={size}; use "
                f"{ratio_key} <= {(n - 1) / n:.4g}, or {larger}")
    return (f"{ratio_key}={ratio} leaves no masked patch of the {n} at {size_key}={size}, so there is nothing to "
            f"reconstruct; use {ratio_key} >= {1 / n:.4g}, or {larger}")


def crop_scale_errors(scale, key: str) -> List[str]:
    """RandomResizedCrop's area range must be ``[low, high]`` with low <= high (each in (0, 1]: schema)."""
    if OmegaConf.is_list(scale) or isinstance(scale, (list, tuple)):
        if len(scale) == 2 and all(is_number(s) for s in scale) and scale[0] > scale[1]:
            return [f"{key} must be [low, high] with low <= high, got {list(scale)!r}; e.g. {key}=[0.2,1.0]"]
    return []


def batch_split_errors(batch, world_size: int, key: str = "train.batch_size") -> List[str]:
    """The global batch must divide evenly over the processes."""
    if is_int(batch) and batch >= 1 and batch % world_size:
        good = max(1, round(batch / world_size)) * world_size
        return [f"{key}={batch} is the global batch and must divide evenly over the {world_size} processes; "
                f"use e.g. {key}={good}"]
    return []


def warmup_errors(warmup, epochs) -> List[str]:
    """Pretraining's warmup must fit in its epochs."""
    if is_number(warmup) and is_int(epochs) and warmup > epochs:
        return [f"train.warmup_epochs must lie in [0, train.epochs={epochs}], got {warmup!r}"]
    return []


def file_errors(path, key: str, fix: str) -> List[str]:
    """A setting naming a file that is not there."""
    if path is not None and not Path(str(path)).expanduser().is_file():
        return [f"{key}={path}: no such file; {fix}"]
    return []


def needs_cuda(setting: str, on_cuda: bool, why: str, fix: str) -> List[str]:
    """A setting that only works on a CUDA device, asked for where none is used."""
    return [] if on_cuda else [f"{setting} needs a CUDA device ({why}); none is used here: {fix}"]


def backend_errors(backends: Iterable[str], on_cuda: bool, cuda_graph: bool = False) -> List[str]:
    """What stops each sparse backend from running here, one line each ([] for our own engine, which
    runs anywhere); the checks are the engine's own (``engine.backend.check_backend_usable``)."""
    from sparse_mim.engine.backend import BackendError, check_backend_usable

    errors = []
    for name in backends:
        try:
            check_backend_usable(str(name), device="cuda" if on_cuda else "cpu", cuda_graph=cuda_graph)
        except BackendError as e:
            errors.append(str(e))
    return errors

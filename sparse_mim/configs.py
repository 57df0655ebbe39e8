"""Where the Hydra configs live and how every command composes them.

The repository's top-level ``configs/`` folder is the source of truth. A development (editable)
install reads it in place; a regular install ships it as ``sparse_mim/_configs`` (see setup.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Type

from omegaconf import DictConfig

__all__ = ["config_dir", "compose", "is_int", "image_and_mask_errors"]


def config_dir() -> Path:
    repo = Path(__file__).resolve().parents[1] / "configs"
    return repo if repo.is_dir() else Path(__file__).resolve().parent / "_configs"


def compose(config_name: str, overrides: Sequence[str], error: Type[Exception], hint: str) -> DictConfig:
    """``configs/<config_name>.yaml`` with Hydra ``key=value`` overrides; failures raise ``error``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = config_dir()
    if not (folder / f"{config_name}.yaml").is_file():
        raise error(f"no config {config_name!r} in {folder}")
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3", job_name=f"sparse-mim-{config_name}"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise error(f"{e}\n(overrides are key=value with keys from {folder / config_name}.yaml{hint})") from None


def is_int(value) -> bool:
    """An integer config value (bools excluded: YAML's ``true`` is not a batch size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def image_and_mask_errors(size, ratios: Sequence, size_key: str, ratio_key: str) -> list[str]:
    """What is wrong with an image size and mask ratios, worded with the command's own key names.

    The size must be a positive multiple of the 32-pixel patch; each ratio must leave at least one
    visible and one masked patch of that size's grid (SparK's rounding).
    """
    from sparse_mim.spark.masking import check_mask_ratio

    errors = []
    size_ok = is_int(size) and size > 0 and size % 32 == 0
    if not size_ok:
        near = max(32, round(size / 32) * 32) if isinstance(size, (int, float)) and not isinstance(size, bool) else 224
        errors.append(f"{size_key} must be a positive multiple of 32 (the patch size), got {size!r}; "
                      f"e.g. {size_key}={near}")
    for r in ratios:
        if not isinstance(r, (int, float)) or isinstance(r, bool):
            errors.append(f"{ratio_key}: {r!r} is not a number")
        elif not 0.0 < r < 1.0:
            errors.append(f"{ratio_key} must lie strictly between 0 and 1, got {r!r}")
        elif size_ok:
            try:
                check_mask_ratio(float(r), (size // 32) ** 2)
            except ValueError as e:
                errors.append(f"{ratio_key}: {e} ({size_key}={size})")
    return errors

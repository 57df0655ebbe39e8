"""Where the Hydra configs live and how every command composes them.

The repository's top-level ``configs/`` folder is the source of truth. A development (editable)
install reads it in place; a regular install ships it as ``sparse_mim/_configs`` (see setup.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Type

from omegaconf import DictConfig

__all__ = ["config_dir", "compose", "is_int"]


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

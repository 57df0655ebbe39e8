"""The fine-tuning config (``configs/finetune.yaml``), composed like the pretraining one and checked
before anything is loaded."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

from omegaconf import DictConfig

from sparse_mim import config_rules as rules
from sparse_mim.config_schema import setting_errors
from sparse_mim.configs import compose
from sparse_mim.configs import ConfigError

__all__ = ["MODES", "compose_finetune_config", "validate_finetune_config", "effective_warmup"]

MODES = ("finetune", "linear", "knn")


def compose_finetune_config(overrides: Sequence[str] = ()) -> DictConfig:
    return compose("finetune", overrides, ConfigError, "")


def effective_warmup(warmup_epochs: float, epochs: int) -> Tuple[float, Optional[str]]:
    """``(warmup epochs used, note)``: a warmup not shorter than the run (the default 3 epochs in a first
    ``train.epochs=1`` try) would never reach the peak lr, so it is cut to half the run, and the note says so."""
    if warmup_epochs < epochs:
        return warmup_epochs, None
    used = epochs / 2
    return used, (f"train.warmup_epochs={warmup_epochs:g} is not shorter than the run (train.epochs={epochs}): "
                  f"warming up for {used:g} epoch{'s' if used != 1 else ''} (half the run) instead")


def validate_finetune_config(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ``ConfigError`` listing everything wrong with ``cfg`` (data folders are checked when read).

    Types were checked while composing (``FinetuneConfig``), ranges and choices here with the
    settings that go together."""
    import timm

    missing = rules.missing_settings(cfg, "data.path=/data/imagenette (a folder with train/ and val/ class folders)")
    if missing:
        raise ConfigError(missing)
    errors = setting_errors("finetune", cfg)
    if not timm.is_model(cfg.model):
        errors.append(f"model: {cfg.model!r} is not a timm model name")
    if cfg.weights is not None and not Path(str(cfg.weights)).expanduser().is_file():
        errors.append(f"weights: no file {str(cfg.weights)!r}; pass a checkpoint or encoder export, or "
                      f"weights=null for random init")
    batch, a = cfg.train.batch_size, cfg.augment
    errors += rules.crop_scale_errors(a.crop_scale, "augment.crop_scale")
    errors += rules.batch_split_errors(batch, world_size)
    if batch >= 1 and not batch % world_size and (a.mixup or a.cutmix) and (batch // world_size) % 2:
        errors.append(f"mixup/cutmix need an even batch per process, got {batch // world_size}; "
                      f"use an even train.batch_size / processes, or augment.mixup=0 augment.cutmix=0")
    rules.raise_if(errors, ConfigError)

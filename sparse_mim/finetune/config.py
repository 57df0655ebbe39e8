"""The fine-tuning config (``configs/finetune.yaml``), composed like the pretraining one and checked
before anything is loaded."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from sparse_mim.configs import compose, is_int
from sparse_mim.runtime.resume import flatten
from sparse_mim.train.config import ConfigError

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


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_finetune_config(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ``ConfigError`` listing everything wrong with ``cfg`` (data folders are checked when read)."""
    import timm

    missing = [k for k, v in flatten(OmegaConf.to_container(cfg, resolve=False)).items() if v == "???"]
    if missing:
        raise ConfigError(f"required setting(s) not given: {', '.join(missing)}; pass them as key=value, "
                          f"e.g. data.path=/data/imagenette (a folder with train/ and val/ class folders)")
    errors: List[str] = []
    if cfg.mode not in MODES:
        errors.append(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if not timm.is_model(cfg.model):
        errors.append(f"model: {cfg.model!r} is not a timm model name")
    if cfg.weights is not None and not Path(str(cfg.weights)).expanduser().is_file():
        errors.append(f"weights: no file {str(cfg.weights)!r}; pass a checkpoint or encoder export, or "
                      f"weights=null for random init")
    d, t, a = cfg.data, cfg.train, cfg.augment
    fraction = d.label_fraction
    if not _number(fraction) or not 0 < fraction <= 1:
        errors.append(f"data.label_fraction must lie in (0, 1] (e.g. 0.1 = 10% of each class), got {fraction!r}")
    if not is_int(d.img_size) or d.img_size < 32:
        errors.append(f"data.img_size must be an integer >= 32, got {d.img_size!r}")
    if not _number(d.crop_pct) or not 0 < d.crop_pct <= 1:
        errors.append(f"data.crop_pct must lie in (0, 1], got {d.crop_pct!r}")
    for key, value, low in (("data.num_workers", d.num_workers, 0), ("data.eval_batch_size", d.eval_batch_size, 1),
                            ("train.epochs", t.epochs, 1), ("train.eval_every", t.eval_every, 1),
                            ("train.log_every", t.log_every, 1), ("knn.k", cfg.knn.k, 1)):
        if not is_int(value) or value < low:
            errors.append(f"{key} must be an integer >= {low}, got {value!r}")
    batch = t.batch_size
    if not is_int(batch) or batch < 1:
        errors.append(f"train.batch_size must be a positive integer, got {batch!r}")
    elif batch % world_size:
        errors.append(f"train.batch_size={batch} is the global batch and must divide evenly over the "
                      f"{world_size} processes; use e.g. train.batch_size={max(1, round(batch / world_size)) * world_size}")
    elif (a.mixup or a.cutmix) and (batch // world_size) % 2:
        errors.append(f"mixup/cutmix need an even batch per process, got {batch // world_size}")
    for key, value in (("train.base_lr", t.base_lr), ("knn.temperature", cfg.knn.temperature)):
        if not _number(value) or value <= 0:
            errors.append(f"{key} must be > 0, got {value!r}")
    for key, value in (("train.min_lr", t.min_lr), ("train.warmup_lr", t.warmup_lr),
                       ("train.weight_decay", t.weight_decay), ("augment.reprob", a.reprob),
                       ("augment.mixup", a.mixup), ("augment.cutmix", a.cutmix)):
        if not _number(value) or value < 0:
            errors.append(f"{key} must be a number >= 0, got {value!r}")
    if not _number(t.warmup_epochs) or t.warmup_epochs < 0:
        errors.append(f"train.warmup_epochs must be a number >= 0 (a warmup not shorter than the run is cut to "
                      f"half of it), got {t.warmup_epochs!r}")
    if t.layer_decay is not None and (not _number(t.layer_decay) or not 0 < t.layer_decay <= 1):
        errors.append(f"train.layer_decay must be null or in (0, 1], got {t.layer_decay!r}")
    if not _number(t.drop_path_rate) or not 0 <= t.drop_path_rate < 1:
        errors.append(f"train.drop_path_rate must lie in [0, 1), got {t.drop_path_rate!r}")
    if t.clip_grad is not None and (not _number(t.clip_grad) or t.clip_grad <= 0):
        errors.append(f"train.clip_grad must be null or > 0, got {t.clip_grad!r}")
    if not _number(a.label_smoothing) or not 0 <= a.label_smoothing < 1:
        errors.append(f"augment.label_smoothing must lie in [0, 1), got {a.label_smoothing!r}")
    scale = a.crop_scale
    if not (OmegaConf.is_list(scale) and len(scale) == 2 and all(_number(s) for s in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        errors.append(f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))

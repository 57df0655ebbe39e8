"""The pretraining config: composed by Hydra from ``configs/`` and checked before anything runs.

``configs/`` is found by ``sparse_mim.configs`` (the repository's folder, or the installed copy), so
``sparse-mim pretrain key=value`` works from any folder and under torchrun.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf

from ..configs import compose, config_dir, image_and_mask_errors, is_int

__all__ = ["CONFIG_DIR", "ConfigError", "compose_config", "validate_config", "to_plain", "flatten", "resolve_grad_sync"]

CONFIG_DIR = config_dir()


class ConfigError(ValueError):
    """The config cannot work; raised before any training starts."""


def compose_config(overrides: Sequence[str] = (), config_name: str = "pretrain") -> DictConfig:
    """``configs/<config_name>.yaml`` with Hydra command-line ``overrides`` (``key=value``) applied."""
    presets = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "preset").glob("*.yaml")))
    return compose(config_name, overrides, ConfigError, f"; presets: {presets}")


def to_plain(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}``."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_grad_sync(train: Dict[str, Any]) -> str:
    """``train.grad_sync`` with ``auto`` decided: ``allreduce`` for a CUDA-graphed encoder, else ``ddp``."""
    if train.get("grad_sync", "auto") != "auto":
        return train["grad_sync"]
    return "allreduce" if train.get("cuda_graph") else "ddp"


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, message: str, errors: List[str]) -> None:
    if not ok:
        errors.append(message)


def validate_config(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ``ConfigError`` listing everything wrong with ``cfg`` for ``world_size`` processes.

    Checks the model name, image size, mask ratio, batch split and schedule numbers; the data path
    is checked when the dataset is built (also before training).
    """
    from backbones import create_backbone, is_backbone
    from backbones.registry import UnknownBackboneError
    from sparse_mim.data.tensor_decode import DECODERS

    from .distributed import GRAD_SYNCS
    from .methods import method_errors

    missing = [k for k, v in flatten(OmegaConf.to_container(cfg, resolve=False)).items() if v == "???"]
    if missing:
        raise ConfigError(f"required setting(s) not given: {', '.join(missing)}; pass them as key=value, "
                          f"e.g. data.path=/data/imagenet")

    errors: List[str] = []
    if not is_backbone(str(cfg.model)):
        try:
            create_backbone(cfg.model)
        except UnknownBackboneError as e:
            errors.append(f"model: {e}")

    errors += image_and_mask_errors(cfg.data.img_size, [cfg.mask_ratio], "data.img_size", "mask_ratio")
    errors += method_errors(cfg)
    scale = cfg.data.crop_scale
    _require(OmegaConf.is_list(scale) and len(scale) == 2 and all(_is_number(v) for v in scale)
             and 0 < scale[0] <= scale[1] <= 1, f"data.crop_scale must be two numbers 0 < low <= high <= 1, "
             f"e.g. [0.2,1.0], got {scale!r}", errors)
    errors += _backend_errors(cfg)

    t = cfg.train
    batch = t.batch_size
    if not is_int(batch) or batch < 1:
        errors.append(f"train.batch_size must be a positive integer, got {batch!r}")
    elif batch % world_size:
        good = max(1, round(batch / world_size)) * world_size
        errors.append(f"train.batch_size={batch} is the global batch and must divide evenly over the "
                      f"{world_size} processes; use e.g. train.batch_size={good}")
    _require(is_int(t.epochs) and t.epochs >= 1, f"train.epochs must be an integer >= 1, got {t.epochs!r}", errors)
    _require(t.max_steps is None or (is_int(t.max_steps) and t.max_steps >= 1),
             f"train.max_steps must be null or an integer >= 1, got {t.max_steps!r}", errors)
    _require(t.base_lr is None or (_is_number(t.base_lr) and t.base_lr > 0),
             f"train.base_lr must be null (the method's) or > 0, got {t.base_lr!r}", errors)
    _require(isinstance(t.warmup_epochs, (int, float)) and 0 <= t.warmup_epochs <= (t.epochs or 0),
             f"train.warmup_epochs must lie in [0, train.epochs={t.epochs}], got {t.warmup_epochs!r}", errors)
    _require(t.clip_grad is None or (isinstance(t.clip_grad, (int, float)) and t.clip_grad > 0),
             f"train.clip_grad must be null or > 0, got {t.clip_grad!r}", errors)
    _require(t.betas is None or (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas)),
             f"train.betas must be null or two numbers in [0, 1), got {t.betas!r}", errors)
    _require(is_int(cfg.data.num_workers) and cfg.data.num_workers >= 0,
             f"data.num_workers must be an integer >= 0, got {cfg.data.num_workers!r}", errors)
    _require(is_int(t.log_every) and t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every!r}",
             errors)
    _require(t.save_every_steps is None or (is_int(t.save_every_steps) and t.save_every_steps >= 1),
             f"train.save_every_steps must be null or an integer >= 1, got {t.save_every_steps!r}", errors)
    _require(t.save_every_minutes is None or (_is_number(t.save_every_minutes) and t.save_every_minutes > 0),
             f"train.save_every_minutes must be null or a number > 0, got {t.save_every_minutes!r}", errors)
    _require(is_int(t.keep_checkpoints) and t.keep_checkpoints >= 1,
             f"train.keep_checkpoints must be an integer >= 1, got {t.keep_checkpoints!r}", errors)
    decode = cfg.data.get("decode", "pil")
    if decode not in DECODERS:
        errors.append(f"data.decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    elif decode == "gpu" and not _cuda_available():
        errors.append("data.decode=gpu decodes JPEGs with nvJPEG on a CUDA device; none is available here: "
                      "use data.decode=tensor (the same decoding in the loader workers) or pil")
    wait = cfg.data.wait_warning
    _require(wait is None or (_is_number(wait) and 0 < wait < 1),
             f"data.wait_warning must be null or a share in (0, 1), e.g. 0.2, got {wait!r}", errors)
    _require(cfg.init_from is None or isinstance(cfg.init_from, str),
             f"init_from must be a file path or null, got {cfg.init_from!r}", errors)
    if isinstance(cfg.init_from, str) and not Path(cfg.init_from).expanduser().is_file():
        errors.append(f"init_from={cfg.init_from}: no such file; pass a checkpoint or state dict that "
                      f"`sparse-mim convert` reads")
    _require(cfg.drop_path_rate is None or 0 <= cfg.drop_path_rate < 1,
             f"drop_path_rate must be null or in [0, 1), got {cfg.drop_path_rate!r}", errors)
    _require(t.grad_sync in ("auto", *GRAD_SYNCS),
             f"train.grad_sync must be auto, {' or '.join(GRAD_SYNCS)}, got {t.grad_sync!r}", errors)
    if t.get("cuda_graph"):
        _require(_cuda_available(), "train.cuda_graph=true needs a CUDA device (CUDA graphs); "
                 "none is available here", errors)
        _require(world_size == 1 or t.grad_sync != "ddp",
                 "train.cuda_graph=true under several processes averages gradients after backward, outside "
                 "the graph: use train.grad_sync=auto or allreduce, not ddp", errors)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _backend_errors(cfg: DictConfig) -> List[str]:
    from sparse_mim.engine.backend import BackendError, check_backend_usable

    try:
        check_backend_usable(str(cfg.get("backend", "native")), device="cuda" if _cuda_available() else "cpu",
                             cuda_graph=bool(cfg.train.get("cuda_graph")))
    except BackendError as e:
        return [str(e)]
    return []

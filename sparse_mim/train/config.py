"""The pretraining config: composed by Hydra from ``configs/`` and checked before anything runs.

``configs/`` is found by ``sparse_mim.configs`` (the repository's folder, or the installed copy), so
``sparse-mim pretrain key=value`` works from any folder and under torchrun.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

from omegaconf import DictConfig

from .. import config_rules as rules
from ..config_schema import setting_errors
from ..configs import ConfigError, compose, config_dir, to_plain

__all__ = ["CONFIG_DIR", "ConfigError", "compose_config", "validate_config", "to_plain", "resolve_grad_sync"]

CONFIG_DIR = config_dir()


def compose_config(overrides: Sequence[str] = (), config_name: str = "pretrain") -> DictConfig:
    """``configs/<config_name>.yaml`` with Hydra command-line ``overrides`` (``key=value``) applied."""
    presets = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "preset").glob("*.yaml")))
    return compose(config_name, overrides, ConfigError, f"; presets: {presets}")


def resolve_grad_sync(train: Dict[str, Any]) -> str:
    """``train.grad_sync`` with ``auto`` decided: ``allreduce`` for a CUDA-graphed encoder, else ``ddp``."""
    if train.get("grad_sync", "auto") != "auto":
        return train["grad_sync"]
    return "allreduce" if train.get("cuda_graph") else "ddp"


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def validate_config(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ``ConfigError`` listing everything wrong with ``cfg`` for ``world_size`` processes.

    Types were checked while composing (``PretrainConfig``), ranges and choices here with the
    settings that go together; the data path is checked when the dataset is built (also before training).
    """
    from backbones import create_backbone, is_backbone
    from backbones.registry import UnknownBackboneError

    from .methods import method_errors

    missing = rules.missing_settings(cfg, "data.path=/data/imagenet")
    if missing:
        raise ConfigError(missing)
    errors = setting_errors("pretrain", cfg)
    if not is_backbone(str(cfg.model)):
        try:
            create_backbone(cfg.model)
        except UnknownBackboneError as e:
            errors.append(f"model: {e}")
    t, cuda = cfg.train, _cuda_available()
    errors += rules.image_and_mask_errors(cfg.data.img_size, [cfg.mask_ratio], "data.img_size", "mask_ratio")
    errors += method_errors(cfg)
    errors += rules.crop_scale_errors(cfg.data.crop_scale, "data.crop_scale")
    errors += rules.batch_split_errors(t.batch_size, world_size)
    errors += rules.warmup_errors(t.warmup_epochs, t.epochs)
    errors += rules.file_errors(cfg.init_from, "init_from", "pass a checkpoint or state dict that `sparse-mim convert` reads")
    if cfg.data.decode == "gpu":
        errors += rules.needs_cuda("data.decode=gpu", cuda, "nvJPEG decodes the JPEGs",
                                   "use data.decode=tensor (the same decoding in the loader workers) or pil")
    errors += rules.backend_errors([cfg.backend], cuda, cuda_graph=bool(t.cuda_graph))
    if t.cuda_graph:
        errors += rules.needs_cuda("train.cuda_graph=true", cuda, "CUDA graphs", "set train.cuda_graph=false")
        if world_size > 1 and t.grad_sync == "ddp":
            errors.append("train.cuda_graph=true under several processes averages gradients after backward, outside "
                          "the graph: use train.grad_sync=auto or allreduce, not ddp")
    rules.raise_if(errors, ConfigError)

"""SparK pretraining: schedules, LAMB, checkpoints, distributed helpers, the epoch loop and the run."""
from .checkpoint import CHECKPOINT_NAME, FORMAT, encoder_export_name, load_checkpoint, save_checkpoint
from .config import CONFIG_DIR, ConfigError, compose_config, validate_config
from .engine import NonFiniteLossError, train_one_epoch
from .optim import LAMB_BETAS, build_optimizer, lamb_betas
from .schedules import Schedule, apply_schedule, peak_lr
from .trainer import PretrainResult, pretrain

__all__ = ["CHECKPOINT_NAME", "FORMAT", "encoder_export_name", "load_checkpoint", "save_checkpoint", "CONFIG_DIR",
           "ConfigError", "compose_config", "validate_config", "NonFiniteLossError", "train_one_epoch",
           "LAMB_BETAS", "build_optimizer", "lamb_betas", "Schedule", "apply_schedule", "peak_lr",
           "PretrainResult", "pretrain"]

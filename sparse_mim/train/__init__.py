"""SparK pretraining: schedules, LAMB, checkpoints, distributed helpers, the epoch loop and the run.

The names below are imported on first use (``sparse_mim._lazy``), so the command line reads and
checks its config before torch is imported."""
from sparse_mim._lazy import lazy_exports

__all__ = ["CHECKPOINT_NAME", "FORMAT", "encoder_export_name", "load_checkpoint", "save_checkpoint", "CONFIG_DIR",
           "ConfigError", "compose_config", "validate_config", "NonFiniteLossError", "train_one_epoch",
           "LAMB_BETAS", "build_optimizer", "lamb_betas", "Schedule", "apply_schedule", "peak_lr",
           "PretrainResult", "pretrain"]

__getattr__ = lazy_exports(__name__, globals(), {
    ".checkpoint": ["CHECKPOINT_NAME", "FORMAT", "encoder_export_name", "load_checkpoint", "save_checkpoint"],
    ".config": ["CONFIG_DIR", "ConfigError", "compose_config", "validate_config"],
    ".engine": ["NonFiniteLossError", "train_one_epoch"],
    ".optim": ["LAMB_BETAS", "build_optimizer", "lamb_betas"],
    ".schedules": ["Schedule", "apply_schedule", "peak_lr"],
    ".trainer": ["PretrainResult", "pretrain"],
})

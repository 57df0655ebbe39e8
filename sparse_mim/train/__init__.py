"""SparK / FCMAE pretraining: the methods, schedules, LAMB / AdamW, the pretraining checkpoint and
encoder export, the masked-image step and the run (on ``sparse_mim.runtime``'s shared machinery).

The names below are imported on first use (``sparse_mim._lazy``), so the command line reads and
checks its config before torch is imported."""
from sparse_mim._lazy import lazy_exports

__all__ = ["encoder_export_name", "load_checkpoint", "save_checkpoint", "CONFIG_DIR", "ConfigError",
           "compose_config", "validate_config", "global_batch_mask", "MaskedImageLoss", "LAMB_BETAS",
           "build_optimizer", "lamb_betas", "Schedule", "apply_schedule", "peak_lr", "PretrainResult", "pretrain"]

__getattr__ = lazy_exports(__name__, globals(), {
    ".checkpoint": ["encoder_export_name", "load_checkpoint", "save_checkpoint"],
    ".config": ["CONFIG_DIR", "ConfigError", "compose_config", "validate_config"],
    ".pretrain_step": ["global_batch_mask", "MaskedImageLoss"],
    ".optim": ["LAMB_BETAS", "build_optimizer", "lamb_betas"],
    ".schedules": ["Schedule", "apply_schedule", "peak_lr"],
    ".trainer": ["PretrainResult", "pretrain"],
})

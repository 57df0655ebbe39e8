"""What every run shares, whatever it trains: processes and devices (``distributed``), the resumable
checkpoint and its format strings (``checkpoint``), atomic writes (``atomic``), step checkpoints and
the resume point (``rotation``), the resume check (``resume``), seeding and stopping on a signal
(``run_control``), progress and logs (``monitor``, ``throughput``), the output folder
(``run_folder``), one optimisation step (``step``) and the run around it (``run``).

It knows nothing of the models trained: pretraining (``sparse_mim.train``) and fine-tuning
(``sparse_mim.finetune``) both build on it. The names below are imported on first use
(``sparse_mim._lazy``), so the command line reads and checks its config before torch is imported.
"""
from sparse_mim._lazy import lazy_exports

__all__ = ["atomic_write", "remove_stale_temporaries", "CHECKPOINT_NAME", "PRETRAIN_FORMAT", "FINETUNE_FORMAT",
           "load_checkpoint", "write_checkpoint", "DistInfo", "init_distributed", "NonFiniteLossError",
           "OptimisationStep", "RunResult", "RunSpec", "TrainingRun", "RunFolder", "check_output_dir"]

__getattr__ = lazy_exports(__name__, globals(), {
    ".atomic": ["atomic_write", "remove_stale_temporaries"],
    ".checkpoint": ["CHECKPOINT_NAME", "PRETRAIN_FORMAT", "FINETUNE_FORMAT", "load_checkpoint", "write_checkpoint"],
    ".distributed": ["DistInfo", "init_distributed"],
    ".step": ["NonFiniteLossError", "OptimisationStep"],
    ".run": ["RunResult", "RunSpec", "TrainingRun"],
    ".run_folder": ["RunFolder", "check_output_dir"],
})

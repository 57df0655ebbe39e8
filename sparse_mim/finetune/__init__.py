"""Fine-tuning, linear probing and kNN evaluation of pretrained encoders in dense timm models (on
``sparse_mim.runtime``'s shared run machinery).

The names below are imported on first use (``sparse_mim._lazy``), so the command line reads and
checks its config before torch is imported."""
from sparse_mim._lazy import lazy_exports

__all__ = ["MODES", "compose_finetune_config", "validate_finetune_config", "LabelledImages", "find_splits",
           "label_subset", "accuracy_summary", "knn_classify", "LinearProbe", "build_classifier",
           "build_feature_extractor", "SUMMARY_NAME", "FinetuneResult", "finetune", "load_finetune_checkpoint"]

__getattr__ = lazy_exports(__name__, globals(), {
    ".config": ["MODES", "compose_finetune_config", "validate_finetune_config"],
    ".data": ["LabelledImages", "find_splits", "label_subset"],
    ".evaluate": ["accuracy_summary", "knn_classify"],
    ".model": ["LinearProbe", "build_classifier", "build_feature_extractor"],
    ".run": ["SUMMARY_NAME", "FinetuneResult", "finetune", "load_finetune_checkpoint"],
})

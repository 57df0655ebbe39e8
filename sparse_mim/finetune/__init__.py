"""Fine-tuning, linear probing and kNN evaluation of pretrained encoders in dense timm models."""
from .config import MODES, compose_finetune_config, validate_finetune_config
from .data import LabelledImages, find_splits, label_subset
from .evaluate import accuracy_summary, knn_classify
from .model import LinearProbe, build_classifier, build_feature_extractor
from .run import CHECKPOINT_NAME, FORMAT, SUMMARY_NAME, FinetuneResult, finetune, load_finetune_checkpoint

__all__ = ["MODES", "compose_finetune_config", "validate_finetune_config", "LabelledImages", "find_splits",
           "label_subset", "accuracy_summary", "knn_classify", "LinearProbe", "build_classifier",
           "build_feature_extractor", "CHECKPOINT_NAME", "FORMAT", "SUMMARY_NAME", "FinetuneResult", "finetune",
           "load_finetune_checkpoint"]

"""Sparse ResNet / ConvNeXt backbones whose state_dicts are timm's (minus the classifier)."""
from . import convnext, resnet  # noqa: F401  (registers the models)
from .base import SparseBackbone
from .registry import UnknownBackboneError, create_backbone, list_backbones, register_backbone

__all__ = ["create_backbone", "list_backbones", "register_backbone", "SparseBackbone", "UnknownBackboneError"]

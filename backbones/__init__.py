"""Sparse ResNet / ConvNeXt backbones whose state_dicts are timm's (minus the classifier)."""
from . import convnext, resnet  # noqa: F401  (registers the models)
from .base import SparseBackbone
from .registry import (SPARSIFY_PREFIX, UnknownBackboneError, create_backbone, is_backbone, list_backbones,
                       register_backbone)
from .sparsified import SparsifiedBackbone, sparsify

__all__ = ["create_backbone", "list_backbones", "is_backbone", "register_backbone", "SparseBackbone",
           "SparsifiedBackbone", "sparsify", "UnknownBackboneError", "SPARSIFY_PREFIX"]

"""Optimizer parameter groups for pretraining: weight decay on weights only.

No decay on 1-D parameters (norm weights, biases), on any bias, on the mask tokens, or on
layer-scale ``gamma`` — SparK's recipe.
"""
from __future__ import annotations

from typing import Dict, List, Set

import torch.nn as nn

__all__ = ["no_weight_decay_names", "param_groups"]


def _skips_decay(name: str, param) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (param.ndim <= 1 or leaf == "bias" or leaf == "gamma"
            or name.startswith("mask_tokens.") or ".mask_tokens." in name)


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """Names of the trainable parameters of ``model`` that take no weight decay (a model that
    defines ``no_weight_decay_names()`` itself, like FCMAE with its official groups, decides)."""
    own = getattr(model, "no_weight_decay_names", None)
    if callable(own):
        return set(own())
    return {n for n, p in model.named_parameters() if p.requires_grad and _skips_decay(n, p)}


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Two groups, ``[decay, no_decay]``, for any torch optimizer.

    Each group carries ``apply_weight_decay`` (True / False) so a weight-decay schedule knows which
    group to update; the no-decay group has ``weight_decay=0``. Frozen parameters are left out.
    """
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "apply_weight_decay": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False}]

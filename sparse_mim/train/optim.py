"""LAMB for SparK pretraining: betas by backbone family, eps 1e-6, no decay on 1-D params/biases/tokens.

Gradient clipping (global norm) happens in the training step, not inside the optimizer, so the
step can report the gradient norm; timm's built-in LAMB clipping is therefore switched off.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Type

import torch.nn as nn
from timm.optim import Lamb

from backbones.convnext import SparseConvNeXt
from backbones.resnet import SparseResNet
from sparse_mim.spark.params import param_groups

__all__ = ["LAMB_BETAS", "LAMB_EPS", "lamb_betas", "build_optimizer"]

#: SparK's LAMB betas per backbone family (spec §6).
LAMB_BETAS: Dict[Type[nn.Module], Tuple[float, float]] = {
    SparseResNet: (0.9, 0.95),
    SparseConvNeXt: (0.9, 0.999),
}
LAMB_EPS = 1e-6


def lamb_betas(encoder: nn.Module) -> Tuple[float, float]:
    """The betas of ``encoder``'s family (looked up by its class)."""
    for family, betas in LAMB_BETAS.items():
        if isinstance(encoder, family):
            return betas
    raise ValueError(f"no LAMB betas known for backbone {type(encoder).__name__}; set train.betas=[b1,b2] "
                     f"or add its family to LAMB_BETAS in {__name__}")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: Optional[Sequence[float]] = None) -> Lamb:
    """LAMB over ``param_groups(model)``; ``betas=None`` picks them from ``model.encoder``'s family.

    ``lr`` and ``weight_decay`` are the starting values; the schedule overwrites them every step.
    """
    betas = tuple(betas) if betas is not None else lamb_betas(model.encoder)
    return Lamb(param_groups(model, weight_decay), lr=lr, betas=betas, eps=LAMB_EPS,
                weight_decay=weight_decay, max_grad_norm=None)

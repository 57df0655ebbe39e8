"""The pretraining optimizer: LAMB for SparK (betas by normalisation family, eps 1e-6), AdamW for FCMAE
(betas (0.9, 0.95), torch's eps), each over its method's weight-decay groups (``param_groups``).

Gradient clipping (global norm) happens in the training step, not inside the optimizer, so the
step can report the gradient norm; timm's built-in LAMB clipping is therefore switched off.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.optim import Lamb

from sparse_mim.spark.params import param_groups

__all__ = ["LAMB_BETAS", "LAMB_EPS", "ADAMW_BETAS", "lamb_betas", "build_optimizer"]

#: SparK's LAMB betas (spec §6) by the encoder's ``norm_kind``: (0.9, 0.95) for its BatchNorm
#: ResNets, (0.9, 0.999) for its LayerNorm ConvNeXts; any other CNN follows its normalisation.
LAMB_BETAS: Dict[str, Tuple[float, float]] = {
    "batch": (0.9, 0.95),
    "layer": (0.9, 0.999),
}
LAMB_EPS = 1e-6
#: FCMAE's AdamW betas (ConvNeXt V2 ``main_pretrain.py``).
ADAMW_BETAS = (0.9, 0.95)


def lamb_betas(encoder: nn.Module) -> Tuple[float, float]:
    """The betas of ``encoder``'s normalisation family (its ``norm_kind``)."""
    kind = getattr(encoder, "norm_kind", None)
    if kind not in LAMB_BETAS:
        raise ValueError(f"no LAMB betas known for backbone {type(encoder).__name__} (norm_kind={kind!r}); set "
                         f"train.betas=[b1,b2] or give it a norm_kind of {', '.join(LAMB_BETAS)}")
    return LAMB_BETAS[kind]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: Optional[Sequence[float]] = None, kind: str = "lamb") -> torch.optim.Optimizer:
    """``kind`` (``lamb`` / ``adamw``) over ``param_groups(model)``; ``betas=None`` picks LAMB's from
    ``model.encoder``'s family, AdamW's ``ADAMW_BETAS``.

    ``lr`` and ``weight_decay`` are the starting values; the schedule overwrites them every step.
    """
    groups = param_groups(model, weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas) if betas is not None else ADAMW_BETAS,
                                 weight_decay=weight_decay)
    if kind != "lamb":
        raise ValueError(f"unknown optimizer {kind!r}: expected lamb or adamw")
    betas = tuple(betas) if betas is not None else lamb_betas(model.encoder)
    return Lamb(groups, lr=lr, betas=betas, eps=LAMB_EPS, weight_decay=weight_decay, max_grad_norm=None)

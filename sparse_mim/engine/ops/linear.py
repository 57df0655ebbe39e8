"""Per-site linear layers (ConvNeXt's MLP): a GEMM on rows; the reference applies it channels-last."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tensor import MaskedDenseTensor, SiteTensor

__all__ = ["linear"]


def linear(x: SiteTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> SiteTensor:
    if isinstance(x, MaskedDenseTensor):
        out = F.linear(x.dense_features.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
        # masked in place (a bias lands on masked sites): the GEMM's backward does not read its output,
        # and an out-of-place product would briefly hold two copies of a 4C-wide map
        return x.replace(out) if bias is None else x.replace(out.mul_(x.mask()))
    return x.replace(F.linear(x.features, weight, bias))

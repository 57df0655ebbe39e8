"""Per-site linear layers (ConvNeXt's MLP): a GEMM on rows; the reference applies it channels-last."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tensor import MaskedDenseTensor, SiteTensor

__all__ = ["linear"]


def linear(x: SiteTensor, weight: torch.Tensor, bias: torch.Tensor | None) -> SiteTensor:
    if isinstance(x, MaskedDenseTensor):
        out = F.linear(x.dense_features.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
        return x.replace(out) if bias is None else x.masked(out)
    return x.replace(F.linear(x.features, weight, bias))

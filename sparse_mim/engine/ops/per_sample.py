"""Per-sample ops: each sample's statistics come from its own active sites only.

Global average pooling, ConvNeXt V2's Global Response Normalisation (GRN) and DropPath. GRN has two
modes: ``"sample"`` takes each channel's L2 norm over one sample's active sites (the dense GRN of
fine-tuning, batch-size independent); ``"batch"`` takes it over the active sites of the whole local
batch, as ConvNeXt V2's official sparse encoder (``MinkowskiGRN``) does in FCMAE pretraining.
"""
from __future__ import annotations

import torch

from ..gather import gather_rows
from ..settings import current_settings
from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor
from .grn_rows import grn_rows, row_groups

__all__ = ["global_avg_pool", "per_sample_sum", "grn", "GRN_MODES", "drop_path"]

#: Where GRN's global L2 norm is taken: over each sample's active sites, or over the whole local batch's.
GRN_MODES = ("sample", "batch")


def per_sample_sum(x: SparseTensor, values: torch.Tensor) -> torch.Tensor:
    """(B, C) sums of ``values`` (N, C) over each sample's rows, as a one-hot GEMM (index_add is slow)."""
    m, stride = x.manager, x.stride
    onehot = m.cached(("batch_onehot", stride, values.dtype, values.device), lambda: torch.nn.functional.one_hot(
        m.batch_index(stride), m.batch_size).t().to(values.dtype))
    return onehot @ values


def _per_row(x: SparseTensor, per_sample: torch.Tensor) -> torch.Tensor:
    """(N, C) rows of a (B, C) per-sample tensor."""
    return gather_rows(per_sample, x.manager.batch_index(x.stride))


def global_avg_pool(x: SiteTensor) -> torch.Tensor:
    """(B, C) mean over each sample's active sites."""
    if isinstance(x, MaskedDenseTensor):
        mask = x.mask()
        return x.dense_features.sum((2, 3)) / mask.sum((2, 3))
    delegate = current_settings().backend_op("global_avg_pool")
    if delegate is not None and (out := delegate(x)) is not NotImplemented:
        return out
    counts = per_sample_sum(x, torch.ones_like(x.features[:, :1]))
    return per_sample_sum(x, x.features) / counts


def grn(x: SiteTensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6,
        mode: str = "sample") -> SiteTensor:
    """x + weight * (x * N(x)) + bias with N = per-channel L2 norm / its channel mean; the norm runs over
    one sample's active sites (``mode="sample"``) or over every active site of the batch (``"batch"``)."""
    if mode not in GRN_MODES:
        raise ValueError(f"GRN mode must be one of {', '.join(GRN_MODES)}, got {mode!r}")
    if isinstance(x, MaskedDenseTensor):
        d = x.dense_features
        g = torch.linalg.vector_norm(d, 2, dim=(2, 3) if mode == "sample" else (0, 2, 3), keepdim=True)
        n = g / (g.mean(1, keepdim=True) + eps)
        out = d + torch.addcmul(bias.view(1, -1, 1, 1), weight.view(1, -1, 1, 1), d * n)
        return x.masked(out)
    delegate = current_settings().backend_op("grn")
    if delegate is not None and (out := delegate(x, weight, bias, eps, mode)) is not NotImplemented:
        return out
    return x.replace(grn_rows(x.features, weight, bias, eps, row_groups(x, mode)))


def drop_path(x: SiteTensor, p: float, training: bool) -> SiteTensor:
    """Stochastic depth: drop each sample's whole residual branch with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    dtype = x.data.dtype
    device = x.manager.device
    scale = torch.empty(x.batch_size, dtype=dtype, device=device).bernoulli_(keep) / keep
    if isinstance(x, MaskedDenseTensor):
        return x.replace(x.dense_features * scale.view(-1, 1, 1, 1))
    return x.replace(x.features * _per_row(x, scale[:, None]))

"""Normalisation over active sites only: BatchNorm (local and synced across ranks), LayerNorm.

BatchNorm statistics (batch mean / variance and the running estimates) are those of BatchNorm1d over
the ``N_active x C`` rows; masked sites never enter them. LayerNorm normalises the channels of each
active site. The masked-dense reference computes the same numbers from masked sums.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor

__all__ = ["batch_norm", "layer_norm", "sync_batch_norm_dense"]


def _momentum_and_mode(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[float, bool]:
    """Mirror torch's BatchNorm bookkeeping: (exponential average factor, use batch statistics)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    return factor, use_batch


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t, group=group)


def _moments(values: torch.Tensor, dims, count: torch.Tensor, mask: Optional[torch.Tensor],
             group) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel over active sites (summed across ranks if ``group``)."""
    s = values.sum(dims)
    if group is not None:
        packed = _all_reduce(torch.cat([s, count.reshape(1).to(s.dtype)]), group)
        s, count = packed[:-1], packed[-1]
    mean = s / count
    shape = [1] * values.dim()
    shape[1 if values.dim() == 4 else -1] = -1
    centred = values - mean.view(shape)
    if mask is not None:
        centred = centred * mask
    sq = (centred * centred).sum(dims)
    if group is not None:
        sq = _all_reduce(sq, group)
    return mean, sq / count, count


def batch_norm(x: SiteTensor, bn: nn.modules.batchnorm._BatchNorm, sync: bool = False) -> SiteTensor:
    """BatchNorm ``bn`` (any torch BatchNorm module's parameters and buffers) over active sites."""
    group = None
    if sync and bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        group = getattr(bn, "process_group", None) or dist.group.WORLD
    if isinstance(x, SparseTensor) and group is None:
        factor, use_batch = _momentum_and_mode(bn)
        out = F.batch_norm(x.features, bn.running_mean if not bn.training or bn.track_running_stats else None,
                           bn.running_var if not bn.training or bn.track_running_stats else None,
                           bn.weight, bn.bias, use_batch, factor, bn.eps)
        return x.replace(out)
    return _batch_norm_from_moments(x, bn, group)


def _batch_norm_from_moments(x, bn, group):
    """BatchNorm from explicit moments; ``x`` is a SiteTensor or a plain dense (B, C, H, W) tensor."""
    factor, use_batch = _momentum_and_mode(bn)
    if isinstance(x, torch.Tensor):
        values, dims, mask, shape = x, (0, 2, 3), None, (1, -1, 1, 1)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
    elif isinstance(x, SparseTensor):
        values, dims, mask = x.features, (0,), None
        count = torch.tensor(float(values.shape[0]), dtype=values.dtype, device=values.device)
        shape = (1, -1)
    else:
        values, dims, mask = x.dense_features, (0, 2, 3), x.mask()
        count = x.manager.active_count(x.stride, values.dtype)
        shape = (1, -1, 1, 1)
    if use_batch:
        stat_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        mean, var, count = _moments(values.to(stat_dtype), dims, count.to(stat_dtype),
                                    None if mask is None else mask.to(stat_dtype), group)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp(min=1)
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), factor)
        mean, var = mean.to(values.dtype), var.to(values.dtype)
    else:
        mean, var = bn.running_mean.to(values.dtype), bn.running_var.to(values.dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    out = values * scale.view(shape) + shift.view(shape)
    if isinstance(x, torch.Tensor):
        return out
    return x.replace(out) if mask is None else x.replace(out * mask)


def sync_batch_norm_dense(x: torch.Tensor, bn) -> torch.Tensor:
    """BatchNorm of a plain dense tensor with statistics summed over all ranks (works on CPU/gloo)."""
    group = None
    if bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        group = getattr(bn, "process_group", None) or dist.group.WORLD
    return _batch_norm_from_moments(x, bn, group)


def layer_norm(x: SiteTensor, ln: nn.LayerNorm) -> SiteTensor:
    """LayerNorm over the channels of each active site (channels_first and channels_last alike)."""
    if isinstance(x, SparseTensor):
        return x.replace(F.layer_norm(x.features, ln.normalized_shape, ln.weight, ln.bias, ln.eps))
    d = x.dense_features.permute(0, 2, 3, 1)
    out = F.layer_norm(d, ln.normalized_shape, ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
    return x.masked(out)

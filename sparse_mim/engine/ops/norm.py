"""Normalisation over active sites only: BatchNorm (local and synced across ranks), LayerNorm.

BatchNorm statistics (batch mean / variance and the running estimates) are those of BatchNorm1d over
the ``N_active x C`` rows; masked sites never enter them. A masked-dense map in channels_last memory
*is* a set of rows (``B*H*W x C``, zero at masked sites), so both containers share one row kernel; the
masked-dense one gathers the active rows first and writes its result back into zeros, as the official
SparK does (``x[active]`` -> BatchNorm1d), so it keeps only the active rows for backward.
LayerNorm normalises each active site's channels (the masked-dense reference also on gathered rows).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import recompute
from ..gather import gather_distinct_rows, gather_rows, scatter_rows
from ..settings import current_settings
from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor
from .per_sample import per_sample_sum

__all__ = ["batch_norm", "group_norm", "layer_norm", "sync_batch_norm_dense"]

def _momentum_and_mode(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[float, bool]:
    """Mirror torch's BatchNorm bookkeeping: (exponential average factor, use batch statistics)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    return factor, use_batch


def _sync_group(bn):
    if bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return getattr(bn, "process_group", None) or dist.group.WORLD
    return None


class _RowBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of (N, C) rows. With ``index`` (the masked-dense baseline) only the rows
    ``index`` names are active: they are gathered, normalised and written back into zeros, and only
    they are saved for backward (SparK's BatchNorm1d on ``x[active]``; the other rows are zero and
    their outputs and gradients are zero). Column sums are GEMMs with a ones vector: on CPU
    ``F.batch_norm`` on 2-D input reduces each channel in a strided loop and is several times slower."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, index):
        n_rows = x.shape[0]
        if index is not None:
            x = x.index_select(0, index)
        count = x.shape[0]
        ones = x.new_ones(1, count)
        mean = (ones @ x).squeeze(0) / count
        var = ((ones @ (x * x)).squeeze(0) / count - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        shift = bias - mean * scale
        out = affine_rows(x, scale, shift)
        if index is not None:
            out = scatter_rows(out, index, n_rows)
        ctx.save_for_backward(x, weight, mean, invstd, index)
        ctx.n_rows = n_rows
        ctx.mark_non_differentiable(scale, shift)
        return out, mean, var, scale, shift

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var, _grad_scale, _grad_shift):
        x, weight, mean, invstd, index = ctx.saved_tensors
        if index is not None:
            grad = grad.index_select(0, index)
        n = x.shape[0]
        ones = grad.new_ones(1, n)
        sum_dy = (ones @ grad).squeeze(0)
        sum_dy_xhat = invstd * ((ones @ (grad * x)).squeeze(0) - mean * sum_dy)  # = d weight
        k1 = weight * invstd
        k2 = -k1 * invstd * sum_dy_xhat / n
        k3 = -k1 * sum_dy / n - k2 * mean
        dx = torch.addcmul(torch.addcmul(k3, x, k2), grad, k1)
        if index is not None:
            dx = scatter_rows(dx, index, ctx.n_rows)
        return dx, sum_dy_xhat, sum_dy, None, None


def affine_rows(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per channel: the normalisation itself (also rebuilt in backward)."""
    return torch.addcmul(shift, x, scale)


def _rows(x: SiteTensor):
    """(rows (N, C), active row index or None (all rows active), back) when ``x`` can be seen as rows
    without a copy, else None. A masked-dense map in channels_last memory is ``B*H*W`` rows."""
    if isinstance(x, SparseTensor):
        return x.features, None, x.replace
    d = x.dense_features
    if not d.is_contiguous(memory_format=torch.channels_last):
        return None
    b, c, h, w = d.shape
    rows = d.permute(0, 2, 3, 1).reshape(-1, c)
    return rows, x.manager.dense_site_index(x.stride), lambda r: x.replace(r.view(b, h, w, c).permute(0, 3, 1, 2))


def batch_norm(x: SiteTensor, bn: nn.modules.batchnorm._BatchNorm, sync: bool = False) -> SiteTensor:
    """BatchNorm ``bn`` (any torch BatchNorm module's parameters and buffers) over active sites, by
    one of five routes: the backend's own op, fused rows (CPU training), torch's kernel on the rows,
    masked-dense rows gathered for torch's kernel, or explicit moments (synced or affine-free)."""
    group = _sync_group(bn) if sync else None
    settings = current_settings()
    delegate = settings.backend_op("batch_norm") if isinstance(x, SparseTensor) else None
    if delegate is not None and (out := delegate(x, bn, group)) is not NotImplemented:
        return out
    if group is not None or bn.weight is None or bn.bias is None:
        return _batch_norm_from_moments(x, bn, group)
    view = _rows(x)
    if view and _fused_rows_apply(view[0], bn, settings.gather_masked_rows):
        return _fused_row_batch_norm(view, bn)
    if isinstance(x, SparseTensor):
        return x.replace(_native_rows(x.features, bn))
    # masked-dense BatchNorm on CUDA gathers the active rows, runs the native kernel and scatters
    # back (SparK's approach); ``gather_masked_rows`` takes that path on the CPU as well
    if view and (view[0].is_cuda or settings.gather_masked_rows):
        return _gathered_row_batch_norm(view, bn)
    return _batch_norm_from_moments(x, bn, None)


def _fused_rows_apply(rows: torch.Tensor, bn, gather_masked_rows: bool) -> bool:
    """``_RowBatchNorm`` runs training-mode BatchNorm of float rows on the CPU (unless asked to gather)."""
    return bn.training and rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64) \
        and not gather_masked_rows


def _fused_row_batch_norm(view, bn) -> SiteTensor:
    """Training BatchNorm as one autograd op on the rows, running statistics updated as torch does."""
    factor, _ = _momentum_and_mode(bn)
    rows, index, back = view
    out, mean, var, scale, shift = _RowBatchNorm.apply(rows, bn.weight, bn.bias, bn.eps, index)
    count = rows.shape[0] if index is None else index.shape[0]
    _update_running(bn, mean, var, count, factor)
    if index is None:  # the rows are an exact function of the saved input (see engine.recompute)
        recompute.register(out, affine_rows, rows, scale, shift)
    return back(out)


def _gathered_row_batch_norm(view, bn) -> SiteTensor:
    """torch's BatchNorm kernel on the distinct active rows of a masked-dense map, scattered back."""
    rows, index, back = view
    active = _native_rows(gather_distinct_rows(rows, index), bn)
    return back(scatter_rows(active, index, rows.shape[0]))


def _native_rows(rows: torch.Tensor, bn) -> torch.Tensor:
    factor, use_batch = _momentum_and_mode(bn)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(rows, bn.running_mean if track else None, bn.running_var if track else None,
                        bn.weight, bn.bias, use_batch, factor, bn.eps)


def _update_running(bn, mean, var, count, factor) -> None:
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            unbiased = var * count / max(count - 1, 1) if isinstance(count, int) else var * count / (count - 1).clamp(min=1)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), factor)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ranks. torch marks ``torch.distributed.nn.functional.all_reduce`` as
    deprecated (a FutureWarning per call) in favour of functional collectives, which are not
    differentiable in every torch this package supports; it still works, so the warning is silenced."""
    import warnings

    from torch.distributed.nn.functional import all_reduce
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                                category=FutureWarning)
        return all_reduce(t, group=group)


def _batch_norm_from_moments(x, bn, group):
    """BatchNorm from explicit sums (any device / dtype / layout; summed over ranks with ``group``).

    ``x`` is a SiteTensor or a plain dense (B, C, H, W) tensor (the decoder's synced BatchNorm).
    """
    factor, use_batch = _momentum_and_mode(bn)
    if isinstance(x, torch.Tensor):
        values, dims, mask, shape = x, (0, 2, 3), None, (1, -1, 1, 1)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
    elif isinstance(x, SparseTensor):
        values, dims, mask, shape = x.features, (0,), None, (1, -1)
        count = torch.tensor(float(values.shape[0]), device=values.device)
    else:
        values, dims, mask, shape = x.dense_features, (0, 2, 3), x.mask(), (1, -1, 1, 1)
        count = x.manager.active_count(x.stride, torch.float32)
    if use_batch:
        stat = torch.float64 if values.dtype == torch.float64 else torch.float32
        v = values.to(stat)
        sums = torch.cat([v.sum(dims), (v * v).sum(dims), count.to(stat).reshape(1)])
        if group is not None:
            sums = _all_reduce(sums, group)
        c = values.shape[1]
        count = sums[-1]
        mean = sums[:c] / count
        var = (sums[c:2 * c] / count - mean * mean).clamp_min(0)
        _update_running(bn, mean, var, count, factor)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    out = torch.addcmul(shift.to(values.dtype).view(shape), values, scale.to(values.dtype).view(shape))
    if isinstance(x, torch.Tensor):
        return out
    return x.replace(out) if mask is None else x.replace(out * mask)


def sync_batch_norm_dense(x: torch.Tensor, bn) -> torch.Tensor:
    """BatchNorm of a plain dense tensor with statistics summed over all ranks (works on CPU/gloo)."""
    return _batch_norm_from_moments(x, bn, _sync_group(bn))


def layer_norm(x: SiteTensor, ln: nn.LayerNorm) -> SiteTensor:
    """LayerNorm over the channels of each active site (channels_first and channels_last alike)."""
    if isinstance(x, SparseTensor):
        delegate = current_settings().backend_op("layer_norm")
        if delegate is not None and (out := delegate(x, ln)) is not NotImplemented:
            return out
        return x.replace(F.layer_norm(x.features, ln.normalized_shape, ln.weight, ln.bias, ln.eps))
    # the official SparK: LayerNorm of the gathered active rows, written back into zeros; only those
    # rows (and the index) are kept for backward, not the whole map.
    b, c, h, w = x.dense_features.shape
    rows = x.dense_features.permute(0, 2, 3, 1).reshape(-1, c)
    index = x.manager.dense_site_index(x.stride)
    out = F.layer_norm(gather_distinct_rows(rows, index), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return x.replace(scatter_rows(out, index, rows.shape[0]).view(b, h, w, c).permute(0, 3, 1, 2))


def group_norm(x: SiteTensor, num_groups: int, weight, bias, eps: float) -> SiteTensor:
    """GroupNorm per sample and group over that sample's active sites (two-pass mean / biased variance,
    as ``F.group_norm``); masked sites never enter the statistics."""
    b, c, g = x.batch_size, x.num_channels, num_groups
    if c % g:
        raise ValueError(f"group_norm: {c} channels are not divisible into {g} groups")
    if isinstance(x, MaskedDenseTensor):
        d, mask = x.dense_features, x.mask()
        count = mask.sum((2, 3)) * (c // g)                                   # (B, 1)
        mean = d.sum((2, 3)).view(b, g, -1).sum(-1) / count                   # (B, G)
        centred = (d - mean.repeat_interleave(c // g, 1)[:, :, None, None]) * mask
        var = (centred * centred).sum((2, 3)).view(b, g, -1).sum(-1) / count
        scale = torch.rsqrt(var + eps).repeat_interleave(c // g, 1)[:, :, None, None]
        out = centred * scale
        if weight is not None:
            out = out * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        return x.masked(out)
    f = x.features
    rows = x.manager.batch_index(x.stride)
    count = per_sample_sum(x, torch.ones_like(f[:, :1])) * (c // g)
    mean = per_sample_sum(x, f).view(b, g, -1).sum(-1) / count
    centred = f - gather_rows(mean.repeat_interleave(c // g, 1), rows)
    var = per_sample_sum(x, centred * centred).view(b, g, -1).sum(-1) / count
    out = centred * gather_rows(torch.rsqrt(var + eps).repeat_interleave(c // g, 1), rows)
    if weight is not None:
        out = torch.addcmul(bias, out, weight)
    return x.replace(out)

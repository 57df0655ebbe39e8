"""ConvNeXt V2's GRN on feature rows as one autograd op, with its gradient written out.

GRN maps rows ``f`` of a group (a sample, or the whole batch) to ``f * S + bias`` with the per-group,
per-channel scale ``S = 1 + weight * g / (mean_c g + eps)`` and ``g`` the channel's L2 norm over the
group's rows. Composed from autograd ops, that is six passes over the (N, 4C) rows forward, more
backward, and a broadcast GEMM per sum; here the forward reads the rows twice (norm, affine) and the
backward three times (one per-group sum, one fused ``dy * S + f * T``), and only ``f`` is saved.

When the rows of each group are contiguous and equally many (a whole batch, or SparK / FCMAE masks
with the same number of visible patches per image), the rows are viewed as (G, n, C) and every
per-group step is a broadcast; otherwise per-group sums are one-hot GEMMs and per-row values gathers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ["RowGroups", "grn_rows"]


class RowGroups:
    """Which group each of N rows belongs to: equal contiguous groups (``size`` rows each) or an
    ``index`` (N,) of group numbers in ``range(count)`` (any order, any sizes, empty groups allowed)."""

    def __init__(self, count: int, size: Optional[int] = None, index: Optional[torch.Tensor] = None):
        self.count, self.size, self.index = count, size, index
        self._onehot = {}

    @classmethod
    def contiguous(cls, count: int, size: int) -> "RowGroups":
        return cls(count, size=size)

    @classmethod
    def indexed(cls, index: torch.Tensor, count: int) -> "RowGroups":
        return cls(count, index=index)

    def grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """(G, n, C) view of contiguous groups; the rows themselves otherwise."""
        return rows.view(self.count, self.size, rows.shape[-1]) if self.index is None else rows

    def per_row(self, per_group: torch.Tensor) -> torch.Tensor:
        """(G, C) values broadcastable against ``grouped(rows)``."""
        return per_group[:, None] if self.index is None else per_group.index_select(0, self.index)

    def sums(self, rows: torch.Tensor) -> torch.Tensor:
        """(G, C) column sums of each group's rows, as GEMMs with a ones vector (contiguous groups)
        or a one-hot matrix: on CPU, torch's reductions over the row axis are several times slower."""
        if self.index is None:
            return (rows.new_ones(1, self.size) @ self.grouped(rows)).squeeze(1)
        return self.onehot(rows) @ rows

    def norms(self, rows: torch.Tensor) -> torch.Tensor:
        """(G, C) L2 norm of each group's rows per channel."""
        return self.sums(rows * rows).sqrt()

    def onehot(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self._onehot:
            self._onehot[key] = torch.nn.functional.one_hot(self.index, self.count).t().to(like.dtype)
        return self._onehot[key]


class _GRNRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, weight, bias, eps: float, groups: RowGroups):
        g = groups.norms(f)
        denom = g.mean(1, keepdim=True) + eps
        n = g / denom
        scale = torch.addcmul(torch.ones_like(n), n, weight)
        out = torch.addcmul(bias, groups.grouped(f), groups.per_row(scale)).view(f.shape[0], -1)
        ctx.save_for_backward(f, weight, g, denom, n, scale)
        ctx.groups = groups
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        f, weight, g, denom, n, scale = ctx.saved_tensors
        groups = ctx.groups
        dy = dy.contiguous()
        d_scale = groups.sums(dy * f)                                     # (G, C) = dL/dS
        d_weight = (d_scale * n).sum(0)
        d_bias = (dy.new_ones(1, dy.shape[0]) @ dy).squeeze(0)
        d_n = d_scale * weight
        d_g = (d_n - (d_n * g).sum(1, keepdim=True) / (g.shape[1] * denom)) / denom
        # d||f||/df = f / g, and 0 where a group's channel is all zero (torch.norm's subgradient)
        t = torch.where(g > 0, d_g / torch.where(g > 0, g, torch.ones_like(g)), torch.zeros_like(g))
        d_f = torch.addcmul(groups.grouped(dy) * groups.per_row(scale), groups.grouped(f), groups.per_row(t))
        return d_f.view(f.shape[0], -1), d_weight, d_bias, None, None


def grn_rows(f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
             groups: RowGroups) -> torch.Tensor:
    """``f + weight * f * N + bias`` per row, N = L2 norm of the row's group / its channel mean."""
    return _GRNRows.apply(f, weight, bias, eps, groups)


def row_groups(x, mode: str) -> RowGroups:
    """The groups GRN normalises over: every row (``mode="batch"``) or each sample's rows."""
    rows = x.features.shape[0]
    if mode == "batch":
        return RowGroups.contiguous(1, rows)
    return x.manager.cached(("grn_groups", x.stride), lambda: _sample_groups(x.manager, x.stride, rows))


def _sample_groups(manager, stride: int, rows: int) -> RowGroups:
    """Contiguous when rows are in batch order with equally many per sample (tile-major rows of masks
    with a fixed visible count always are); otherwise indexed by ``batch_index``."""
    b = manager.batch_size
    index = manager.batch_index(stride)
    if getattr(manager, "visible_per_image", None) is not None:
        return RowGroups.contiguous(b, rows // b)
    capturing = index.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and rows % b == 0 and rows > 0:
        expected = torch.arange(b, device=index.device).repeat_interleave(rows // b)
        if bool(torch.equal(index, expected)):
            return RowGroups.contiguous(b, rows // b)
    return RowGroups.indexed(index, b)

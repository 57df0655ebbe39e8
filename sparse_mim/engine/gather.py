"""Row gathers with a fast backward: the data movement of every sparse op.

``index_select``'s backward is ``index_add_``, which on CPU is several times slower than an
accumulating ``index_put_``; every halo / neighbour / canvas gather goes through ``gather_rows``, and
every backward scatter through ``scatter_add_rows``, which picks the fast one per device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .settings import current_settings

__all__ = ["gather_rows", "gather_distinct_rows", "scatter_add_rows", "scatter_rows"]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, fill: Optional[float]):
        ctx.n_rows = src.shape[0]
        ctx.save_for_backward(index)
        return _gather(src, index, fill)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        n = ctx.n_rows
        return scatter_add_rows(grad, index, n + 1)[:n], None, None


def scatter_add_rows(rows: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows, C) sums of ``rows`` by destination ``index``: the backward of every gather.

    CPU: accumulating ``index_put_`` (``index_add_`` is several times slower there);
    CUDA: ``index_add_`` (atomics; the accumulating ``index_put_`` sorts first).
    """
    out = rows.new_zeros(n_rows, rows.shape[1])
    if rows.is_cuda:
        return out.index_add_(0, index, rows)
    return out.index_put_((index,), rows, accumulate=True)


class _ScatterRows(torch.autograd.Function):
    """Rows written into a zero (n_rows, C) tensor; the backward gathers, so only the index is saved
    (``Tensor.index_copy`` keeps its whole ``source`` for backward)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, n_rows: int):
        ctx.save_for_backward(index)
        return _zeros_with_rows(rows, index, n_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _GatherDistinctRows(torch.autograd.Function):
    """``src[index]`` for an index without repeats: the backward writes (no accumulation needed)."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor):
        ctx.save_for_backward(index)
        ctx.n_rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _zeros_with_rows(grad, index, ctx.n_rows), None


def gather_distinct_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src[index]`` for (N, C) rows and an ``index`` without repeats (e.g. the active sites)."""
    if src.requires_grad and torch.is_grad_enabled():
        return _GatherDistinctRows.apply(src, index)
    return src.index_select(0, index)


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows, C) zeros with ``rows[i]`` at row ``index[i]`` (distinct indices): the inverse of a gather."""
    if rows.requires_grad and torch.is_grad_enabled():
        return _ScatterRows.apply(rows, index, n_rows)
    return _zeros_with_rows(rows, index, n_rows)


def _zeros_with_rows(rows: torch.Tensor, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    return rows.new_zeros(n_rows, rows.shape[1]).index_copy_(0, index, rows)


def gather_rows(src: torch.Tensor, index: torch.Tensor, fill: Optional[float] = None) -> torch.Tensor:
    """``src[index]`` for (N, C) rows; with ``fill``, index ``N`` reads a row of ``fill`` values."""
    if src.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(src, index, fill)
    return _gather(src, index, fill)


def _gather(src: torch.Tensor, index: torch.Tensor, fill: Optional[float]) -> torch.Tensor:
    if fill is None:
        return src.index_select(0, index)
    from ..kernels.triton_gather import gather_rows_filled, gather_rows_filled_torch
    # CUDA gathers with a fill row run one Triton kernel instead of ``cat`` + ``index_select`` (which
    # copies the whole source once more); ``fused_fill_gather=False`` measures the difference
    if current_settings().fused_fill_gather:  # the kernel itself falls back to the reference off CUDA
        return gather_rows_filled(src, index, fill)
    return gather_rows_filled_torch(src, index, fill)

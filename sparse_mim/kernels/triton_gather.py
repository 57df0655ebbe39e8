"""Row gather with a fill row, in one pass: ``out[i] = src[index[i]]``, or ``fill`` where
``index[i] == len(src)``.

Every halo tile, neighbourhood and canvas read of the engine is such a gather. In PyTorch it needs
the fill row appended first (``torch.cat([src, fill_row])``), which copies all of ``src`` once more
per layer; this kernel reads each needed row once and writes the fill value for the sentinel, so the
gather costs only its output. The PyTorch form defines the semantics and is the CPU path.
"""
from __future__ import annotations

import torch

from .triton_conv import _use_triton, triton, tl

__all__ = ["gather_rows_filled", "gather_rows_filled_torch"]

if triton is not None:

    @triton.jit
    def _gather_fill_kernel(src_ptr, idx_ptr, out_ptr, n_src, n_out, C, fill,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < n_out
        col_ok = cols < C
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        valid = (idx >= 0) & (idx < n_src)
        vals = tl.load(src_ptr + idx[:, None] * C + cols[None, :], mask=valid[:, None] & col_ok[None, :],
                       other=fill)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], vals,
                 mask=row_ok[:, None] & col_ok[None, :])


def gather_rows_filled_torch(src: torch.Tensor, index: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.cat([src, src.new_full((1, src.shape[1]), fill)]).index_select(0, index)


def gather_rows_filled(src: torch.Tensor, index: torch.Tensor, fill: float) -> torch.Tensor:
    """(len(index), C) rows of ``src`` (N, C); ``index == N`` reads a row of ``fill``.

    Indices must lie in [0, N]; the Triton kernel runs for CUDA tensors (or the interpreter, see
    ``triton_conv``), the PyTorch form elsewhere.
    """
    if src.dim() != 2 or index.dim() != 1:
        raise ValueError(f"gather_rows_filled: src must be (N, C) and index (M,), got {tuple(src.shape)} "
                         f"and {tuple(index.shape)}")
    if not _use_triton(src, "gather_rows_filled"):
        return gather_rows_filled_torch(src, index, fill)
    src = src.contiguous()
    index = index.contiguous()
    n_out, c = index.shape[0], src.shape[1]
    out = torch.empty(n_out, c, dtype=src.dtype, device=src.device)
    if n_out == 0 or c == 0:
        return out
    block_c = min(triton.next_power_of_2(c), 256)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(n_out, block_r), triton.cdiv(c, block_c))
    _gather_fill_kernel[grid](src, index, out, src.shape[0], n_out, c, float(fill),
                              BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out

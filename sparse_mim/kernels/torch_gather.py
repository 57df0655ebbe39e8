"""Pure-PyTorch gather convolutions: the oracle for the Triton kernels and their fallback.

A sparse convolution is described by a neighbour map ``nbr`` of shape (N_out, K), int32 or int64:
``nbr[o, k]`` is the input row that output row ``o`` reads through kernel offset ``k`` (offsets in
row-major (ky, kx) order), or -1 when that neighbour is inactive and contributes zero.

Both functions work for any floating dtype (float64 included), on CPU and CUDA, and are
differentiable with respect to ``x``, ``weight`` and ``bias`` through ordinary autograd. They loop
over the K offsets, so the largest temporary is one gathered (N_out, C_in) matrix rather than the
full (N_out, K * C_in) im2col matrix.
"""
from __future__ import annotations

import torch

__all__ = ["gather_conv_torch", "gather_depthwise_torch", "check_gather_args"]


def check_gather_args(x: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor, depthwise: bool) -> None:
    """Raise a ValueError naming the first argument whose shape, dtype or device does not fit."""
    op = "gather_depthwise_conv" if depthwise else "gather_conv"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be (N_in, C_in) feature rows, got shape {tuple(x.shape)}; "
                         "flatten batch/site dimensions into rows first")
    if nbr.dim() != 2 or nbr.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: nbr must be an (N_out, K) int32/int64 neighbour map, got shape "
                         f"{tuple(nbr.shape)} dtype {nbr.dtype}")
    want_dims = 2 if depthwise else 3
    layout = "(K, C)" if depthwise else "(K, C_in, C_out)"
    if weight.dim() != want_dims:
        raise ValueError(f"{op}: weight must be {layout}, got shape {tuple(weight.shape)}; "
                         "a dense conv weight (C_out, C_in, kh, kw) converts with "
                         "w.permute(2, 3, 1, 0).reshape(kh * kw, C_in, C_out)")
    if weight.shape[0] != nbr.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[0]} kernel offsets but nbr has "
                         f"{nbr.shape[1]} columns; both must equal kh * kw")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but weight expects {weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: x is {x.dtype} but weight is {weight.dtype}; cast one to the other")
    if x.device != weight.device or x.device != nbr.device:
        raise ValueError(f"{op}: x, weight and nbr must share a device, got {x.device}, "
                         f"{weight.device}, {nbr.device}")


def _padded_rows(x: torch.Tensor, nbr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one zero row to ``x`` and point every -1 of ``nbr`` at it (indices as int64)."""
    n_in = x.shape[0]
    x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])], dim=0)
    idx = nbr.long()
    idx = torch.where(idx < 0, torch.full_like(idx, n_in), idx)
    return x_pad, idx


def gather_conv_torch(x: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[o] = sum_k x[nbr[o, k]] @ weight[k] (+ bias); x (N_in, C_in), weight (K, C_in, C_out)."""
    check_gather_args(x, weight, nbr, depthwise=False)
    x_pad, idx = _padded_rows(x, nbr)
    out = x.new_zeros(nbr.shape[0], weight.shape[2])
    for k in range(weight.shape[0]):
        out = torch.addmm(out, x_pad.index_select(0, idx[:, k]), weight[k])
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def gather_depthwise_torch(x: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[o, c] = sum_k x[nbr[o, k], c] * weight[k, c] (+ bias[c]); x (N_in, C), weight (K, C)."""
    check_gather_args(x, weight, nbr, depthwise=True)
    x_pad, idx = _padded_rows(x, nbr)
    out = x.new_zeros(nbr.shape[0], x.shape[1])
    for k in range(weight.shape[0]):
        out = torch.addcmul(out, x_pad.index_select(0, idx[:, k]), weight[k])
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out

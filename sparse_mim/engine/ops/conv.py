"""Convolution on active sites (submanifold at stride 1; strided outputs on the coarser mask).

Semantics (the masked-dense reference): ``conv2d(zero-filled input) * mask(out stride)``. Inactive
neighbours contribute zero and biases land on active outputs only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor
from .window import (WindowGeometry, canvas_rows, choose_path, gather_neighbors, gather_tiles,
                     tile_rows)

__all__ = ["conv2d"]


def conv2d(x: SiteTensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: WindowGeometry,
           groups: int = 1) -> SiteTensor:
    """Convolve ``x`` with ``weight`` (C_out, C_in/groups, kh, kw) over active sites."""
    geom.check_grid(x.spatial_shape)
    out_stride = x.stride * geom.stride
    if x.num_channels != weight.shape[1] * groups:
        raise ValueError(f"conv expects {weight.shape[1] * groups} input channels, got {x.num_channels}")
    if isinstance(x, MaskedDenseTensor):
        return _masked_dense(x, weight, bias, geom, groups, out_stride)
    if geom.pointwise and groups == 1:
        return _pointwise(x, weight, bias, geom, out_stride)
    path = choose_path(x, geom, depthwise=groups > 1 and groups == x.num_channels)
    if path == "tiles":
        t_out = x.manager.tile_side(out_stride)
        tiles = gather_tiles(x, geom)
        out = F.conv2d(tiles, weight, bias, geom.stride, 0, geom.dilation, groups)
        rows = tile_rows(out, t_out)
    elif path == "canvas":
        dense = _dense_conv(x.dense(), weight, bias, geom, groups)
        rows = canvas_rows(dense, x, out_stride)
    elif path == "implicit_gemm" and (groups == 1 or groups == x.num_channels == weight.shape[0]):
        rows = _implicit_gemm(x, weight, bias, geom, groups)
    else:
        rows = _gather_conv(gather_neighbors(x, geom), weight, bias, groups)
    return SparseTensor(rows, manager=x.manager, stride=out_stride)


def _dense_conv(dense, weight, bias, geom: WindowGeometry, groups):
    if geom.pad_lo != geom.pad_hi:
        dense = F.pad(dense, (geom.pad_lo[1], geom.pad_hi[1], geom.pad_lo[0], geom.pad_hi[0]))
        return F.conv2d(dense, weight, bias, geom.stride, 0, geom.dilation, groups)
    return F.conv2d(dense, weight, bias, geom.stride, geom.pad_lo, geom.dilation, groups)


def _masked_dense(x: MaskedDenseTensor, weight, bias, geom, groups, out_stride) -> MaskedDenseTensor:
    out = _dense_conv(x.dense_features, weight, bias, geom, groups)
    return MaskedDenseTensor(out * x.manager.mask(out_stride, out.dtype), x.manager, out_stride)


def _pointwise(x: SparseTensor, weight, bias, geom, out_stride) -> SparseTensor:
    features = x.features
    if geom.stride > 1:
        if x.manager.tiled:
            s = geom.stride
            tiles = x.tiles()[:, ::s, ::s]
            features = tiles.reshape(-1, tiles.shape[-1])
        else:
            features = gather_neighbors(x, geom)[:, 0]
    rows = F.linear(features, weight.view(weight.shape[0], weight.shape[1]), bias)
    return SparseTensor(rows, manager=x.manager, stride=out_stride)


def _gather_conv(neigh: torch.Tensor, weight, bias, groups) -> torch.Tensor:
    """(N, K, C_in) neighbourhoods x weight -> (N, C_out); any group count."""
    n, k, c_in = neigh.shape
    c_out = weight.shape[0]
    if groups == 1:
        w = weight.permute(2, 3, 1, 0).reshape(k * c_in, c_out)
        out = neigh.reshape(n, k * c_in) @ w
    else:
        g = groups
        w = weight.view(g, c_out // g, c_in // g, k)
        out = torch.einsum("nkgc,gock->ngo", neigh.view(n, k, g, c_in // g), w).reshape(n, c_out)
    return out if bias is None else out + bias


def _implicit_gemm(x: SparseTensor, weight, bias, geom, groups) -> torch.Tensor:
    """Fused gather-GEMM through the kernel map (Triton on CUDA; the PyTorch reference elsewhere).

    Maps and their inverses (for the input gradient) are cached on the manager: once per batch.
    """
    from ...kernels import gather_conv, gather_depthwise_conv, invert_neighbor_map
    m = x.manager
    key = (x.stride, geom)
    nbr = m.cached(("nbr32",) + key, lambda: m.neighbor_map(
        x.stride, geom.kernel, geom.dilation, geom.stride, geom.pad_lo).to(torch.int32).contiguous())
    nbr_inv = m.cached(("nbr32_inv",) + key, lambda: invert_neighbor_map(nbr, x.features.shape[0]))
    features = x.features
    if torch.is_autocast_enabled(features.device.type):  # the kernels take one dtype, like autocast's conv
        dtype = torch.get_autocast_dtype(features.device.type)
        features, weight = features.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    else:
        weight = weight.to(features.dtype)
    k = nbr.shape[1]
    if groups == 1:
        w = weight.permute(2, 3, 1, 0).reshape(k, weight.shape[1], weight.shape[0])
        return gather_conv(features, w, nbr, nbr_inv, bias=bias)
    w = weight.reshape(weight.shape[0], k).t()
    return gather_depthwise_conv(features, w, nbr, nbr_inv, bias=bias)

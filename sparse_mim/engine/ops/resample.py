"""Moves between strides that are not windows: nearest upsampling and space-to-depth.

* ``upsample_nearest``: each site of the finer stride takes its parent's value (HRNet's fuse layers,
  ``nn.Upsample(mode="nearest")``). The output lives on the manager's own active set of the finer
  stride, so it lines up with (and adds to) the maps computed there. Every fine site has an active
  parent: with patch masks the fine set is the coarse one refined; for arbitrary sites a coarse site
  is active when any site of its cell is. The masked-dense reference upsamples the masked map and masks it
  at the finer stride.
* ``space_to_depth``: the ``b x b`` sites of each cell become ``b * b`` groups of channels of one
  coarser site, ordered ``(dy, dx, c)`` as timm's ``SpaceToDepth`` (TResNet's stem); inactive sites of
  a cell read as zero, as in the masked-dense map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..coords import SparseInputError
from ..tensor import MaskedDenseTensor, SiteTensor, SparseTensor
from ..gather import gather_rows

__all__ = ["upsample_nearest", "space_to_depth"]


def _finer_stride(x: SiteTensor, factor: int) -> int:
    if x.stride % factor:
        raise SparseInputError(f"nearest upsampling by {factor} of a stride-{x.stride} map would leave the "
                               "input grid; upsample only maps that were downsampled at least as much")
    out = x.stride // factor
    x.manager.spatial_shape(out)  # checks that the manager has this stride
    return out


def _parent_rows(x: SparseTensor, out_stride: int, factor: int) -> torch.Tensor:
    """(N_fine,) row of the parent of every fine row, cached per manager."""
    m = x.manager

    def build():
        c = m.coordinates(out_stride)
        rows = m.row_index_grid(x.stride)[c[:, 0], c[:, 1] // factor, c[:, 2] // factor]
        if bool((rows < 0).any()):
            raise SparseInputError(f"active sites at stride {out_stride} without an active parent at stride "
                                   f"{x.stride}: the coordinate manager's strides are inconsistent")
        return rows
    return m.cached(("parent_rows", x.stride, out_stride), build)


def upsample_nearest(x: SiteTensor, factor: int) -> SiteTensor:
    """``F.interpolate(x, scale_factor=factor, mode="nearest")`` onto the finer stride's active set."""
    if factor == 1:
        return x
    out_stride = _finer_stride(x, factor)
    if isinstance(x, MaskedDenseTensor):
        out = F.interpolate(x.dense_features, scale_factor=factor, mode="nearest")
        return MaskedDenseTensor(out * x.manager.mask(out_stride, out.dtype), x.manager, out_stride)
    rows = gather_rows(x.features, _parent_rows(x, out_stride, factor))
    return SparseTensor(rows, manager=x.manager, stride=out_stride)


def _cell_rows(x: SparseTensor, out_stride: int, block: int) -> torch.Tensor:
    """(N_coarse * block * block,) input row of every (coarse site, dy, dx); N (a zero row) where inactive."""
    m = x.manager

    def build():
        c = m.coordinates(out_stride)
        d = torch.arange(block, device=m.device)
        ys = (c[:, 1:2] * block + d.repeat_interleave(block)[None])
        xs = (c[:, 2:3] * block + d.repeat(block)[None])
        rows = m.row_index_grid(x.stride)[c[:, 0:1].expand_as(ys), ys, xs]
        return torch.where(rows < 0, torch.full_like(rows, x.features.shape[0]), rows).reshape(-1)
    return m.cached(("cell_rows", x.stride, out_stride, x.features.shape[0]), build)


def space_to_depth(x: SiteTensor, block: int) -> SiteTensor:
    """(B, C, H, W) -> (B, block * block * C, H / block, W / block), channels ordered (dy, dx, c)."""
    out_stride = x.stride * block
    h, w = x.manager.spatial_shape(out_stride)
    if isinstance(x, MaskedDenseTensor):
        d = x.dense_features
        b, c = d.shape[:2]
        out = d.view(b, c, h, block, w, block).permute(0, 3, 5, 1, 2, 4).reshape(b, block * block * c, h, w)
        return MaskedDenseTensor(out * x.manager.mask(out_stride, out.dtype), x.manager, out_stride)
    c = x.features.shape[1]
    rows = gather_rows(x.features, _cell_rows(x, out_stride, block), 0.0)
    return SparseTensor(rows.view(-1, block * block * c), manager=x.manager, stride=out_stride)

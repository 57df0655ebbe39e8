"""Window geometry and the three ways of reading neighbourhoods of active sites.

Every windowed op (convolution, max / average pooling) reads, for each output site, a k x k window
of the input grid. Masked-dense semantics: inactive inputs read as a fill value (zero for
convolution), and outputs exist only at active sites of the output stride. Execution paths (which
one an op takes: ``engine.execution``):

* ``tiles``  (patch managers): gather each tile with its halo into a padded ``(tiles, T, T, C)``
  batch and run the dense op VALID on it; outputs are tile-major rows again.
* ``gather`` (any manager): kernel map (N_out, K) -> gathered (N_out, K, C) -> reduce / GEMM.
* ``canvas`` (any manager): scatter rows into a dense canvas, run the dense op, read active rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

import torch

from ..coords import SparseInputError
from ..gather import gather_rows
from ..tensor import SparseTensor

__all__ = ["WindowGeometry", "gather_tiles", "gather_neighbors", "canvas_rows"]

def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass(frozen=True)
class WindowGeometry:
    """Kernel size, stride, dilation and (possibly asymmetric) padding of a square-strided window."""

    kernel: Tuple[int, int]
    stride: int
    dilation: Tuple[int, int]
    pad_lo: Tuple[int, int]
    pad_hi: Tuple[int, int]

    @classmethod
    def make(cls, kernel, stride, padding: Union[int, Tuple[int, int], str], dilation=1) -> "WindowGeometry":
        kernel, dilation = _pair(kernel), _pair(dilation)
        s = _pair(stride)
        if s[0] != s[1]:
            raise SparseInputError(f"sparse windows need equal strides on both axes, got {s}")
        if padding == "same":
            if s[0] != 1:
                raise SparseInputError("padding='same' is only defined for stride 1")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            lo = tuple(t // 2 for t in total)
            hi = tuple(t - l for t, l in zip(total, lo))
        elif padding == "valid":
            lo = hi = (0, 0)
        else:
            lo = hi = _pair(padding)
        return cls(kernel, s[0], dilation, lo, hi)

    @property
    def pointwise(self) -> bool:
        return self.kernel == (1, 1) and self.pad_lo == (0, 0) and self.pad_hi == (0, 0)

    def check_grid(self, in_shape: Tuple[int, int]) -> Tuple[int, int]:
        """The dense output grid must be the input grid divided by the stride (sites map 1:1)."""
        out = tuple((n + lo + hi - d * (k - 1) - 1) // self.stride + 1
                    for n, lo, hi, d, k in zip(in_shape, self.pad_lo, self.pad_hi, self.dilation, self.kernel))
        want = tuple(n // self.stride for n in in_shape)
        if out != want or any(n % self.stride for n in in_shape):
            raise SparseInputError(
                f"window kernel={self.kernel} stride={self.stride} padding={self.pad_lo}/{self.pad_hi} "
                f"dilation={self.dilation} maps grid {tuple(in_shape)} to {out}, but sparse ops need "
                f"{want} (input grid / stride); use 'same'-style padding")
        return want

    def halo(self) -> Tuple[int, int]:
        """(lo, hi) halo a tile needs so that a VALID window over it yields the tile's outputs."""
        if self.kernel[0] != self.kernel[1] or self.dilation[0] != self.dilation[1] or \
                self.pad_lo[0] != self.pad_lo[1]:
            raise SparseInputError("tile execution needs a square window")
        lo = self.pad_lo[0]
        hi = max(0, self.dilation[0] * (self.kernel[0] - 1) - lo - self.stride + 1)
        return lo, hi


def _with_sentinel(manager, key, index: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Replace -1 by ``n_rows`` (the fill row of ``gather_rows``), cached per batch."""
    return manager.cached(("sentinel",) + key,
                          lambda: torch.where(index < 0, torch.full_like(index, n_rows), index))


def tile_index(x: SparseTensor, geom: WindowGeometry) -> torch.Tensor:
    """(n_tiles, T, T) rows of each padded tile; ``N`` (the fill row) where inactive. Cached per batch."""
    lo, hi = geom.halo()
    m = x.manager
    return _with_sentinel(m, ("tiles", x.stride, lo, hi), m.tile_gather_index(x.stride, lo, hi),
                          x.features.shape[0])


def padded_tiles(features: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """(n_tiles, C, T, T) channels_last batch of the rows ``index`` (n_tiles, T, T) names."""
    t = index.shape[1]
    rows = gather_rows(features, index.reshape(-1), fill)
    return rows.view(index.shape[0], t, t, -1).permute(0, 3, 1, 2)


def gather_tiles(x: SparseTensor, geom: WindowGeometry, fill: float = 0.0) -> torch.Tensor:
    """(n_tiles, C, T, T) channels_last batch of padded tiles (halo from neighbours, ``fill`` if inactive)."""
    return padded_tiles(x.features, tile_index(x, geom), fill)


def tile_rows(out: torch.Tensor, t_out: int) -> torch.Tensor:
    """(n_tiles, C, >=t, >=t) window output -> tile-major rows (N, C)."""
    out = out[:, :, :t_out, :t_out]
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


def neighbor_index(x: SparseTensor, geom: WindowGeometry) -> torch.Tensor:
    """(N_out, K) input row of every output row and offset; ``N`` (the fill row) where inactive. Cached."""
    m = x.manager
    nbr = m.neighbor_map(x.stride, geom.kernel, geom.dilation, geom.stride, geom.pad_lo)
    return _with_sentinel(m, ("nbr", x.stride, geom), nbr, x.features.shape[0])


def gather_neighbors(x: SparseTensor, geom: WindowGeometry, fill: float = 0.0) -> torch.Tensor:
    """(N_out, K, C) neighbourhood of every output row (``fill`` where inactive or outside)."""
    nbr = neighbor_index(x, geom)
    k = nbr.shape[1]
    return gather_rows(x.features, nbr.reshape(-1), fill).view(-1, k, x.features.shape[1])


def canvas_rows(dense_out: torch.Tensor, x: SparseTensor, out_stride: int) -> torch.Tensor:
    """Rows of a dense (B, C, H, W) result at the active sites of ``out_stride``."""
    c = dense_out.shape[1]
    flat = x.manager.flat_site_index(out_stride)
    return gather_rows(dense_out.permute(0, 2, 3, 1).reshape(-1, c), flat)

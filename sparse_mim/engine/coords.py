"""Coordinate managers: which sites are active at every stride, and the cached maps between them.

One manager is shared by every tensor of one forward pass, so neighbour / gather maps are built once
per batch (keyed by stride and kernel geometry) instead of once per layer. Two kinds exist:

* ``PatchCoordinateManager``: the active set is a patch mask (SparK). At stride ``s`` each visible
  patch is an aligned ``t x t`` tile (``t = patch_size / s``) and feature rows are stored tile-major,
  so the rows of a stride are also a zero-copy ``(tiles, t, t, C)`` channels-last batch.
* ``SiteCoordinateManager``: arbitrary active sites (MinkowskiEngine-style input). Coarser strides
  keep a site when any site of its ``f x f`` cell is active (floor quantisation, as MinkowskiEngine).

Shapes are always explicit (batch size and the full spatial shape), never inferred from the
coordinates that happen to be present.
"""
from __future__ import annotations

from typing import Dict, Hashable, Tuple

import torch
import torch.nn.functional as F

__all__ = ["CoordinateManager", "PatchCoordinateManager", "SiteCoordinateManager", "SparseInputError"]


class SparseInputError(ValueError):
    """Bad input to the sparse engine (shapes, coordinates, masks)."""


class CoordinateManager:
    """Active sites of one batch at every stride, plus a cache of maps derived from them."""

    #: True when rows are stored tile-major over aligned patch tiles (enables the tile execution path).
    tiled = False

    def __init__(self, batch_size: int, base_shape: Tuple[int, int], base_stride: int, device):
        self.batch_size = int(batch_size)
        self.base_shape = (int(base_shape[0]), int(base_shape[1]))
        self.base_stride = int(base_stride)
        self.device = torch.device(device)
        self._cache: Dict[Hashable, object] = {}

    # -- geometry --------------------------------------------------------------------------------
    def spatial_shape(self, stride: int) -> Tuple[int, int]:
        """Full (H, W) of the grid at ``stride``."""
        f = self._factor(stride)
        return (self.base_shape[0] // f, self.base_shape[1] // f)

    def _factor(self, stride: int) -> int:
        if stride % self.base_stride or stride < self.base_stride:
            raise SparseInputError(
                f"stride {stride} is not a multiple of the manager's base stride {self.base_stride}")
        f = stride // self.base_stride
        if self.base_shape[0] % f or self.base_shape[1] % f:
            raise SparseInputError(
                f"stride {stride} does not divide the base grid {self.base_shape} (base stride "
                f"{self.base_stride}); use input sizes that are multiples of the total downsampling")
        return f

    def cached(self, key: Hashable, build):
        value = self._cache.get(key)
        if value is None:
            value = build()
            self._cache[key] = value
        return value

    # -- per-stride row sets (implemented by subclasses) -------------------------------------------
    def active_mask(self, stride: int) -> torch.Tensor:
        """(B, H_s, W_s) bool: the active sites at ``stride``."""
        raise NotImplementedError

    def coordinates(self, stride: int) -> torch.Tensor:
        """(N, 3) int64 ``[batch, y, x]`` of the rows at ``stride``, in row order."""
        raise NotImplementedError

    def num_rows(self, stride: int) -> int:
        return self.cached(("num_rows", stride), lambda: int(self.coordinates(stride).shape[0]))

    # -- derived, shared by both kinds ---------------------------------------------------------------
    def mask(self, stride: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, H_s, W_s) float mask, for the masked-dense reference."""
        return self.cached(("mask", stride, dtype),
                           lambda: self.active_mask(stride)[:, None].to(dtype))

    def active_count(self, stride: int, dtype: torch.dtype) -> torch.Tensor:
        """Number of active sites as a 0-d tensor (no host sync)."""
        return self.cached(("count", stride, dtype), lambda: self.mask(stride, dtype).sum())

    def batch_index(self, stride: int) -> torch.Tensor:
        return self.cached(("batch_index", stride), lambda: self.coordinates(stride)[:, 0].contiguous())

    def row_index_grid(self, stride: int) -> torch.Tensor:
        """(B, H_s, W_s) int64: the row of each active site, -1 elsewhere."""
        def build():
            h, w = self.spatial_shape(stride)
            coords = self.coordinates(stride)
            grid = torch.full((self.batch_size, h, w), -1, dtype=torch.long, device=self.device)
            grid[coords[:, 0], coords[:, 1], coords[:, 2]] = torch.arange(
                coords.shape[0], device=self.device)
            return grid
        return self.cached(("row_grid", stride), build)

    def flat_site_index(self, stride: int) -> torch.Tensor:
        """(N,) int64 index of each row into a flattened (B*H_s*W_s) grid, for dense()/canvas."""
        def build():
            h, w = self.spatial_shape(stride)
            c = self.coordinates(stride)
            return (c[:, 0] * h + c[:, 1]) * w + c[:, 2]
        return self.cached(("flat", stride), build)

    def dense_site_index(self, stride: int) -> torch.Tensor:
        """(N,) int64 flat grid index of every active site in ascending (dense, row-major) order: the
        masked-dense reference gathers and scatters its active rows with it (sequential access)."""
        return self.cached(("flat_sorted", stride), lambda: self.flat_site_index(stride).sort().values)

    def neighbor_map(self, stride: int, kernel: Tuple[int, int], dilation: Tuple[int, int],
                     conv_stride: int, pad_lo: Tuple[int, int]) -> torch.Tensor:
        """(N_out, K) int64 kernel map: input row read by each output row through each offset, or -1.

        Offsets are in row-major (ky, kx) order, the order of a conv weight's last two dims.
        Output rows are the rows of ``stride * conv_stride``.
        """
        key = ("nbr", stride, kernel, dilation, conv_stride, pad_lo)

        def build():
            out = self.coordinates(stride * conv_stride)
            grid = self.row_index_grid(stride)
            h, w = grid.shape[1:]
            ky = torch.arange(kernel[0], device=self.device) * dilation[0]
            kx = torch.arange(kernel[1], device=self.device) * dilation[1]
            ys = out[:, 1:2] * conv_stride - pad_lo[0] + ky.repeat_interleave(kernel[1])[None]
            xs = out[:, 2:3] * conv_stride - pad_lo[1] + kx.repeat(kernel[0])[None]
            inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            rows = grid[out[:, 0:1].expand_as(ys), ys.clamp(0, h - 1), xs.clamp(0, w - 1)]
            return torch.where(inside, rows, torch.full_like(rows, -1))
        return self.cached(key, build)


def _check_mask(mask: torch.Tensor, what: str) -> None:
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise SparseInputError(f"{what} must be a (B, H, W) bool tensor, got {tuple(mask.shape)} "
                               f"{mask.dtype}")
    if mask.numel() == 0:
        raise SparseInputError(f"{what} is empty (shape {tuple(mask.shape)})")


class PatchCoordinateManager(CoordinateManager):
    """Active sites given by a patch mask; rows tile-major at every stride.

    ``patch_mask`` is (B, H/P, W/P) bool (True = visible). Tiles are ordered by (batch, py, px);
    within a tile, sites are row-major. A tile's rows at stride ``s`` are therefore contiguous.
    """

    tiled = True

    def __init__(self, patch_mask: torch.Tensor, patch_size: int = 32, visible_per_image: int | None = None):
        """``visible_per_image``: every image shows exactly this many patches (SparK's masks do).
        The tile list then has a fixed shape and is built without a host sync, so the whole
        encoder can be captured in a CUDA graph (``sparse_mim.spark.graphed``)."""
        _check_mask(patch_mask, "patch mask")
        b, hp, wp = patch_mask.shape
        super().__init__(b, (hp * patch_size, wp * patch_size), 1, patch_mask.device)
        self.patch_size = int(patch_size)
        self.patch_mask = patch_mask
        if visible_per_image is not None and not 0 < visible_per_image <= hp * wp:
            raise SparseInputError(f"visible_per_image must be in 1..{hp * wp}, got {visible_per_image}")
        self.visible_per_image = visible_per_image

    def tile_side(self, stride: int) -> int:
        if stride > self.patch_size or self.patch_size % stride:
            raise SparseInputError(
                f"stride {stride} must divide the patch size {self.patch_size} for a patch mask")
        return self.patch_size // stride

    @property
    def tiles(self) -> torch.Tensor:
        """(n_tiles, 3) int64 ``[batch, py, px]`` of the visible patches (one host sync, cached)."""
        def build():
            if self.visible_per_image is not None:
                return self._tiles_of_fixed_count(self.visible_per_image)
            t = self.patch_mask.nonzero()
            if t.shape[0] == 0:
                raise SparseInputError("every patch is masked: at least one visible patch is needed")
            return t
        return self.cached("tiles", build)

    def _tiles_of_fixed_count(self, k: int) -> torch.Tensor:
        """``nonzero()`` of a mask with ``k`` visible patches per image, without a host sync:
        each visible patch's rank within its image (a cumulative sum) is its slot."""
        b, hp, wp = self.patch_mask.shape
        flat = self.patch_mask.reshape(b, hp * wp)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:  # one sync; a graph's caller checks each new mask before replaying
            counts = flat.sum(1)
            if bool((counts != k).any()):
                raise SparseInputError(f"visible_per_image={k}, but the patch mask shows "
                                       f"{sorted(set(counts.tolist()))} patches per image")
        rank = flat.cumsum(1) - 1
        slot = torch.where(flat, rank, torch.full_like(rank, k))  # masked patches -> a spare slot k
        order = torch.arange(hp * wp, device=self.device).expand(b, -1)
        picked = torch.zeros(b, k + 1, dtype=torch.long, device=self.device).scatter_(1, slot, order)[:, :k]
        batch = torch.arange(b, device=self.device)[:, None].expand(b, k)
        return torch.stack([batch, picked // wp, picked % wp], -1).reshape(-1, 3)

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    def num_rows(self, stride: int) -> int:
        return self.num_tiles * self.tile_side(stride) ** 2

    def active_mask(self, stride: int) -> torch.Tensor:
        t = self.tile_side(stride)
        return self.cached(("active", stride), lambda: self.patch_mask.repeat_interleave(t, 1)
                           .repeat_interleave(t, 2))

    def coordinates(self, stride: int) -> torch.Tensor:
        def build():
            t = self.tile_side(stride)
            tiles = self.tiles
            r = torch.arange(t, device=self.device)
            y = (tiles[:, 1:2, None] * t + r[None, :, None]).expand(-1, t, t)
            x = (tiles[:, 2:3, None] * t + r[None, None, :]).expand(-1, t, t)
            b = tiles[:, 0:1, None].expand(-1, t, t)
            return torch.stack([b, y, x], -1).reshape(-1, 3)
        return self.cached(("coords", stride), build)

    def batch_index(self, stride: int) -> torch.Tensor:
        t = self.tile_side(stride)
        return self.cached(("batch_index", stride),
                           lambda: self.tiles[:, 0].repeat_interleave(t * t))

    def tile_gather_index(self, stride: int, lo: int, hi: int) -> torch.Tensor:
        """(n_tiles, T, T) int64 rows of each tile padded by ``lo`` / ``hi`` sites, -1 where inactive.

        ``T = lo + t + hi``. The padding (halo) reads neighbouring tiles; it may reach farther than one
        tile when the halo exceeds the tile side (e.g. a 7x7 kernel on 1x1 tiles).
        """
        def build():
            t = self.tile_side(stride)
            grid = F.pad(self.row_index_grid(stride), (lo, hi, lo, hi), value=-1)
            tiles = self.tiles
            r = torch.arange(lo + t + hi, device=self.device)
            ys = tiles[:, 1, None, None] * t + r[None, :, None]
            xs = tiles[:, 2, None, None] * t + r[None, None, :]
            return grid[tiles[:, 0, None, None], ys, xs]
        return self.cached(("tile_gather", stride, lo, hi), build)

    def rows_from_image(self, images: torch.Tensor) -> torch.Tensor:
        """Visible patches of a dense (B, C, H, W) image as tile-major rows (N, C)."""
        b, c, h, w = images.shape
        p = self.patch_size
        if (b, h, w) != (self.batch_size,) + self.base_shape:
            raise SparseInputError(f"image batch {(b, h, w)} does not match the patch mask "
                                   f"{(self.batch_size,) + self.base_shape}")
        hp, wp = h // p, w // p
        patches = images.reshape(b, c, hp, p, wp, p).permute(0, 2, 4, 3, 5, 1).reshape(b * hp * wp, p * p * c)
        tiles = self.tiles
        flat = (tiles[:, 0] * hp + tiles[:, 1]) * wp + tiles[:, 2]
        from .gather import gather_rows
        return gather_rows(patches, flat).reshape(-1, c)


class SiteCoordinateManager(CoordinateManager):
    """Arbitrary active sites given as coordinates at ``base_stride`` (any row order).

    Coarser strides are derived by floor quantisation and stored in raster order.
    """

    def __init__(self, coordinates: torch.Tensor, spatial_shape: Tuple[int, int], batch_size: int,
                 stride: int = 1, validate: bool = True):
        coordinates = torch.as_tensor(coordinates)
        if coordinates.dim() != 2 or coordinates.shape[1] != 3:
            raise SparseInputError(f"coordinates must be (N, 3) [batch, y, x], got {tuple(coordinates.shape)}")
        if coordinates.is_floating_point():
            raise SparseInputError(f"coordinates must be integers, got {coordinates.dtype}")
        coordinates = coordinates.long()
        h, w = int(spatial_shape[0]), int(spatial_shape[1])
        super().__init__(batch_size, (h, w), stride, coordinates.device)
        if coordinates.shape[0] == 0:
            raise SparseInputError("empty sparse tensor: no active site")
        if validate:
            _validate_coordinates(coordinates, batch_size, (h, w))
        self._cache[("coords", stride)] = coordinates

    @classmethod
    def from_mask(cls, active: torch.Tensor, stride: int = 1) -> "SiteCoordinateManager":
        _check_mask(active, "active site mask")
        coords = active.nonzero()
        if coords.shape[0] == 0:
            raise SparseInputError("active site mask has no active site")
        m = cls(coords, active.shape[1:], active.shape[0], stride, validate=False)
        m._cache[("active", stride)] = active
        return m

    def active_mask(self, stride: int) -> torch.Tensor:
        def build():
            if stride == self.base_stride:
                c = self.coordinates(stride)
                m = torch.zeros((self.batch_size,) + self.base_shape, dtype=torch.bool, device=self.device)
                m[c[:, 0], c[:, 1], c[:, 2]] = True
                return m
            f = self._factor(stride)
            base = self.active_mask(self.base_stride)
            return F.max_pool2d(base[:, None].float(), f, f)[:, 0] > 0
        return self.cached(("active", stride), build)

    def coordinates(self, stride: int) -> torch.Tensor:
        return self.cached(("coords", stride), lambda: self.active_mask(stride).nonzero())


def _validate_coordinates(coords: torch.Tensor, batch_size: int, shape: Tuple[int, int]) -> None:
    b, y, x = coords.unbind(1)
    if bool((b < 0).any() | (b >= batch_size).any()):
        raise SparseInputError(f"batch index out of range [0, {batch_size}): found "
                               f"{int(b.min())}..{int(b.max())}")
    if bool((y < 0).any() | (y >= shape[0]).any() | (x < 0).any() | (x >= shape[1]).any()):
        raise SparseInputError(f"coordinates out of range for spatial shape {tuple(shape)}: y in "
                               f"{int(y.min())}..{int(y.max())}, x in {int(x.min())}..{int(x.max())}")
    flat = (b * shape[0] + y) * shape[1] + x
    if flat.unique().numel() != flat.numel():
        raise SparseInputError(f"duplicate coordinates: {flat.numel() - flat.unique().numel()} "
                               "rows repeat an earlier [batch, y, x]")

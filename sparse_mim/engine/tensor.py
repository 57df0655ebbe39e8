"""The two feature containers the engine runs on.

``SparseTensor`` holds one feature row per active site (the real, sparse execution).
``MaskedDenseTensor`` holds a dense map whose inactive sites are zero (SparK's simulation); it is the
reference every sparse op is tested against and the masked-dense baseline of the benchmarks.
Both share a ``CoordinateManager``, so the reference and the sparse run see the same active sets.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .gather import gather_rows
from .coords import CoordinateManager, SiteCoordinateManager, SparseInputError

__all__ = ["SparseTensor", "MaskedDenseTensor", "SiteTensor", "install_torch_function", "run_torch_function"]

#: How a torch function with a site tensor among its arguments runs: ``engine.collect`` installs its
#: handler (the dispatch table of ``engine.dispatch``, or the dry run's collecting dispatch around it)
#: when the engine is imported; both need this module's classes, so this module cannot import them.
_torch_function: Optional[Callable] = None


def install_torch_function(handler: Callable) -> None:
    """Make ``handler(func, args, kwargs)`` run every torch function called on a site tensor."""
    global _torch_function
    _torch_function = handler


def run_torch_function(func, args, kwargs):
    """Run torch function ``func`` on arguments that include one of the engine's tensors (or maps)."""
    return _torch_function(func, args, kwargs)


class SiteTensor:
    """Behaviour shared by both containers: stride, manager, and every torch op (elementwise ones
    included) through ``__torch_function__``.

    Both take part in torch's ``__torch_function__`` protocol, so the glue code of an ordinary
    model's ``forward`` (residual adds, functional activations, channel scaling, ``torch.cat``,
    ``permute`` around channels-last MLPs, squeeze-excitation means) runs on them unchanged;
    ``sparse_mim.engine.dispatch`` holds the table of what is supported and why.
    ``layout`` is the *logical* layout a dense model would see: ``"nchw"`` (the default) or
    ``"nhwc"`` after ``permute(0, 2, 3, 1)``; the data never moves (rows are layout-free, the
    masked-dense map stays NCHW).
    """

    manager: CoordinateManager
    stride: int
    layout: str = "nchw"
    #: ``g`` while the tensor stands for the 5-d view ``(B, g, C/g, H, W)`` of its channels (split
    #: attention's radix groups, selective kernels' branches, a channel shuffle); the data keeps its
    #: 4-d form (rows (N, C), or the (B, C, H, W) map), since only the channel axis is regrouped.
    channel_groups: Optional[int] = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(func, args, kwargs or {})

    def _torch(self, name: str):
        """``x.name(...)`` for a torch.Tensor method ``name``: routed through ``__torch_function__``."""
        method = getattr(torch.Tensor, name)
        return lambda *args, **kwargs: self.__torch_function__(method, (type(self),), (self,) + args, kwargs)

    def __getattr__(self, name: str):
        if not name.startswith("_") and callable(getattr(torch.Tensor, name, None)):
            return self._torch(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # -- what a dense model's forward may ask of its input ------------------------------------------
    @property
    def data(self) -> torch.Tensor:
        """The underlying torch tensor (rows, or the masked-dense map)."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        """The dense shape this tensor stands for, in its logical layout."""
        h, w = self.spatial_shape
        b, c = self.batch_size, self.num_channels
        g = self.channel_groups
        if g is not None:
            return torch.Size((b, g, c // g, h, w))
        return torch.Size((b, c, h, w) if self.layout == "nchw" else (b, h, w, c))

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4 if self.channel_groups is None else 5

    ndim = property(dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cuda(self) -> bool:
        return self.data.is_cuda

    @property
    def requires_grad(self) -> bool:
        return self.data.requires_grad

    def _binary(name):
        def op(self, other):
            return self.__torch_function__(getattr(torch.Tensor, name), (type(self),), (self, other))
        op.__name__ = name
        return op

    __add__, __radd__, __iadd__ = _binary("__add__"), _binary("__radd__"), _binary("__iadd__")
    __sub__, __rsub__, __isub__ = _binary("__sub__"), _binary("__rsub__"), _binary("__isub__")
    __mul__, __rmul__, __imul__ = _binary("__mul__"), _binary("__rmul__"), _binary("__imul__")
    __truediv__, __itruediv__ = _binary("__truediv__"), _binary("__itruediv__")
    del _binary

    def __neg__(self):
        return self.__torch_function__(torch.Tensor.neg, (type(self),), (self,))

    def __getitem__(self, index):
        return self.__torch_function__(torch.Tensor.__getitem__, (type(self),), (self, index))

    def __setitem__(self, index, value):  # refused by engine.dispatch with the op's name, not a TypeError
        self.__torch_function__(torch.Tensor.__setitem__, (type(self),), (self, index, value))

    def _same_kind(self, out: "SiteTensor") -> "SiteTensor":
        if self.layout != "nchw":
            out.layout = self.layout
        if self.channel_groups is not None:
            out.channel_groups = self.channel_groups
        return out

    def grouped(self, groups: Optional[int], data: Optional[torch.Tensor] = None) -> "SiteTensor":
        """Same sites, with the channels viewed as ``groups`` groups (None: the plain 4-d map)."""
        out = self.replace(self.data if data is None else data)
        out.channel_groups = groups
        return out

    @property
    def batch_size(self) -> int:
        return self.manager.batch_size

    @property
    def spatial_shape(self) -> Tuple[int, int]:
        return self.manager.spatial_shape(self.stride)

    def active_mask(self) -> torch.Tensor:
        return self.manager.active_mask(self.stride)

    def _check_same_sites(self, other: "SiteTensor") -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot combine {type(self).__name__} with {type(other).__name__}")
        if other.manager is not self.manager or other.stride != self.stride:
            raise SparseInputError("tensors live on different active sets (different coordinate "
                                   f"manager or stride {self.stride} vs {other.stride})")


class SparseTensor(SiteTensor):
    """Features of active sites: ``features`` (N, C), one row per coordinate ``[batch, y, x]``.

    Coordinates are on the grid of the tensor's own ``stride`` (MinkowskiEngine counts them on the
    input grid instead; ours are divided by the stride). The full spatial shape and batch size are
    part of the tensor, so ``dense()`` never guesses extents.
    """

    def __init__(self, features: torch.Tensor, coordinates: Optional[torch.Tensor] = None, *,
                 stride: int = 1, spatial_shape: Optional[Tuple[int, int]] = None,
                 batch_size: Optional[int] = None, manager: Optional[CoordinateManager] = None):
        if features.dim() != 2:
            raise SparseInputError(f"features must be (N, C), got shape {tuple(features.shape)}")
        if manager is None:
            if coordinates is None or spatial_shape is None or batch_size is None:
                raise SparseInputError("a SparseTensor without a manager needs coordinates, "
                                       "spatial_shape and batch_size")
            manager = SiteCoordinateManager(coordinates.to(features.device), spatial_shape, batch_size, stride)
        elif coordinates is not None:
            raise SparseInputError("pass either coordinates or a manager, not both")
        n = manager.num_rows(stride)
        if features.shape[0] != n:
            raise SparseInputError(f"{features.shape[0]} feature rows for {n} active sites at stride {stride}")
        self.features = features
        self.manager = manager
        self.stride = int(stride)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, x: torch.Tensor, active: torch.Tensor, stride: int = 1) -> "SparseTensor":
        """Rows of ``x`` (B, C, H, W) at the sites where ``active`` (B, H, W) is True."""
        if x.dim() != 4 or active.shape != (x.shape[0],) + tuple(x.shape[2:]):
            raise SparseInputError(f"from_dense expects x (B, C, H, W) and active (B, H, W); got "
                                   f"{tuple(x.shape)} and {tuple(active.shape)}")
        manager = SiteCoordinateManager.from_mask(active, stride)
        return cls(cls._gather_sites(x, manager, stride), manager=manager, stride=stride)

    @staticmethod
    def _gather_sites(x: torch.Tensor, manager: CoordinateManager, stride: int) -> torch.Tensor:
        c = x.shape[1]
        return gather_rows(x.permute(0, 2, 3, 1).reshape(-1, c), manager.flat_site_index(stride))

    def replace(self, features: torch.Tensor) -> "SparseTensor":
        """Same sites, new features (no checks: for ops that keep the row set)."""
        out = SparseTensor.__new__(SparseTensor)
        out.features, out.manager, out.stride = features, self.manager, self.stride
        return self._same_kind(out)

    @property
    def data(self) -> torch.Tensor:
        return self.features

    # -- views ---------------------------------------------------------------------------------------
    @property
    def coordinates(self) -> torch.Tensor:
        return self.manager.coordinates(self.stride)

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    def dense(self) -> torch.Tensor:
        """(B, C, H_s, W_s) with zeros at inactive sites (channels_last memory)."""
        h, w = self.spatial_shape
        c = self.features.shape[1]
        flat = self.features.new_zeros(self.batch_size * h * w, c)
        flat = flat.index_copy(0, self.manager.flat_site_index(self.stride), self.features)
        return flat.view(self.batch_size, h, w, c).permute(0, 3, 1, 2)

    def tiles(self) -> torch.Tensor:
        """(n_tiles, t, t, C) zero-copy view of tile-major rows (patch managers only)."""
        if not self.manager.tiled:
            raise SparseInputError("tiles() needs a tensor built from a patch mask")
        t = self.manager.tile_side(self.stride)
        return self.features.view(-1, t, t, self.features.shape[1])

    def __repr__(self) -> str:
        return (f"SparseTensor(rows={self.features.shape[0]}, channels={self.features.shape[1]}, "
                f"stride={self.stride}, spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
                f"dtype={self.features.dtype}, device={self.features.device})")


class MaskedDenseTensor(SiteTensor):
    """Dense (B, C, H, W) features that are zero at inactive sites: SparK's masked-dense simulation."""

    def __init__(self, dense: torch.Tensor, manager: CoordinateManager, stride: int = 1):
        if dense.dim() != 4 or dense.shape[0] != manager.batch_size or \
                tuple(dense.shape[2:]) != manager.spatial_shape(stride):
            raise SparseInputError(f"dense map {tuple(dense.shape)} does not match batch "
                                   f"{manager.batch_size} and grid {manager.spatial_shape(stride)}")
        self.dense_features = dense
        self.manager = manager
        self.stride = int(stride)

    @classmethod
    def from_dense(cls, x: torch.Tensor, active: torch.Tensor, stride: int = 1) -> "MaskedDenseTensor":
        manager = SiteCoordinateManager.from_mask(active, stride)
        return cls(x * manager.mask(stride, x.dtype), manager, stride)

    def mask(self) -> torch.Tensor:
        return self.manager.mask(self.stride, self.dense_features.dtype)

    def replace(self, dense: torch.Tensor) -> "MaskedDenseTensor":
        out = MaskedDenseTensor.__new__(MaskedDenseTensor)
        out.dense_features, out.manager, out.stride = dense, self.manager, self.stride
        return self._same_kind(out)

    @property
    def data(self) -> torch.Tensor:
        return self.dense_features

    def masked(self, dense: torch.Tensor) -> "MaskedDenseTensor":
        """Wrap ``dense`` after zeroing its inactive sites."""
        return self.replace(dense * self.mask())

    @property
    def num_channels(self) -> int:
        return self.dense_features.shape[1]

    def dense(self) -> torch.Tensor:
        return self.dense_features

    def to_sparse(self) -> SparseTensor:
        """Rows of the active sites, in the manager's row order (for comparing with a sparse run)."""
        return SparseTensor(SparseTensor._gather_sites(self.dense_features, self.manager, self.stride),
                            manager=self.manager, stride=self.stride)

    def __repr__(self) -> str:
        return (f"MaskedDenseTensor(shape={tuple(self.dense_features.shape)}, stride={self.stride}, "
                f"dtype={self.dense_features.dtype})")


def check_image_size(images: torch.Tensor, patch_size: int) -> None:
    """Raise a clear error unless ``images`` is (B, C, H, W) with H, W multiples of the patch size."""
    if images.dim() != 4:
        raise SparseInputError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise SparseInputError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}; "
                               f"resize or crop to e.g. {max(1, round(h / patch_size)) * patch_size}x"
                               f"{max(1, round(w / patch_size)) * patch_size}")

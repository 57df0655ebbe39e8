"""``F.pad`` of a sparse map with zeros, folded into the convolution or max pool that reads it.

A sparse map has rows for its active sites only; zeros outside the image are what a window op's own
zero padding reads. So ``F.pad(x, (left, right, top, bottom))`` (constant mode, value 0) computes
nothing: it returns a ``PaddedSites`` holding ``x`` and the padding, and the window op that reads it
adds the padding to its own window (timm's HGNet-V2 stem: ``F.pad(x, (0, 1, 0, 1))`` before a 2x2
convolution and a 2x2 stride-1 max pool, which then keep the grid). A convolution reads the zeros
as its zero padding; a max pool reads them as values (``border=0``), as the dense pool does.

Anything else done with a ``PaddedSites`` (an activation, a norm, a sum: they would give the border
sites values of their own, which no row can hold) is an ``UnsupportedOperationError``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .errors import UnsupportedOperationError
from .ops.window import WindowGeometry
from .tensor import SiteTensor, run_torch_function

__all__ = ["PaddedSites", "pad", "fold_into_conv", "fold_into_max_pool", "FOLDS"]

FOLDS = "only zero padding read next by a convolution or a max pool (folded into its window) is supported"


class PaddedSites:
    """``x`` with zero padding ``pads`` = (left, right, top, bottom) around its grid, not yet applied."""

    def __init__(self, sites: SiteTensor, pads: Tuple[int, int, int, int]):
        self.sites, self.pads = sites, pads

    @property
    def shape(self) -> torch.Size:
        b, c, h, w = self.sites.shape
        left, right, top, bottom = self.pads
        return torch.Size((b, c, h + top + bottom, w + left + right))

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    @property
    def dtype(self) -> torch.dtype:
        return self.sites.dtype

    @property
    def device(self) -> torch.device:
        return self.sites.device

    def dense(self) -> torch.Tensor:
        """The padded dense map (for the dry run's record of a refused op)."""
        import torch.nn.functional as F
        return F.pad(self.sites.dense(), self.pads)

    def widen(self, geometry: WindowGeometry) -> WindowGeometry:
        """``geometry`` with this padding added to its own."""
        left, right, top, bottom = self.pads
        lo, hi = geometry.pad_lo, geometry.pad_hi
        return WindowGeometry(geometry.kernel, geometry.stride, geometry.dilation,
                              (lo[0] + top, lo[1] + left), (hi[0] + bottom, hi[1] + right))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # the engine's handler refuses it (engine.dispatch.dispatch), or records it in a dry run
        return run_torch_function(func, args, kwargs or {})

    def __getattr__(self, name: str):
        if not name.startswith("_") and callable(getattr(torch.Tensor, name, None)):
            method = getattr(torch.Tensor, name)
            return lambda *args, **kwargs: self.__torch_function__(method, (type(self),), (self,) + args, kwargs)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"PaddedSites(pads={self.pads}, {self.sites!r})"


def _operator(name: str):
    def op(self, *others):
        return self.__torch_function__(getattr(torch.Tensor, name), (type(self),), (self,) + others)
    op.__name__ = name
    return op


for _n in ("__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
           "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "__getitem__"):
    setattr(PaddedSites, _n, _operator(_n))


def pad(x, pad, mode: str = "constant", value: Optional[float] = None) -> PaddedSites:
    """``F.pad`` of a sparse map: zero padding of the two spatial dims, kept for the next window op."""
    pads = tuple(int(p) for p in pad)
    if not isinstance(x, SiteTensor) or mode != "constant" or (value not in (None, 0, 0.0)) or len(pads) != 4 or \
            min(pads) < 0 or pads[0] != pads[2] or pads[1] != pads[3] or x.layout != "nchw" or \
            x.channel_groups is not None:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise UnsupportedOperationError(
            f"F.pad(pad={tuple(pad)}, mode={mode!r}, value={value}) of a {shape} sparse tensor: only "
            "non-negative zero padding of the two spatial dims of an NCHW map, the same on both axes (left == "
            f"top, right == bottom: windows are square), is supported, and {FOLDS}")
    return PaddedSites(x, pads)


def fold_into_conv(x: PaddedSites, geometry: WindowGeometry) -> Tuple[SiteTensor, WindowGeometry]:
    """The map and the convolution window that reads ``x``'s zeros as its own zero padding."""
    return x.sites, x.widen(geometry)


def fold_into_max_pool(x: PaddedSites, geometry: WindowGeometry,
                       border: Optional[float]) -> Tuple[SiteTensor, WindowGeometry, float]:
    """The map, window and border value of a max pool that reads ``x``'s zeros as values."""
    own = geometry.pad_lo != (0, 0) or geometry.pad_hi != (0, 0)
    if (own and border is None) or (border is not None and border != 0.0):
        raise UnsupportedOperationError(
            "max pool of a zero-padded sparse map (F.pad) with padding of its own that is not zero: the two "
            "borders cannot be folded into one window")
    return x.sites, x.widen(geometry), 0.0

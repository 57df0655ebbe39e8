"""The ``minkowski`` backend: the engine's ops on a ``SparseTensor`` computed by MinkowskiEngine,
registered as a table of ops (``engine.backend``); MinkowskiEngine itself is optional and imported
only when the backend is asked for.

Every op converts our tensor to an ``ME.SparseTensor`` on one ME ``CoordinateManager`` per batch (so
ME builds and caches its kernel maps once per batch, as it would natively), runs the ME module, and
converts back. ME counts coordinates on the input grid (ours are divided by the stride) and orders
the rows of the coarser maps it builds (strided convs and pools) its own way; ``_Bridge`` keeps ME's
coordinate-map key of every stride and the row permutation between ME's rows and ours (none where they
agree, as on a map inserted from our coordinates). ME hands coordinates to its C++ side only as
contiguous int32 tensors, and a key's ``get_key()`` is ``([strides], id)``, so maps are cached by a
tuple of it.

Weights stay in our dense layout (a checkpoint never depends on the backend): each call hands ME a
view of them in its layout (``minkowski_layout.dense_kernel_to_me``) through ``torch.func.functional_call``, so
gradients flow to our parameters. ME modules are kept as parameter-less templates per configuration.

MinkowskiEngine 0.5.4 has no LayerNorm or GRN; like ConvNeXt V2's own ME port they are written on
the ME tensor's features, GRN with ME's global sum pooling and broadcast, per sample (the port's
norm over the whole batch is a known bug). Synced BatchNorm across ranks, max pooling with a border
value and average pooling that counts padding stay native (each op returns ``NotImplemented``).
"""
from __future__ import annotations

import collections
import collections.abc

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .backend import Backend, BackendError, register_backend
from .coords import SparseInputError
from .gather import gather_rows
from .minkowski_layout import dense_bias_to_me, dense_kernel_to_me
from .ops.window import WindowGeometry
from .tensor import SparseTensor

__all__ = ["conv2d", "batch_norm", "layer_norm", "max_pool2d", "avg_pool2d", "grn", "global_avg_pool",
           "to_minkowski", "from_minkowski", "supports_geometry", "import_minkowski", "MinkowskiUnavailableError",
           "INSTALL_MINKOWSKI"]

INSTALL_MINKOWSKI = (
    "MinkowskiEngine 0.5.4 is built from source (CPU-only here): apt-get install -y libopenblas-dev "
    "build-essential, then, in an environment that already has torch: SETUPTOOLS_USE_DISTUTILS=stdlib "
    "MAX_JOBS=2 pip install --no-build-isolation MinkowskiEngine==0.5.4 (or pip install --no-build-isolation "
    "-e \".[minkowski]\"); see docs/minkowski.md")


class MinkowskiUnavailableError(BackendError, ImportError):
    """backend='minkowski' was asked for, but MinkowskiEngine cannot be imported."""


_ME = None


def import_minkowski():
    """``import MinkowskiEngine`` with the shims it needs on Python >= 3.10 (applied here only, never at
    our package import), or a MinkowskiUnavailableError saying how to install it."""
    global _ME
    if _ME is not None:
        return _ME
    # ME 0.5.4 does `from collections import Sequence` (removed from `collections` in Python 3.10)
    for name in ("Sequence", "Iterable", "Mapping"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    try:
        import MinkowskiEngine as ME
    except ImportError as e:
        raise MinkowskiUnavailableError(f"backend='minkowski' needs MinkowskiEngine, which cannot be imported "
                                        f"({e}). {INSTALL_MINKOWSKI}") from None
    _ME = ME
    return ME


_BRIDGE_KEY = "minkowski_bridge"


class _Bridge:
    """Our coordinate manager's active sets as MinkowskiEngine coordinate maps."""

    def __init__(self, manager):
        ME = import_minkowski()
        if manager.device.type != "cpu":
            raise SparseInputError(f"backend='minkowski' runs on the CPU build of MinkowskiEngine; the tensors "
                                   f"are on {manager.device}")
        self.ME = ME
        self.manager = manager
        self.cm = ME.CoordinateManager(D=2, coordinate_map_type=ME.CoordinateMapType.CPU)
        self.keys = {}    # our stride -> ME CoordinateMapKey
        self.orders = {}  # ME key -> None (same row order as ours) or (ours_of_me, me_of_ours)

    def key(self, stride: int):
        if stride not in self.keys:
            coords = self.manager.coordinates(stride).clone()
            coords[:, 1:] *= stride  # ME: coordinates on the input grid
            key, _ = self.cm.insert_and_map(coords.to(torch.int32).contiguous(), [stride, stride], "")
            self.keys[stride] = key
        return self.keys[stride]

    def order(self, key, stride: int):
        name = _key_name(key)
        if name not in self.orders:
            me = self.cm.get_coordinates(key).long()
            n = self.manager.num_rows(stride)
            h, w = self.manager.spatial_shape(stride)
            y, x = me[:, 1] // stride, me[:, 2] // stride
            inside = (me[:, 1] % stride == 0) & (me[:, 2] % stride == 0) & (y < h) & (x < w)
            ours = self.manager.row_index_grid(stride)[me[:, 0], y.clamp(max=h - 1), x.clamp(max=w - 1)]
            if me.shape[0] != n or not bool(inside.all()) or bool((ours < 0).any()):
                raise SparseInputError(f"MinkowskiEngine's active sites at stride {stride} ({me.shape[0]}) differ "
                                       f"from ours ({n}): the op's window is not one ME computes the same way")
            if torch.equal(ours, torch.arange(n)):
                self.orders[name] = None
            else:
                self.orders[name] = (ours, torch.empty_like(ours).index_copy_(0, ours, torch.arange(n)))
        return self.orders[name]

    def to_me(self, x: SparseTensor):
        key = self.key(x.stride)
        order = self.order(key, x.stride)
        features = x.features if order is None else gather_rows(x.features, order[0])
        return self.ME.SparseTensor(features, coordinate_map_key=key, coordinate_manager=self.cm)

    def from_me(self, y, stride: int) -> SparseTensor:
        if list(y.tensor_stride) != [stride, stride]:
            raise SparseInputError(f"MinkowskiEngine returned tensor stride {list(y.tensor_stride)}, expected {stride}")
        key = y.coordinate_map_key
        self.keys.setdefault(stride, key)
        order = self.order(key, stride)
        features = y.F if order is None else gather_rows(y.F, order[1])
        return SparseTensor(features, manager=self.manager, stride=stride)


def _key_name(key) -> tuple:
    """A hashable name of an ME ``CoordinateMapKey`` (``get_key()`` is ``([strides], string_id)``)."""
    strides, string_id = key.get_key()
    return tuple(int(s) for s in strides), str(string_id)


def _bridge(x: SparseTensor) -> _Bridge:
    return x.manager.cached(_BRIDGE_KEY, lambda: _Bridge(x.manager))


def to_minkowski(x: SparseTensor):
    """Our SparseTensor as an ``ME.SparseTensor`` (coordinates on the input grid, ME's row order)."""
    return _bridge(x).to_me(x)


def from_minkowski(y, like: SparseTensor, stride: int) -> SparseTensor:
    """An ``ME.SparseTensor`` made from ``to_minkowski(like)``'s coordinate manager -> our SparseTensor."""
    return _bridge(like).from_me(y, stride)


# -- ME modules as parameter-less templates ------------------------------------------------------

_TEMPLATES: dict = {}


def _template(key, build):
    module = _TEMPLATES.get(key)
    if module is None:
        module = build(import_minkowski())
        with torch.no_grad():
            for p in module.parameters():  # the real tensors come with every call (functional_call)
                p.data = p.data.new_empty(0)
        _TEMPLATES[key] = module
    return module


def supports_geometry(geom: WindowGeometry) -> bool:
    """ME's window: offsets -r..r (odd kernels, centred) or 0..k-1 (even kernels) per axis."""
    for k, d, lo in zip(geom.kernel, geom.dilation, geom.pad_lo):
        if (k % 2 == 1 and lo != d * (k // 2)) or (k % 2 == 0 and (lo != 0 or d != 1)):
            return False
    return True


def _check_geometry(geom: WindowGeometry, what: str) -> None:
    if not supports_geometry(geom):
        raise SparseInputError(f"backend='minkowski' cannot run this {what}: kernel {geom.kernel}, padding {geom.pad_lo}, "
                               f"dilation {geom.dilation}; MinkowskiEngine centres odd kernels (padding k//2 * dilation) "
                               "and starts even ones at offset 0 (padding 0). Use backend='native'")


def conv2d(x: SparseTensor, weight, bias, geom: WindowGeometry, groups: int) -> SparseTensor:
    _check_geometry(geom, "convolution")
    c_out, c_in_g, kh, kw = weight.shape
    depthwise = groups > 1 and groups == x.num_channels == c_out and c_in_g == 1
    if groups != 1 and not depthwise:
        raise SparseInputError(f"backend='minkowski' runs regular and depthwise convolutions, not groups={groups}")
    config = (list(geom.kernel), geom.stride, list(geom.dilation))
    if depthwise:
        module = _template(("channelwise", c_out, str(config), bias is not None),
                           lambda ME: ME.MinkowskiChannelwiseConvolution(
                               c_out, kernel_size=config[0], stride=config[1], dilation=config[2],
                               bias=bias is not None, dimension=2))
        params = {"kernel": dense_kernel_to_me(weight, depthwise=True)}
    else:
        module = _template(("conv", c_in_g, c_out, str(config), bias is not None),
                           lambda ME: ME.MinkowskiConvolution(
                               c_in_g, c_out, kernel_size=config[0], stride=config[1], dilation=config[2],
                               bias=bias is not None, dimension=2))
        params = {"kernel": dense_kernel_to_me(weight, stride=geom.stride)}
    if bias is not None:
        params["bias"] = dense_bias_to_me(bias)
    bridge = _bridge(x)
    return bridge.from_me(functional_call(module, params, (bridge.to_me(x),)), x.stride * geom.stride)


def _pool(x: SparseTensor, geom: WindowGeometry, kind: str) -> SparseTensor:
    _check_geometry(geom, f"{kind} pooling")
    config = (list(geom.kernel), geom.stride, list(geom.dilation))
    module = _template((kind, str(config)), lambda ME: getattr(ME, f"Minkowski{kind}Pooling")(
        kernel_size=config[0], stride=config[1], dilation=config[2], dimension=2))
    bridge = _bridge(x)
    return bridge.from_me(module(bridge.to_me(x)), x.stride * geom.stride)


def max_pool2d(x: SparseTensor, geom: WindowGeometry, border: float | None = None):
    """ME's max over active neighbours; a ``border`` value outside the image stays native."""
    return _pool(x, geom, "Max") if border is None else NotImplemented


def avg_pool2d(x: SparseTensor, geom: WindowGeometry, count_include_pad: bool = False):
    """ME's mean over active neighbours; dividing by the window area (``count_include_pad``) stays native."""
    return NotImplemented if count_include_pad else _pool(x, geom, "Avg")


def batch_norm(x: SparseTensor, bn, group=None):
    """``ME.MinkowskiBatchNorm`` with ``bn``'s parameters and running buffers (updated in place); synced
    across ranks (a process ``group``) it stays native."""
    if group is not None:
        return NotImplemented
    track = bn.track_running_stats
    module = _template(("bn", bn.num_features, bn.eps, bn.momentum, bn.affine, track),
                       lambda ME: ME.MinkowskiBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                                        affine=bn.affine, track_running_stats=track))
    module.train(bn.training)
    state = {f"bn.{k}": v for k, v in (*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False))
             if v is not None}
    bridge = _bridge(x)
    return bridge.from_me(functional_call(module, state, (bridge.to_me(x),)), x.stride)


def _on_features(x: SparseTensor, fn) -> SparseTensor:
    """A row-wise op on the ME tensor's features (how ConvNeXt V2's ME port writes LayerNorm)."""
    bridge = _bridge(x)
    me = bridge.to_me(x)
    out = bridge.ME.SparseTensor(fn(me.F), coordinate_map_key=me.coordinate_map_key, coordinate_manager=me.coordinate_manager)
    return bridge.from_me(out, x.stride)


def layer_norm(x: SparseTensor, ln) -> SparseTensor:
    return _on_features(x, lambda f: F.layer_norm(f, ln.normalized_shape, ln.weight, ln.bias, ln.eps))


def grn(x: SparseTensor, weight, bias, eps: float, mode: str) -> SparseTensor:
    """GRN per sample: ME global sum pooling of x^2 -> L2 norm -> broadcast back over the sample's rows;
    over the whole batch (``mode="batch"``) torch ops on the features, as the official MinkowskiGRN."""
    if mode == "batch":
        f = x.features
        g = safe_sqrt((f * f).sum(0, keepdim=True))
        return x.replace(f + torch.addcmul(bias, weight, f * (g / (g.mean(1, keepdim=True) + eps))))
    bridge = _bridge(x)
    ME = bridge.ME
    me = bridge.to_me(x)
    squares = ME.SparseTensor(me.F * me.F, coordinate_map_key=me.coordinate_map_key, coordinate_manager=me.coordinate_manager)
    sums = _template(("global_sum",), lambda ME: ME.MinkowskiGlobalSumPooling())(squares)
    g = safe_sqrt(sums.F)
    n = ME.SparseTensor(g / (g.mean(1, keepdim=True) + eps), coordinate_map_key=sums.coordinate_map_key,
                        coordinate_manager=sums.coordinate_manager)
    scaled = _template(("broadcast_mul",), lambda ME: ME.MinkowskiBroadcastMultiplication())(me, n)
    out = ME.SparseTensor(me.F + torch.addcmul(bias, weight, scaled.F), coordinate_map_key=me.coordinate_map_key,
                          coordinate_manager=me.coordinate_manager)
    return bridge.from_me(out, x.stride)


def safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 at 0 (the subgradient torch.norm uses), so all-zero channels give no NaN."""
    positive = s > 0
    return torch.where(positive, torch.where(positive, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))


def global_avg_pool(x: SparseTensor) -> torch.Tensor:
    """(B, C): ``ME.MinkowskiGlobalAvgPooling``, its rows placed by their batch index."""
    bridge = _bridge(x)
    out = _template(("global_avg",), lambda ME: ME.MinkowskiGlobalAvgPooling())(bridge.to_me(x))
    batch = out.C[:, 0].long()
    return out.F.new_zeros(x.batch_size, out.F.shape[1]).index_copy(0, batch, out.F)


register_backend(Backend(
    "minkowski", ops={"conv2d": conv2d, "max_pool2d": max_pool2d, "avg_pool2d": avg_pool2d, "batch_norm": batch_norm,
                      "layer_norm": layer_norm, "grn": grn, "global_avg_pool": global_avg_pool},
    require=import_minkowski, devices=("cpu",), runs_on="the CPU build of MinkowskiEngine", cuda_graph=False))

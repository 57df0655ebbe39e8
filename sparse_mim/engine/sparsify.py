"""Swap a dense CNN's layers for the engine's sparse counterparts, in place, keeping every parameter.

``sparsify_layers(model)`` first checks the whole model and raises ``UnsupportedLayerError`` listing
every layer it cannot run sparsely (path and type), before anything is changed or computed. Then
each supported layer is replaced by its sparse counterpart from ``engine.nn``, which takes over the *same*
``Parameter`` and buffer objects, so names, shapes, values (and any optimizer holding them) are
unchanged and the state_dict is identical. Layers are matched by exact type: a subclass may
compute something else in its own ``forward``.

Kept as they are: activation / dropout / identity modules (their functional calls run on the
engine's tensors through ``__torch_function__``), ``AdaptiveAvgPool2d(1)`` (per-sample mean over
active sites), ``Conv1d`` (ECA gates, dense (B, 1, C) input only), nearest ``Upsample`` by an integer
factor (HRNet; its ``F.interpolate`` moves to the finer stride's active set), timm's ``GammaAct``
(NFNet: an activation times a constant), and containers, whose own ``forward`` is glue code (see
``engine.dispatch``).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from . import nn as snn
from .errors import UnsupportedLayerError
from .ops.window import WindowGeometry

__all__ = ["sparsify_layers", "unsupported_layers", "supported_layer_types", "UnsupportedLayerError"]


def _optional(path: str, names: str) -> Tuple[type, ...]:
    """Classes ``names`` of module ``path`` (absent ones skipped: timm / torchvision are optional here)."""
    import importlib
    try:
        mod = importlib.import_module(path)
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names.split() if hasattr(mod, n))


# -- what is kept as it is ----------------------------------------------------------------------------
_KEPT_MODULES = ("torch.nn.modules.activation", "timm.layers.activations")
_KEPT_TYPES = (nn.Identity, nn.Dropout, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Conv1d) + \
    _optional("torchvision.ops.misc", "Permute") + _optional("timm.models.nfnet", "GammaAct") + \
    _optional("timm.layers.split_attn", "RadixSoftmax") + \
    _optional("timm.models.selecsls", "SelectSeq") + \
    _optional("timm.models.hgnet", "LearnableAffineBlock")  # glue: scale * x + bias with two scalar weights
_UPSAMPLE = (nn.Upsample, nn.UpsamplingNearest2d)  # kept: their F.interpolate runs in engine.dispatch
_NOT_POINTWISE = (nn.MultiheadAttention, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)  # nn.Softmax: over channels


def _kept(m: nn.Module) -> bool:
    t = type(m)
    if t in _KEPT_TYPES:
        return True
    return t.__module__ in _KEPT_MODULES and not isinstance(m, _NOT_POINTWISE)


def _is_engine_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith("sparse_mim.") or type(m).__module__ == "backbones" or \
        type(m).__module__.startswith("backbones.")


# -- sparse counterparts ---------------------------------------------------------------------------
def _same_padding(k: int, s: int, d: int) -> Tuple[int, int]:
    """TF 'SAME' padding (lo, hi) of timm's ``*Same`` layers for inputs that are multiples of the stride."""
    total = max(d * (k - 1) + 1 - s, 0)
    return total // 2, total - total // 2


def _same_geometry(m) -> WindowGeometry:
    k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(getattr(m, "dilation", 1))
    pads = [_same_padding(k[i], s[i], d[i]) for i in range(2)]
    return WindowGeometry(k, s[0], d, (pads[0][0], pads[1][0]), (pads[0][1], pads[1][1]))


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _adopt(sparse: nn.Module, dense: nn.Module) -> nn.Module:
    """Give ``sparse`` the very parameters, buffers and children of ``dense`` (same objects, same order)."""
    for name, p in dense._parameters.items():
        sparse._parameters[name] = p
    for name, b in dense._buffers.items():
        sparse._buffers[name] = b
        if name in dense._non_persistent_buffers_set:
            sparse._non_persistent_buffers_set.add(name)
    for name, child in dense._modules.items():
        sparse._modules[name] = child
    sparse.train(dense.training)
    left = [n for n, t in list(sparse.named_parameters()) + list(sparse.named_buffers()) if t.is_meta]
    if left and not any(t.is_meta for t in dense.parameters()):
        raise RuntimeError(f"{type(sparse).__name__} kept uninitialised tensors {left} from {type(dense).__name__}")
    return sparse


def _build(cls, dense: nn.Module, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):  # no memory or init time for weights that are replaced at once
        sparse = cls(*args, **kwargs)
    return _adopt(sparse, dense)


def _conv(cls, geometry=None, extra=lambda m: {}):
    def make(m: nn.Conv2d) -> nn.Module:
        sparse = _build(cls, m, m.in_channels, m.out_channels, m.kernel_size, m.stride,
                        0 if geometry else m.padding, m.dilation, m.groups, m.bias is not None, **extra(m))
        if geometry:
            sparse.geometry = geometry(m)
        if hasattr(m, "scale"):
            sparse.scale = m.scale
        return sparse
    return make


def _eps(m):
    return {"eps": m.eps}


def _batch_norm(cls):
    return lambda m: _build(cls, m, m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)


def _group_norm(m):
    return _build(snn.SparseGroupNorm, m, m.num_groups, m.num_channels, m.eps, m.affine)


def _layer_norm(layout: str):
    def make(m: nn.LayerNorm) -> nn.Module:
        sparse = _build(snn.SparseLayerNorm, m, m.normalized_shape, eps=m.eps, channels_first=layout == "nchw",
                        elementwise_affine=m.elementwise_affine, bias=m.bias is not None)
        sparse.layout = layout
        return sparse
    return make


def _grn(m):
    sparse = _build(snn.SparseGRN, m, m.weight.shape[0], m.eps)
    sparse.layout = "nhwc" if getattr(m, "channel_dim", -1) == -1 else "nchw"
    return sparse


def _linear(m: nn.Linear):
    sparse = _build(snn.SparseLinear, m, m.in_features, m.out_features, m.bias is not None)
    sparse.layout = "nhwc"
    return sparse


def _ceil_geometry(m) -> Optional[WindowGeometry]:
    """The window of a ``ceil_mode=True`` pool on grids that are multiples of its stride, or None where
    ceil mode does not keep the grid (input / stride).

    With input ``n * s``, ceil mode gives ``n + ceil((2p - k_eff) / s) + 1`` outputs, which is ``n`` iff
    ``s <= k_eff - 2p < 2s``; its last window then reaches ``k_eff - s - p`` sites past the end, i.e. a
    high-side padding of ``k_eff - s - p`` (VoVNet's 3x3/2 pool without padding: 0 low, 1 high, like TF
    'SAME'). Where ``k_eff - 2p == s`` this is floor mode's padding. At stride 1 ceil and floor mode
    agree (HGNet-V2's 2x2 stride-1 pool, fed a map padded by ``F.pad``): floor mode's window.
    """
    k, s, p, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(getattr(m, "dilation", 1))
    if s == (1, 1):
        return WindowGeometry.make(k, 1, p, d)
    hi = []
    for i in range(2):
        k_eff = d[i] * (k[i] - 1) + 1
        if not s[i] <= k_eff - 2 * p[i] < 2 * s[i]:
            return None
        hi.append(k_eff - s[i] - p[i])
    return WindowGeometry(k, s[0], d, p, (hi[0], hi[1]))


def _max_pool(m, geometry=None):
    if geometry is None and m.ceil_mode:
        geometry = _ceil_geometry(m)
    sparse = snn.SparseMaxPool2d(m.kernel_size, m.stride, 0 if geometry else m.padding, m.dilation)
    sparse.ceil_mode = m.ceil_mode  # the dense forward (plain tensors) stays the dense layer's
    if geometry is not None:
        sparse.geometry = geometry
    return _adopt(sparse, m)


def _avg_pool(m):
    sparse = snn.SparseAvgPool2d(m.kernel_size, m.stride, m.padding, m.count_include_pad, m.ceil_mode)
    if m.ceil_mode:
        sparse.geometry = _ceil_geometry(m)
    return _adopt(sparse, m)


def _drop_path(attr: str):
    return lambda m: _adopt(snn.SparseDropPath(getattr(m, attr)), m)


def _timm(names: str):
    return _optional("timm.layers", names)


_TIMM_CONV_SAME, _TIMM_STD, _TIMM_STD_SAME = _timm("Conv2dSame"), _timm("StdConv2d"), _timm("StdConv2dSame")
_TIMM_SSTD, _TIMM_SSTD_SAME = _timm("ScaledStdConv2d"), _timm("ScaledStdConv2dSame")
_TIMM_BLUR = _timm("BlurPool2d")

#: dense type -> builder of its sparse counterpart
SPARSE_COUNTERPARTS: Dict[type, Callable[[nn.Module], nn.Module]] = {nn.Conv2d: _conv(snn.SparseConv2d)}
for _t in _TIMM_CONV_SAME:
    SPARSE_COUNTERPARTS[_t] = _conv(snn.SparseConv2d, _same_geometry)
for _t in _TIMM_STD:
    SPARSE_COUNTERPARTS[_t] = _conv(snn.SparseStdConv2d, extra=_eps)
for _t in _TIMM_STD_SAME:
    SPARSE_COUNTERPARTS[_t] = _conv(snn.SparseStdConv2d, _same_geometry, extra=_eps)
for _t in _TIMM_SSTD:
    SPARSE_COUNTERPARTS[_t] = _conv(snn.SparseScaledStdConv2d, extra=_eps)
for _t in _TIMM_SSTD_SAME:
    SPARSE_COUNTERPARTS[_t] = _conv(snn.SparseScaledStdConv2d, _same_geometry, extra=_eps)
for _t in (nn.BatchNorm2d,) + _timm("BatchNormAct2d"):
    SPARSE_COUNTERPARTS[_t] = _batch_norm(snn.SparseBatchNorm2d)
for _t in (nn.SyncBatchNorm,) + _timm("SyncBatchNormAct"):
    SPARSE_COUNTERPARTS[_t] = _batch_norm(snn.SparseSyncBatchNorm)
for _t in (nn.GroupNorm,) + _timm("GroupNormAct GroupNorm1Act GroupNorm GroupNorm1"):
    SPARSE_COUNTERPARTS[_t] = _group_norm
for _t in (nn.LayerNorm,) + _timm("LayerNorm"):
    SPARSE_COUNTERPARTS[_t] = _layer_norm("nhwc")
for _t in _timm("LayerNorm2d") + _optional("torchvision.models.convnext", "LayerNorm2d"):
    SPARSE_COUNTERPARTS[_t] = _layer_norm("nchw")
for _t in _optional("timm.layers.grn", "GlobalResponseNorm"):
    SPARSE_COUNTERPARTS[_t] = _grn
SPARSE_COUNTERPARTS[nn.Linear] = _linear
SPARSE_COUNTERPARTS[nn.MaxPool2d] = _max_pool
for _t in _optional("timm.layers.pool2d_same", "MaxPool2dSame"):
    SPARSE_COUNTERPARTS[_t] = lambda m: _max_pool(m, _same_geometry(m))
SPARSE_COUNTERPARTS[nn.AvgPool2d] = _avg_pool
for _t in _timm("SpaceToDepth"):
    SPARSE_COUNTERPARTS[_t] = lambda m: _adopt(snn.SparseSpaceToDepth(m.bs), m)
for _t in _TIMM_BLUR:
    SPARSE_COUNTERPARTS[_t] = lambda m: _adopt(snn.SparseBlurPool2d(m.channels, m.filt_size, m.stride, m.pad_mode), m)
for _t in _timm("DropPath"):
    SPARSE_COUNTERPARTS[_t] = _drop_path("drop_prob")
for _t in _optional("torchvision.ops", "StochasticDepth"):
    SPARSE_COUNTERPARTS[_t] = _drop_path("p")
_PADS = (nn.ConstantPad2d, nn.ZeroPad2d)
_CONVS = tuple(t for t in SPARSE_COUNTERPARTS if issubclass(t, nn.Conv2d))


def supported_layer_types() -> List[str]:
    """Names of the dense layer types ``sparsify`` swaps for sparse counterparts (for docs and error messages)."""
    return sorted({f"{t.__module__.split('.')[0]}.{t.__name__}" for t in SPARSE_COUNTERPARTS})


# -- the check ------------------------------------------------------------------------------------------
def _refusal(m: nn.Module) -> Optional[str]:
    """Why ``m`` (of a type with a sparse counterpart) cannot be swapped, or None."""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (only zero padding reads masked sites as zero)"
        if _pair(m.stride)[0] != _pair(m.stride)[1]:
            return f"unequal strides {m.stride}"
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        s = _pair(m.stride)
        if getattr(m, "return_indices", False):
            return "return_indices=True"
        if s[0] != s[1]:
            return f"unequal strides {m.stride}"
        g = _ceil_geometry(m) if m.ceil_mode else None
        if m.ceil_mode and g is None:
            return (f"ceil_mode=True with kernel {m.kernel_size}, stride {m.stride}, padding {m.padding} "
                    "(changes the output grid: it is not input / stride)")
        if isinstance(m, nn.AvgPool2d) and g is not None and m.count_include_pad and g.pad_hi != g.pad_lo:
            return "ceil_mode=True with count_include_pad=True on overlapping windows (an uneven divisor)"
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        return "divisor_override"
    if type(m) in _TIMM_BLUR:
        if m.pad_mode not in ("reflect", "constant") or len(set(m.padding)) != 1:
            return f"pad_mode={m.pad_mode!r}, padding={m.padding} (only even reflect or zero padding)"
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
        return f"normalized_shape={tuple(m.normalized_shape)} (only the channel dim)"
    if hasattr(m, "scale_by_keep") and not m.scale_by_keep:
        return "scale_by_keep=False"
    if getattr(m, "mode", "row") != "row":
        return f"mode={m.mode!r} (only per-sample 'row' stochastic depth)"
    return None


def _fusable_pad(pad: nn.Module, nxt: Optional[nn.Module]) -> Optional[str]:
    """Why a padding layer cannot be folded into the window op after it, or None."""
    if nxt is None:
        return "padding is only supported right before a max pool or convolution in a Sequential"
    value = float(getattr(pad, "value", 0.0))
    if type(nxt) in (nn.MaxPool2d,) and _pair(nxt.padding) == (0, 0):
        return None
    if type(nxt) in _CONVS and not isinstance(nxt.padding, str) and value == 0.0 and \
            type(nxt) not in _TIMM_CONV_SAME + _TIMM_STD_SAME + _TIMM_SSTD_SAME:
        return None
    return f"padding (value {value}) before {type(nxt).__name__} cannot be folded into its window"


def _upsample_refusal(m: nn.Module) -> Optional[str]:
    """Why an upsampling layer has no sparse meaning, or None (nearest, one integer factor)."""
    f = m.scale_factor
    f = tuple(f) if isinstance(f, (tuple, list)) else (f, f)
    if m.mode not in ("nearest", "nearest-exact"):
        return f"mode={m.mode!r} (only nearest upsampling: each finer site takes its parent's value)"
    if m.size is not None or f[0] is None or f[0] != f[1] or float(f[0]) != int(f[0]):
        return f"size={m.size}, scale_factor={m.scale_factor} (only one integer scale factor)"
    return None


def _walk(module: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module, nn.Module, str]]:
    """(path, module, parent, name) of every descendant, parents first."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child, module, name
        yield from _walk(child, path)


def _next_sibling(parent: nn.Module, name: str) -> Optional[nn.Module]:
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    i = names.index(name)
    return parent._modules[names[i + 1]] if i + 1 < len(names) else None


def unsupported_layers(model: nn.Module) -> List[Tuple[str, str, str]]:
    """(path, type, reason) of every layer ``sparsify_layers`` would refuse."""
    found = []
    for path, m, parent, name in _walk(model):
        t = type(m)
        if t in SPARSE_COUNTERPARTS:
            why = _refusal(m)
        elif isinstance(m, _PADS):
            why = _fusable_pad(m, _next_sibling(parent, name))
        elif isinstance(m, _UPSAMPLE):
            why = _upsample_refusal(m)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            why = None if _pair(m.output_size) == (1, 1) else f"output_size={m.output_size} (only global pooling)"
        elif _kept(m) or _is_engine_module(m):
            why = None
        elif len(m._modules) == 0:
            why = "no sparse counterpart for this layer type"
        else:
            why = None  # a container: its forward is glue, checked op by op at run time
        if why is not None:
            found.append((path, f"{t.__module__}.{t.__qualname__}", why))
    return found


def sparsify_layers(model: nn.Module) -> nn.Module:
    """Check ``model`` (raise ``UnsupportedLayerError`` listing every refused layer), then swap each
    supported layer for its sparse counterpart in place. Returns ``model``."""
    refused = unsupported_layers(model)
    if refused:
        lines = "\n".join(f"  {p} ({t}): {why}" for p, t, why in refused)
        raise UnsupportedLayerError(
            f"{len(refused)} layer(s) of {type(model).__name__} cannot run sparsely:\n{lines}\n"
            f"Supported layers: {', '.join(supported_layer_types())}, activations, dropout, Identity, "
            "AdaptiveAvgPool2d(1), nearest Upsample and the glue ops of sparse_mim.engine.dispatch. Replace these "
            "layers or leave them out of the encoder.", [(p, t) for p, t, _ in refused])
    for path, m, parent, name in list(_walk(model)):
        if isinstance(m, _PADS):
            _fold_pad(parent, name, m)
    for path, m, parent, name in list(_walk(model)):
        make = SPARSE_COUNTERPARTS.get(type(m))
        if make is not None and parent._modules.get(name) is m:
            parent._modules[name] = make(m)
    return model


def _fold_pad(parent: nn.Sequential, name: str, pad: nn.Module) -> None:
    """``pad`` then window op -> Identity then the window op with the padding in its geometry."""
    nxt = _next_sibling(parent, name)
    left, right, top, bottom = pad.padding
    if isinstance(nxt, nn.MaxPool2d):
        sparse = _max_pool(nxt)
        g = sparse.geometry
        sparse.geometry = WindowGeometry(g.kernel, g.stride, g.dilation, (top, left), (bottom, right))
        sparse.border = float(pad.value)
    else:
        sparse = SPARSE_COUNTERPARTS[type(nxt)](nxt)
        g = sparse.geometry
        sparse.geometry = WindowGeometry(g.kernel, g.stride, g.dilation, (g.pad_lo[0] + top, g.pad_lo[1] + left),
                                         (g.pad_hi[0] + bottom, g.pad_hi[1] + right))
    names = list(parent._modules)
    parent._modules[names[names.index(name) + 1]] = sparse
    parent._modules[name] = nn.Identity()

"""``__torch_function__`` for the engine's tensors: the glue code of an ordinary model's ``forward``.

A sparsified model keeps its own ``forward``; the layers are the engine's sparse counterparts, and what lies
between them runs here. Supported (everything else is an ``UnsupportedOperationError`` naming the
function, never a silent dense computation):

* pointwise ops (activations called functionally, ``+``, ``+=``, ``*``, ``/``, ``clamp``, ...):
  applied to the active rows. Operands are other tensors on the same active sites, scalars, or
  dense tensors that broadcast per channel (``(C,1,1)``, ``(1,C,1,1)``) or per sample and channel
  (``(B,C,1,1)``, a squeeze-excitation gate). In the masked-dense reference an op that does not map
  0 to 0 (``sigmoid``, ``x + bias``) is followed by re-masking, so masked sites stay zero.
* ``permute`` between NCHW and NHWC (ConvNeXt's channels-last MLP): only the logical layout changes.
* ``torch.cat`` along channels (DenseNet), ``expand_as`` of a gate, ``contiguous``.
* ``mean`` / ``sum`` over the spatial dims and ``adaptive_avg_pool2d(x, 1)``: per sample over its
  ACTIVE sites, returned as a dense ``(B, C[, 1, 1])`` tensor (squeeze-excitation, ECA).
* channel slices: ``x[:, a:b]`` (step 1; ``x[..., a:b]`` channels last), ``split`` / ``torch.split``,
  ``chunk``, ``tensor_split`` and ``narrow`` along the channels (GhostNet, ReXNet, CSPNet, Res2Net,
  DPN, MixNet, ShuffleNetV2): every site keeps its row, the result is a view of the channels.
* channel regrouping: ``view`` / ``reshape`` between ``(B, C, H, W)`` and ``(B, g, C/g, H, W)``,
  ``torch.stack(maps, 1)``, ``transpose(1, 2)`` of the grouped view (a channel shuffle),
  ``flatten(1, 2)``; ``sum`` / ``mean`` / ``softmax`` over the group axis 1 and products with
  ``(B, g, C/g, 1, 1)`` gates (ResNeSt's split attention, SKNet's selective kernels). Only the
  channel axis is regrouped (``SiteTensor.channel_groups``); spatial dims are never merged or split.
* ``softmax`` over the channels of each site; ``mean`` / ``sum`` / ``amax`` over the channels with
  ``keepdim=True`` (CBAM's spatial gate); masked sites stay zero in the reference.
* ``F.interpolate`` / ``nn.Upsample``, nearest with one integer factor: each site of the finer stride
  takes its parent's value, on the manager's active set of that stride (HRNet, GhostNet V2).
* ``F.avg_pool2d`` / ``F.max_pool2d`` called functionally: the sparse pooling layers' semantics.
* ``F.pad`` with zeros right before a convolution or max pool: folded into its window (``engine.pad``).

A ReLU of a BatchNorm's rows (inside ``engine.recompute.saving()``, as every sparse encoder's forward
runs) is saved for backward as a recipe and rebuilt from the norm's input (``engine.recompute``), the
same for a hand-tuned backbone's activation module and a sparsified model's ``nn.ReLU``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

from . import recompute
from .coords import SparseInputError
from .errors import UnsupportedOperationError
from .gather import gather_rows
from .ops.resample import upsample_nearest
from .pad import FOLDS, PaddedSites, pad as pad_sites
from .ops.per_sample import global_avg_pool, per_sample_sum
from .tensor import MaskedDenseTensor, SiteTensor, SparseTensor

__all__ = ["dispatch", "POINTWISE", "ZERO_PRESERVING"]


def _variants(*names: str):
    """The torch / Tensor-method / functional spellings (and in-place forms) of each op name."""
    out = set()
    for n in names:
        for ns in (torch, torch.Tensor, F, torch.special):
            for m in (n, n + "_"):
                f = getattr(ns, m, None)
                if callable(f):
                    out.add(f)
    return out


#: f(0) == 0 for these, so masked sites of the masked-dense reference stay zero without re-masking.
ZERO_PRESERVING = _variants("relu", "relu6", "gelu", "silu", "hardswish", "mish", "elu", "selu", "celu",
                            "leaky_relu", "tanh", "hardtanh", "hardshrink", "softshrink", "dropout",
                            "neg", "abs", "clone", "sin", "sign", "square", "sqrt", "rrelu", "prelu",
                            "contiguous", "__neg__")
_UNARY_OTHER = _variants("sigmoid", "hardsigmoid", "exp", "softplus", "log_sigmoid", "logsigmoid", "cos",
                         "erf", "reciprocal", "rsqrt", "log", "log1p", "expit", "pow", "float", "double",
                         "half", "bfloat16", "type_as", "clamp", "clamp_min", "clamp_max", "clip",
                         "threshold", "to")
_MULTIPLY = _variants("mul", "multiply", "div", "divide", "true_divide", "__mul__", "__rmul__", "__imul__",
                      "__truediv__", "__itruediv__")
_ADD = _variants("add", "sub", "subtract", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
                 "__isub__")
_OTHER_BINARY = _variants("addcmul", "addcdiv", "maximum", "minimum", "where", "lerp")
POINTWISE = ZERO_PRESERVING | _UNARY_OTHER | _MULTIPLY | _ADD | _OTHER_BINARY
_INPLACE_DUNDER = {torch.Tensor.__iadd__, torch.Tensor.__isub__, torch.Tensor.__imul__,
                   torch.Tensor.__itruediv__}


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return func in _INPLACE_DUNDER or (name.endswith("_") and not name.endswith("__"))


def _sites_of(args) -> list:
    """Every SiteTensor in ``args`` (nested lists / tuples), in order. Iterative on purpose: a recursive
    closure is a reference cycle (function <-> cell) that would keep the found tensors, whole feature
    maps, alive until Python's cycle collector runs (docs/notes.md, "Where masked-dense memory went")."""
    found, stack = [], [args]
    while stack:
        a = stack.pop()
        if isinstance(a, SiteTensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            stack.extend(reversed(a))
    return found


def _check_same(ref: SiteTensor, other: SiteTensor, what: str) -> None:
    if type(other) is not type(ref):
        raise UnsupportedOperationError(f"{what}: cannot combine {type(ref).__name__} with {type(other).__name__}")
    if other.manager is not ref.manager or other.stride != ref.stride:
        raise SparseInputError(f"{what}: operands live on different active sets (stride {ref.stride} vs "
                               f"{other.stride}, or another batch's coordinate manager)")
    if other.layout != ref.layout:
        raise UnsupportedOperationError(f"{what}: operands have different layouts ({ref.layout} vs {other.layout})")
    if other.channel_groups != ref.channel_groups:
        raise UnsupportedOperationError(f"{what}: operands have different shapes ({tuple(ref.shape)} vs "
                                        f"{tuple(other.shape)})")


def _as_operand(t: torch.Tensor, ref: SiteTensor, what: str) -> torch.Tensor:
    """A dense operand, broadcast as against ``ref.shape``, in the form ``ref``'s data broadcasts with."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    if ref.channel_groups is not None:
        t = _grouped_operand(t, ref, what)
    if t.dim() > 4:
        raise UnsupportedOperationError(f"{what}: a {t.dim()}-d operand cannot broadcast with a 4-d feature map")
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if ref.layout == "nhwc":
        t4 = t4.permute(0, 3, 1, 2)
    b, c, h, w = t4.shape
    ok_c = c in (1, ref.num_channels)
    ok_b = b in (1, ref.batch_size)
    if not (ok_c and ok_b and (h, w) == (1, 1)):
        raise UnsupportedOperationError(
            f"{what}: a dense operand of shape {tuple(t.shape)} does not broadcast per channel or per sample "
            f"against {tuple(ref.shape)}; only (C,1,1), (1,C,1,1), (B,C,1,1) and scalars do (spatially varying "
            "dense operands would read masked sites)")
    if isinstance(ref, MaskedDenseTensor):
        return t4
    rows = t4.reshape(b, c)
    if b == 1:
        return rows
    return gather_rows(rows, ref.manager.batch_index(ref.stride))


def _grouped_operand(t: torch.Tensor, ref: SiteTensor, what: str) -> torch.Tensor:
    """A dense operand of a channel-grouped ``(B, g, C, H, W)`` tensor as the 4-d ``(b, g*C, 1, 1)`` one
    its data broadcasts with: per-sample gates over the groups (split attention, selective kernels)."""
    b, g, c = ref.shape[:3]
    t5 = t.reshape((1,) * (5 - t.dim()) + tuple(t.shape)) if t.dim() <= 5 else t
    if t5.dim() != 5 or tuple(t5.shape[3:]) != (1, 1) or t5.shape[0] not in (1, b) or \
            t5.shape[1] not in (1, g) or t5.shape[2] not in (1, c):
        raise UnsupportedOperationError(
            f"{what}: a dense operand of shape {tuple(t.shape)} does not broadcast per sample and channel against "
            f"the channel-grouped {tuple(ref.shape)}; only (B, g, C, 1, 1)-like gates and scalars do")
    return t5.expand(t5.shape[0], g, c, 1, 1).reshape(t5.shape[0], g * c, 1, 1)


def _unwrap(a, ref: SiteTensor, what: str):
    if isinstance(a, SiteTensor):
        _check_same(ref, a, what)
        return a.data
    if isinstance(a, torch.Tensor):
        return _as_operand(a, ref, what)
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(b, ref, what) for b in a)
    return a


def _pointwise(func, args, kwargs):
    what = _name(func)
    ref = _sites_of(args)[0]
    if kwargs.get("out") is not None:
        raise UnsupportedOperationError(f"{what}(out=...) is not supported on sparse tensors")
    if kwargs.get("inplace"):
        kwargs = dict(kwargs, inplace=False)  # in place on our wrapper below
        inplace = True
    else:
        inplace = _is_inplace(func)
    data = _relu_rebuilt_in_backward(func, args, kwargs)
    if data is None:
        data = func(*_unwrap(args, ref, what), **{k: _unwrap(v, ref, what) for k, v in kwargs.items()})
    if isinstance(ref, MaskedDenseTensor) and not _keeps_zeros(func, args):
        data = data * ref.mask()
    if inplace and isinstance(args[0], SiteTensor):
        target = args[0]
        if isinstance(target, SparseTensor):
            target.features = data
        else:
            target.dense_features = data
        return target
    return ref.replace(data)


def _keeps_zeros(func, args) -> bool:
    if func in ZERO_PRESERVING:
        return True
    if func in _MULTIPLY:  # site * anything, anything * site, site / anything
        return "mul" in func.__name__ or isinstance(args[0], SiteTensor)
    if func in _ADD:
        return all(isinstance(a, SiteTensor) or (isinstance(a, (int, float)) and a == 0) for a in args[:2])
    return False


# -- shape glue ----------------------------------------------------------------------------------------
_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _dims(dims) -> tuple:
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = tuple(dims[0])
    return tuple(int(d) % 4 for d in dims)


def _permute(x, *dims, **kwargs):
    dims = _dims(dims or (kwargs.get("dims"),))
    if x.layout == "nchw" and dims == _TO_NHWC:
        out = x.replace(x.data)
        out.layout = "nhwc"
        return out
    if x.layout == "nhwc" and dims == _TO_NCHW:
        out = x.replace(x.data)
        out.layout = "nchw"
        return out
    raise UnsupportedOperationError(
        f"permute{dims} of a {x.layout.upper()} sparse tensor: only NCHW <-> NHWC (0,2,3,1) / (0,3,1,2) is "
        "supported (other permutations would mix spatial and channel axes)")


def _channel_dim(x: SiteTensor) -> int:
    return 1 if x.layout == "nchw" else 3


def _site_inputs(tensors, what: str) -> list:
    """The inputs of ``torch.cat`` / ``torch.stack``: all sparse tensors (checked on the same sites by the caller)."""
    tensors = list(tensors)
    if not all(isinstance(t, SiteTensor) for t in tensors):
        raise UnsupportedOperationError(f"{what} of sparse and dense tensors: every input must be a sparse "
                                        "tensor on the same active sites")
    return tensors


def _cat(tensors, dim=0, **kwargs):
    dim = kwargs.pop("axis", dim)
    tensors = _site_inputs(tensors, "torch.cat")
    ref = tensors[0]
    if int(dim) % 4 != _channel_dim(ref):
        raise UnsupportedOperationError(f"torch.cat along dim {dim} of {ref.layout.upper()} sparse tensors: only "
                                        "concatenation along channels is supported")
    for t in tensors[1:]:
        _check_same(ref, t, "torch.cat")
    return ref.replace(torch.cat([t.data for t in tensors], 1))


def _spatial_mean(x: SiteTensor, keepdim: bool, dtype=None) -> torch.Tensor:
    """(B, C) or keepdim (B, C, 1, 1) / (B, 1, 1, C): mean over each sample's active sites."""
    out = global_avg_pool(x)
    if dtype is not None:
        out = out.to(dtype)
    return _spatial_keepdim(x, out, keepdim)


def _spatial_keepdim(x, out, keepdim):
    if not keepdim:
        return out
    return out[:, :, None, None] if x.layout == "nchw" else out[:, None, None, :]


def _spatial_sum(x: SiteTensor, keepdim: bool, dtype=None) -> torch.Tensor:
    if isinstance(x, MaskedDenseTensor):
        out = x.dense_features.sum((2, 3))
    else:
        out = per_sample_sum(x, x.features)
    if dtype is not None:
        out = out.to(dtype)
    return _spatial_keepdim(x, out, keepdim)


def _reduction(reduce, name):
    """``mean`` / ``sum`` handler: over the spatial dims (per sample over active sites, dense result),
    over the group axis of a channel-grouped tensor (split attention, selective kernels), or over the
    channels with ``keepdim`` (a one-channel map at the same sites, CBAM's spatial gate)."""
    def handler(x, dim=None, keepdim=False, *, dtype=None, **kwargs):
        if kwargs.get("axis") is not None:
            dim = kwargs.pop("axis")
        dims = None if dim is None else set(_norm_dims(x, dim))
        if x.channel_groups is not None and dims == {1}:
            return _group_reduce(x, name, keepdim, dtype)
        spatial = {2, 3} if x.layout == "nchw" else {1, 2}
        if x.channel_groups is None and dims == {_channel_dim(x)} and keepdim:
            return _channel_reduce(x, name, dtype)
        if x.channel_groups is not None or dims != spatial:
            raise UnsupportedOperationError(
                f"{name} over dims {dim} of a {tuple(x.shape)} {x.layout.upper()} sparse tensor: only the spatial "
                f"dims {tuple(sorted(spatial))} (per sample over active sites), the channels with keepdim=True, "
                "or the group axis 1 of a channel-grouped tensor are supported")
        return reduce(x, keepdim, dtype)
    return handler


def _norm_dims(x: SiteTensor, dim) -> tuple:
    dims = tuple(dim) if isinstance(dim, (list, tuple, torch.Size)) else (dim,)
    return tuple(int(d) % x.dim() for d in dims)


def _group_reduce(x: SiteTensor, name: str, keepdim: bool, dtype) -> SiteTensor:
    """``x.sum(1)`` / ``x.mean(1)`` of a ``(B, g, C, H, W)`` tensor: the groups of each site combined."""
    g = x.channel_groups
    data = x.data
    grouped = data.view(data.shape[0], g, data.shape[1] // g, *data.shape[2:])
    out = getattr(grouped, name)(1, dtype=dtype)
    return x.grouped(1 if keepdim else None, out)


def _channel_reduce(x: SiteTensor, name: str, dtype) -> SiteTensor:
    """``x.mean(1, keepdim=True)``: one channel at the same sites (masked sites stay zero)."""
    return x.replace(getattr(x.data, name)(1, keepdim=True, dtype=dtype))


def _amax(x, dim=None, keepdim=False, **kwargs):
    dims = None if dim is None else set(_norm_dims(x, dim))
    if x.channel_groups is not None or dims != {_channel_dim(x)} or not keepdim:
        raise UnsupportedOperationError(f"amax over dims {dim} of a {tuple(x.shape)} sparse tensor: only the "
                                        "channels with keepdim=True are supported (a max over sites would read "
                                        "masked ones)")
    return x.replace(x.data.amax(1, keepdim=True))


def _softmax(x, dim=None, *args, dtype=None, **kwargs):
    """Softmax over the channels of each site, or over the group axis of a channel-grouped tensor."""
    what = "softmax"
    if dim is None:
        dim = kwargs.pop("axis", None)
    d = None if dim is None else int(dim) % x.dim()
    data = x.data
    if x.channel_groups is not None and d == 1:
        g = x.channel_groups
        view = data.view(data.shape[0], g, data.shape[1] // g, *data.shape[2:])
        out = torch.softmax(view, 1, dtype=dtype).reshape(data.shape)
    elif x.channel_groups is None and d == _channel_dim(x):
        out = torch.softmax(data, 1, dtype=dtype)
    else:
        raise UnsupportedOperationError(f"{what} over dim {dim} of a {tuple(x.shape)} sparse tensor: only over the "
                                        "channels, or the group axis 1 of a channel-grouped tensor, is supported")
    return x.masked(out) if isinstance(x, MaskedDenseTensor) else x.replace(out)


def _adaptive_avg_pool2d(x, output_size):
    size = tuple(output_size) if isinstance(output_size, (list, tuple)) else (output_size, output_size)
    if size != (1, 1) or x.layout != "nchw" or x.channel_groups is not None:
        raise UnsupportedOperationError(f"adaptive_avg_pool2d to {output_size}: only global pooling (output size 1) "
                                        "of an NCHW sparse tensor is supported")
    return _spatial_mean(x, True)


def _expand_as(t, other):
    """``gate.expand_as(x)`` (ECA): broadcasting does the expansion when the gate meets ``x``."""
    if isinstance(t, SiteTensor):
        return t
    _as_operand(t, other, "expand_as")  # checks that it broadcasts
    return t


def _contiguous(x, *args, **kwargs):
    return x


# -- channel slices --------------------------------------------------------------------------------------
# Every site keeps its row; a slice of the channels is a view of the rows (or of the masked-dense map).

def _channel_range(x: SiteTensor, start: int, stop: int) -> SiteTensor:
    if start == 0 and stop == x.num_channels:
        return x
    return x.replace(x.data[:, start:stop])


def _check_channel_dim(x: SiteTensor, dim, what: str) -> None:
    if x.channel_groups is not None or int(dim) % 4 != _channel_dim(x):
        raise UnsupportedOperationError(
            f"{what} along dim {dim} of a {tuple(x.shape)} {x.layout.upper()} sparse tensor: only along the "
            f"channels (dim {_channel_dim(x)}) is supported (rows keep their sites; space cannot be cut)")


def _sections(x: SiteTensor, sizes) -> tuple:
    out, start = [], 0
    for n in sizes:
        out.append(_channel_range(x, start, start + n))
        start += n
    return tuple(out)


def _getitem(x, index):
    """``x[:, a:b]`` (and ``x[:, a:b, :, :]``, ``x[..., a:b]`` channels last): a channel slice."""
    c = x.num_channels
    entries = index if isinstance(index, tuple) else (index,)
    if x.channel_groups is None and sum(e is Ellipsis for e in entries) <= 1:
        if Ellipsis in entries:
            i = entries.index(Ellipsis)
            entries = entries[:i] + (slice(None),) * (4 - len(entries) + 1) + entries[i + 1:]
        entries = entries + (slice(None),) * (4 - len(entries))
        cd = _channel_dim(x)
        if len(entries) == 4 and all(isinstance(e, slice) for e in entries) and \
                all(e == slice(None) for i, e in enumerate(entries) if i != cd):
            start, stop, step = entries[cd].indices(c)
            if step == 1:
                return _channel_range(x, start, max(start, stop))
    raise UnsupportedOperationError(
        f"indexing a sparse tensor ({x!r}[{index!r}]) is not supported: only channel slices with step 1 "
        "(x[:, a:b]) are; sparse rows have no dense spatial axes; index the result of .dense() instead")


def _split(x, split_size_or_sections, dim=0):
    _check_channel_dim(x, dim, "split")
    c = x.num_channels
    if isinstance(split_size_or_sections, int):
        n = split_size_or_sections
        sizes = [min(n, c - i) for i in range(0, c, n)]
    else:
        sizes = [int(n) for n in split_size_or_sections]
        if sum(sizes) != c:
            raise UnsupportedOperationError(f"split sizes {sizes} do not add up to the {c} channels")
    return _sections(x, sizes)


def _chunk(x, chunks, dim=0):
    _check_channel_dim(x, dim, "chunk")
    c = x.num_channels
    n = -(-c // int(chunks))
    return _sections(x, [min(n, c - i) for i in range(0, c, n)])


def _tensor_split(x, indices_or_sections, dim=0):
    _check_channel_dim(x, dim, "tensor_split")
    c = x.num_channels
    if isinstance(indices_or_sections, int):
        q, r = divmod(c, indices_or_sections)
        sizes = [q + 1] * r + [q] * (indices_or_sections - r)
        return _sections(x, sizes)
    bounds = [0] + [min(max(int(i) if i >= 0 else c + int(i), 0), c) for i in indices_or_sections] + [c]
    return tuple(_channel_range(x, a, max(a, b)) for a, b in zip(bounds, bounds[1:]))


def _narrow(x, dim, start, length):
    _check_channel_dim(x, dim, "narrow")
    start = int(start) % x.num_channels if int(start) < 0 else int(start)
    if start + int(length) > x.num_channels:
        raise UnsupportedOperationError(f"narrow: channels {start}:{start + int(length)} exceed {x.num_channels}")
    return _channel_range(x, start, start + int(length))


# -- channel regrouping ---------------------------------------------------------------------------------
# A dense model may view its channels as groups, (B, C, H, W) <-> (B, g, C/g, H, W), and reduce or gate
# over the groups. On sparse rows this is bookkeeping (``channel_groups``), never a move of sites.

def _target_shape(x: SiteTensor, shape) -> tuple:
    if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)):
        shape = tuple(shape[0])
    shape = [int(s) for s in shape]
    total = 1
    for s in x.shape:
        total *= s
    if shape.count(-1) == 1:
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        shape[shape.index(-1)] = total // known if known else 0
    return tuple(shape)


def _reshape(x, *shape, **kwargs):
    """``view`` / ``reshape`` that only regroups channels: (B, C, H, W) <-> (B, g, C/g, H, W)."""
    target = _target_shape(x, shape or (kwargs.get("shape", kwargs.get("size")),))
    b, h, w = x.batch_size, *x.spatial_shape
    c = x.num_channels
    if target == tuple(x.shape):
        return x
    if x.layout == "nchw":
        if target == (b, c, h, w):
            return x.grouped(None)
        if len(target) == 5 and target[0] == b and target[3:] == (h, w) and target[1] * target[2] == c:
            return x.grouped(target[1])
    raise UnsupportedOperationError(
        f"reshape / view of a sparse tensor from {tuple(x.shape)} to {target}: only regrouping the channels, "
        "(B, C, H, W) <-> (B, g, C/g, H, W), is supported; spatial dims are never merged or split (sparse rows "
        "have no dense spatial axes)")


def _flatten(x, start_dim=0, end_dim=-1):
    s, e = int(start_dim) % x.dim(), int(end_dim) % x.dim()
    if s == e:
        return x
    if x.channel_groups is not None and (s, e) == (1, 2):
        return x.grouped(None)
    raise UnsupportedOperationError(
        f"{_name(torch.Tensor.flatten)} is not supported on sparse tensors for dims {start_dim}..{end_dim} of "
        f"{tuple(x.shape)}: it would merge spatial dims; only flatten(1, 2) of a channel-grouped tensor is")


def _transpose(x, dim0, dim1):
    """``transpose(1, 2)`` of a ``(B, g, C, H, W)`` tensor: the channel shuffle (a channel permutation)."""
    dims = tuple(sorted(_norm_dims(x, (dim0, dim1))))
    if x.channel_groups is None or dims != (1, 2):
        raise UnsupportedOperationError(
            f"transpose({dim0}, {dim1}) of a {tuple(x.shape)} sparse tensor: only transpose(1, 2) of a "
            "channel-grouped (B, g, C/g, H, W) tensor (a channel shuffle) is supported")
    g = x.channel_groups
    data = x.data
    n, c = data.shape[0], data.shape[1]
    out = data.view(n, g, c // g, *data.shape[2:]).transpose(1, 2).reshape(data.shape)
    return x.grouped(c // g, out)


def _stack(tensors, dim=0, **kwargs):
    """``torch.stack(branches, 1)`` of maps on the same sites: a channel-grouped ``(B, n, C, H, W)``."""
    dim = kwargs.pop("axis", dim)
    tensors = _site_inputs(tensors, "torch.stack")
    ref = tensors[0]
    if int(dim) % 5 != 1 or ref.layout != "nchw" or ref.channel_groups is not None:
        raise UnsupportedOperationError(f"torch.stack along dim {dim} of {tuple(ref.shape)} sparse tensors: only "
                                        "stacking NCHW maps along a new axis 1 (B, n, C, H, W) is supported")
    for t in tensors[1:]:
        _check_same(ref, t, "torch.stack")
    return ref.grouped(len(tensors), torch.cat([t.data for t in tensors], 1))


def _interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None,
                 antialias=False):
    """Nearest upsampling by an integer factor onto the finer active set (HRNet's fuse layers)."""
    h, w = x.spatial_shape
    if size is not None:
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        factors = (size[0] / h, size[1] / w)
    else:
        factors = tuple(scale_factor) if isinstance(scale_factor, (list, tuple)) else (scale_factor, scale_factor)
    f = factors[0]
    if mode not in ("nearest", "nearest-exact") or antialias or factors[0] != factors[1] or \
            float(f) != int(f) or int(f) < 1 or x.channel_groups is not None or x.layout != "nchw":
        raise UnsupportedOperationError(
            f"interpolate(mode={mode!r}, size={size}, scale_factor={scale_factor}) of a {tuple(x.shape)} sparse "
            "tensor: only nearest upsampling by one integer factor is supported (each finer site takes its "
            "parent's value)")
    return upsample_nearest(x, int(f))


def _avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    """``F.avg_pool2d`` called in a forward (GhostNet V2's gate), as ``nn.AvgPool2d``'s sparse counterpart."""
    return _pool_layer(x, "avg_pool2d", torch.nn.AvgPool2d(kernel_size, stride, padding, ceil_mode,
                                                            count_include_pad, divisor_override))


def _max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return _pool_layer(x, "max_pool2d", torch.nn.MaxPool2d(kernel_size, stride, padding, dilation, return_indices,
                                                            ceil_mode))


def _pool_layer(x, name: str, layer: torch.nn.Module):
    from .sparsify import SPARSE_COUNTERPARTS, _refusal
    why = _refusal(layer)
    if why is not None:
        raise UnsupportedOperationError(f"torch.nn.functional.{name} with {why}")
    return SPARSE_COUNTERPARTS[type(layer)](layer)(x)


_HANDLERS: Dict[Any, Callable] = {
    torch.Tensor.permute: _permute, torch.permute: _permute,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
    torch.Tensor.mean: _reduction(_spatial_mean, "mean"), torch.mean: _reduction(_spatial_mean, "mean"),
    torch.Tensor.sum: _reduction(_spatial_sum, "sum"), torch.sum: _reduction(_spatial_sum, "sum"),
    torch.Tensor.amax: _amax, torch.amax: _amax,
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d, torch.Tensor.expand_as: _expand_as,
    torch.Tensor.contiguous: _contiguous, torch.Tensor.__getitem__: _getitem,
    torch.Tensor.split: _split, torch.split: _split, torch.Tensor.chunk: _chunk, torch.chunk: _chunk,
    torch.Tensor.tensor_split: _tensor_split, torch.tensor_split: _tensor_split,
    torch.Tensor.narrow: _narrow, torch.narrow: _narrow,
    torch.Tensor.view: _reshape, torch.Tensor.reshape: _reshape, torch.reshape: _reshape,
    torch.Tensor.flatten: _flatten, torch.flatten: _flatten,
    torch.Tensor.transpose: _transpose, torch.transpose: _transpose,
    torch.Tensor.swapaxes: _transpose, torch.swapaxes: _transpose,
    torch.Tensor.swapdims: _transpose, torch.swapdims: _transpose,
    torch.stack: _stack, torch.softmax: _softmax, torch.Tensor.softmax: _softmax, F.softmax: _softmax,
    F.interpolate: _interpolate, F.avg_pool2d: _avg_pool2d, F.max_pool2d: _max_pool2d,
}
# -- zero padding before a window op (engine.pad) --------------------------------------------------------
def _pad(x, pad, mode="constant", value=None):
    """``F.pad`` with zeros: kept for the convolution or max pool that reads it next (``engine.pad``)."""
    return pad_sites(x, pad, mode, value)


_HANDLERS[F.pad] = _pad
if getattr(F, "_max_pool2d", None) is not None:  # the plain version behind F.max_pool2d's dispatch
    _HANDLERS[F._max_pool2d] = _max_pool2d


def _name(func) -> str:
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if "Tensor" in qual:
        return f"torch.{qual}"
    return f"{mod}.{qual}" if mod and not qual.startswith(mod) else qual


def dispatch(func, args, kwargs):
    """Run torch function ``func`` whose arguments include one of the engine's tensors."""
    if any(isinstance(a, PaddedSites) for a in args):
        raise UnsupportedOperationError(f"{_name(func)} of a zero-padded sparse map (F.pad): {FOLDS}")
    handler = _HANDLERS.get(func)
    if handler is not None:
        return handler(*args, **kwargs)
    if func in POINTWISE:
        return _pointwise(func, args, kwargs)
    return _unsupported(func, args, kwargs)


def _unsupported(func, args, kwargs):
    """The single place that refuses a torch function with no sparse meaning (the one raise site)."""
    if func is torch.Tensor.__bool__ or func is torch.Tensor.__len__:
        raise UnsupportedOperationError(f"{_name(func)} of a sparse tensor has no meaning")
    raise UnsupportedOperationError(
        f"{_name(func)} is not supported on sparse tensors (the engine runs the model's layers as sparse counterparts "
        "and only the glue ops listed in sparse_mim.engine.dispatch between them); "
        "replace the code that calls it with a supported layer, or keep it out of the sparsified part")


# -- ReLU of a BatchNorm, rebuilt in backward ---------------------------------------------------------------
_RELU = _variants("relu")


def _relu_rebuilt_in_backward(func, args, kwargs):
    """``relu(x)`` saved as a recipe (``engine.recompute.relu``) when ``x``'s data is a registered
    BatchNorm output, else None (the op runs as usual)."""
    if func not in _RELU or len(args) != 1 or set(kwargs) - {"inplace"} or not recompute.recording():
        return None
    return recompute.relu(args[0].data)

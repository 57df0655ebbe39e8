"""``__torch_function__`` for the engine's tensors: the glue code of an ordinary model's ``forward``.

A sparsified model keeps its own ``forward``; the layers are the engine's twins, and what lies
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
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F

from .coords import SparseInputError
from .errors import UnsupportedOperationError
from .ops.gather import gather_rows
from .ops.sample import global_avg_pool, per_sample_sum
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
    maps, alive until Python's cycle collector runs (measured: 130-200 MB on a ResNet-50 forward)."""
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


def _as_operand(t: torch.Tensor, ref: SiteTensor, what: str) -> torch.Tensor:
    """A dense operand, broadcast as against ``ref.shape``, in the form ``ref``'s data broadcasts with."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
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


def _cat(tensors, dim=0, **kwargs):
    if "axis" in kwargs:
        dim = kwargs.pop("axis")
    tensors = list(tensors)
    ref = tensors[0]
    if not all(isinstance(t, SiteTensor) for t in tensors):
        raise UnsupportedOperationError("torch.cat of sparse and dense tensors: every input must be a sparse "
                                        "tensor on the same active sites")
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


def _reduction(reduce):
    def handler(x, dim=None, keepdim=False, *, dtype=None, **kwargs):
        if kwargs.get("axis") is not None:
            dim = kwargs.pop("axis")
        spatial = {2, 3} if x.layout == "nchw" else {1, 2}
        dims = set(_dims((dim,))) if dim is not None and not isinstance(dim, int) else \
            ({int(dim) % 4} if dim is not None else None)
        if dims != spatial:
            raise UnsupportedOperationError(
                f"{reduce.__name__.strip('_')} over dims {dim} of a {x.layout.upper()} sparse tensor: only the "
                f"spatial dims {tuple(sorted(spatial))} (per sample over active sites) are supported")
        return reduce(x, keepdim, dtype)
    return handler


def _adaptive_avg_pool2d(x, output_size):
    size = tuple(output_size) if isinstance(output_size, (list, tuple)) else (output_size, output_size)
    if size != (1, 1) or x.layout != "nchw":
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


def _getitem(x, index):
    raise UnsupportedOperationError(f"indexing a sparse tensor ({x!r}[{index!r}]) is not supported: sparse rows "
                                    "have no dense spatial axes; index the result of .dense() instead")


_HANDLERS: Dict[Any, Callable] = {
    torch.Tensor.permute: _permute, torch.permute: _permute,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
    torch.Tensor.mean: _reduction(_spatial_mean), torch.mean: _reduction(_spatial_mean),
    torch.Tensor.sum: _reduction(_spatial_sum), torch.sum: _reduction(_spatial_sum),
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d, torch.Tensor.expand_as: _expand_as,
    torch.Tensor.contiguous: _contiguous, torch.Tensor.__getitem__: _getitem,
}


def _name(func) -> str:
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if "Tensor" in qual:
        return f"torch.{qual}"
    return f"{mod}.{qual}" if mod and not qual.startswith(mod) else qual


def dispatch(func, args, kwargs):
    """Run torch function ``func`` whose arguments include one of the engine's tensors."""
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
        f"{_name(func)} is not supported on sparse tensors (the engine runs the model's layers as sparse twins "
        "and only the glue ops listed in sparse_mim.engine.functions between them); "
        "replace the code that calls it with a supported layer, or keep it out of the sparsified part")

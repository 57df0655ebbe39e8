"""Collect mode: list every glue op of a model's ``forward`` that has no sparse meaning, in one run.

Normally an unsupported torch function on a sparse tensor raises ``UnsupportedOperationError`` at
once (``engine.dispatch``). ``sparsify()`` instead wants the whole list, with the module whose own
``forward`` called each op, so a user fixes a model in one round. Inside ``collecting(model)``:

* forward pre/post hooks on every module keep a stack of the module paths that are running;
* an op the engine refuses is recorded as ``(module path, op, reason)`` and then computed DENSELY on
  ``.dense()`` of its sparse arguments so the forward can go on; 4-d results on a known grid are
  turned back into sparse tensors. This is only exact because the dry run shows every site (all
  patches visible): dense and rows then hold the same numbers;
* a plain 4-d tensor on a known grid reaching a module (the tail of such a dense detour, e.g. a
  5-d ``view`` reshaped back) is turned back into a sparse tensor before the module runs.

Nothing is ever computed densely outside ``collecting``: the normal path keeps raising.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from . import dispatch as dispatch_table
from .errors import UnsupportedOperationError
from .tensor import MaskedDenseTensor, SiteTensor, SparseTensor, install_torch_function

__all__ = ["collecting", "active", "dispatch", "Collector", "Offence"]

#: (module path, op name, why the engine refused it)
Offence = Tuple[str, str, str]

_state = threading.local()


def active() -> Optional["Collector"]:
    """The collector of the dry run running on this thread, or None (the normal, raising path)."""
    return getattr(_state, "collector", None)


class Collector:
    """What one dry run found: the offences, in the order they happened, one per (module, op)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.offences: List[Offence] = []
        self.stack: List[str] = []
        self.manager = None  # the coordinate manager of the dry run's input (set by the first sparse tensor)
        self._seen = set()

    @property
    def where(self) -> str:
        """Path of the innermost module whose own forward is running ("" for the model itself)."""
        return self.stack[-1] if self.stack else ""

    def record(self, op: str, why: str) -> None:
        key = (self.where, op)
        if key not in self._seen:
            self._seen.add(key)
            self.offences.append((self.where, op, why))

    def module_type(self, path: str) -> str:
        m = self.model.get_submodule(path) if path else self.model
        return type(m).__qualname__

    # -- hooks ---------------------------------------------------------------------------------------
    def _pre(self, path: str):
        def hook(module, args):
            self.stack.append(path)
            if self.offences:  # only the tail of a recorded dense detour can bring plain maps here
                return tuple(self.resparsify(a) for a in args)
            self._find_manager(args)
            return None
        return hook

    def _post(self, path: str):
        def hook(module, args, output):
            if self.stack and self.stack[-1] == path:
                self.stack.pop()
        return hook

    def _find_manager(self, args) -> None:
        if self.manager is None:
            for a in args:
                if isinstance(a, SiteTensor):
                    self.manager = a.manager
                    return

    # -- dense detour ----------------------------------------------------------------------------------
    def resparsify(self, t, ref=None):
        """A plain (B, C, H, W) tensor on one of the dry run's grids as a sparse tensor; else ``t``."""
        if isinstance(t, (list, tuple)):
            return type(t)(self.resparsify(a, ref) for a in t)
        manager = ref.manager if ref is not None else self.manager
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or manager is None or t.shape[0] != manager.batch_size:
            return t
        nhwc = ref is not None and ref.layout == "nhwc"
        hw = tuple(t.shape[1:3]) if nhwc else tuple(t.shape[2:])
        strides = ([ref.stride] if ref is not None else []) + [1, 2, 4, 8, 16, 32]
        for s in strides:
            if manager.spatial_shape(s) == hw:
                dense = t.permute(0, 3, 1, 2) if nhwc else t
                if ref is not None and isinstance(ref, MaskedDenseTensor):
                    out = MaskedDenseTensor(dense * manager.mask(s, dense.dtype), manager, s)
                else:
                    out = SparseTensor(SparseTensor._gather_sites(dense, manager, s), manager=manager, stride=s)
                if nhwc:
                    out.layout = "nhwc"
                return out
        return t


def _logical_dense(t):
    """The dense tensor a dense model would hold for sparse ``t`` (its logical layout and shape)."""
    from .pad import PaddedSites
    if isinstance(t, PaddedSites):
        return t.dense()
    if isinstance(t, SiteTensor):
        d = t.dense()
        if t.layout == "nhwc":
            d = d.permute(0, 2, 3, 1)
        groups = getattr(t, "channel_groups", None)
        if groups:
            b, c, h, w = d.shape
            d = d.reshape(b, groups, c // groups, h, w)
        return d
    if isinstance(t, (list, tuple)):
        return type(t)(_logical_dense(a) for a in t)
    if isinstance(t, dict):
        return {k: _logical_dense(v) for k, v in t.items()}
    return t


def op_name(func) -> str:
    """How a user spells ``func`` in a forward: ``torch.Tensor.view``, ``torch.flip``, ``F.interpolate``."""
    import torch.nn.functional as F
    name = getattr(func, "__name__", "")
    for spelled, space in (("torch.Tensor", torch.Tensor), ("torch", torch), ("torch.nn.functional", F)):
        if name and getattr(space, name, None) is func:
            return f"{spelled}.{name}"
    return dispatch_table._name(func)


def dispatch(collector: Collector, func, args, kwargs, run: Callable):
    """``run(func, args, kwargs)``; if the engine refuses it, record the offence and compute densely."""
    try:
        return run(func, args, kwargs)
    except UnsupportedOperationError as e:
        if collector.offences:  # maybe only a plain map left over from an earlier detour: retry sparsely
            fixed = tuple(collector.resparsify(a) for a in args)
            if any(f is not a for f, a in zip(fixed, args)):
                try:
                    return run(func, fixed, kwargs)
                except UnsupportedOperationError:
                    pass
        collector.record(op_name(func), _reason(str(e)))
    refs = dispatch_table._sites_of((args, list(kwargs.values())))
    out = func(*_logical_dense(args), **_logical_dense(kwargs))
    return _rewrap(collector, out, refs[0] if refs else None)


def _reason(message: str) -> str:
    """The specific part of the engine's refusal (its generic remedy is said once, under the list)."""
    first = message.splitlines()[0] if message else ""
    if " is not supported on sparse tensors (the engine runs" in first:
        return "not supported on sparse tensors"
    return first if len(first) <= 200 else first[:197] + "..."


def _rewrap(collector: Collector, out, ref):
    if isinstance(out, torch.Tensor):
        return collector.resparsify(out, ref)
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(_rewrap(collector, o, ref) for o in out)
    return out


@contextlib.contextmanager
def collecting(model: nn.Module) -> Iterator[Collector]:
    """Collect (instead of raise) unsupported glue ops while ``model`` runs on this thread."""
    if active() is not None:
        raise RuntimeError("collecting() does not nest")
    collector = Collector(model)
    handles = []
    for path, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(collector._pre(path)))
        handles.append(m.register_forward_hook(collector._post(path)))
    _state.collector = collector
    try:
        yield collector
    finally:
        _state.collector = None
        for h in handles:
            h.remove()


def torch_function(func, args, kwargs):
    """Every torch function on a site tensor: ``engine.dispatch``' dispatch, or, inside a dry run, the
    collecting ``dispatch`` around it (list every unsupported op, not just the first)."""
    collector = active()
    if collector is not None:
        return dispatch(collector, func, args, kwargs, dispatch_table.dispatch)
    return dispatch_table.dispatch(func, args, kwargs)


install_torch_function(torch_function)

"""Activations recomputed in backward instead of saved: BatchNorm -> ReLU outputs of the sparse encoder.

In a ResNet block ``conv -> BN -> ReLU -> conv`` the BatchNorm keeps its input ``x`` for backward and
the next convolution keeps the ReLU's output ``y``: two copies of the same sites. ``y`` is a cheap,
exact function of ``x`` (``relu(x * scale + shift)``), so inside ``saving()`` a tensor registered
with ``register(y, fn, *args)`` is saved for backward as that recipe and rebuilt when the backward
needs it (same ops on the same inputs: bitwise the same values). Everything else is saved as usual.

The hooks replace autograd's own version check of saved tensors, so they do it themselves: a tensor
(or a recipe's input) modified in place after it was saved raises the same RuntimeError autograd
raises. ``saving()`` steps aside (saves everything as usual) when other saved-tensor hooks are active
(activation checkpointing, offloading), so it never overrides them. ``use_settings(recompute=False)``
switches the whole mechanism off. Saved tensors carry no autograd history: a double backward
(``create_graph=True``) through the sparse encoder raises, asking for ``recompute=False``.

Registered today: the rows of the CPU row BatchNorm (``ops.norm``) and a ReLU applied to them
(``relu``, called by the engine's pointwise dispatch in ``engine.dispatch``: the same for a
hand-tuned backbone's activation module and a sparsified model's own ``nn.ReLU``); other tensors are
saved as usual.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .settings import current_settings

__all__ = ["saving", "register", "recipe_of", "recording", "relu"]

_recipes: dict = {}      # id(tensor) -> (weakref(tensor), version, fn, args)
_depth = 0               # > 0 inside ``saving()``


def recording() -> bool:
    """True inside ``saving()``: registering a recipe has an effect."""
    return _depth > 0


def register(t: torch.Tensor, fn: Callable, *args: torch.Tensor) -> None:
    """Declare ``t == fn(*args)`` (bitwise, for the current versions of ``t`` and ``args``)."""
    if _depth == 0:
        return
    key = id(t)
    _recipes[key] = (weakref.ref(t, lambda _r, k=key: _recipes.pop(k, None)), t._version, fn,
                     tuple((a, a._version) for a in args))


def recipe_of(t: torch.Tensor):
    """``(fn, args)`` when ``t`` is registered and unmodified since, else None."""
    entry = _recipes.get(id(t))
    if entry is None or entry[0]() is not t or entry[1] != t._version:
        return None
    if any(a._version != v for a, v in entry[3]):
        return None
    return entry[2], tuple(a for a, _ in entry[3])


def relu(z: torch.Tensor) -> Optional[torch.Tensor]:
    """``relu(z)`` saved as a recipe, when ``z`` is a registered one (a BatchNorm's rows): then neither
    ``z`` nor the result is kept for backward, both are rebuilt from the norm's input. None when ``z``
    is not registered (or outside ``saving()``): the caller applies its ReLU as usual."""
    found = recipe_of(z) if _depth > 0 else None
    if found is None:
        return None
    y = _ReLUOfRecipe.apply(z)
    register(y, functools.partial(_relu_after, found[0]), *found[1])
    return y


def _relu_after(fn, *args):
    return F.relu(fn(*args))


class _ReLUOfRecipe(torch.autograd.Function):
    """ReLU that saves its input (a registered recipe, so saved as that) instead of its output; the
    gradient is torch's own ``threshold_backward``."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return F.relu(z)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, z, 0)


class _Recipe:
    __slots__ = ("fn", "args")

    def __init__(self, fn, args):
        self.fn, self.args = fn, args   # args: ((detached tensor, version), ...)


def _modified() -> RuntimeError:
    return RuntimeError("one of the variables needed for gradient computation has been modified by an "
                        "inplace operation (found by sparse_mim.engine.recompute's saved-tensor hooks)")


def _pack(t: torch.Tensor):
    found = recipe_of(t)
    if found is not None:
        fn, args = found
        return _Recipe(fn, tuple((a.detach(), a._version) for a in args))
    return t.detach(), t._version   # detached: a saved output would otherwise be a reference cycle


def _double_backward() -> RuntimeError:
    return RuntimeError("a double backward (create_graph=True) through the sparse encoder needs its saved "
                        "activations' history: run the forward inside "
                        "sparse_mim.engine.use_settings(recompute=False)")


def _unpack(packed):
    if torch.is_grad_enabled():  # backward runs in grad mode only with create_graph=True
        raise _double_backward()
    if isinstance(packed, _Recipe):
        if any(a._version != v for a, v in packed.args):
            raise _modified()
        with torch.no_grad():
            return packed.fn(*(a for a, _ in packed.args))
    t, version = packed
    if t._version != version:
        raise _modified()
    return t


@contextlib.contextmanager
def saving():
    """Save registered activations as recipes inside the block (no-op when off, without autograd, or
    when other saved-tensor hooks are already active)."""
    global _depth
    if not current_settings().recompute or not torch.is_grad_enabled() or _depth > 0 or \
            torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        yield
        return
    _depth += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _depth -= 1
        if _depth == 0:
            _recipes.clear()

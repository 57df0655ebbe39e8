"""One registry of sparse backbones, named like timm's models (``create_backbone`` ~ ``timm.create_model``)."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List

import torch.nn as nn

__all__ = ["register_backbone", "create_backbone", "list_backbones", "is_backbone", "UnknownBackboneError",
           "SPARSIFY_PREFIX"]

#: ``create_backbone("sparsify:resnet50")`` takes the general path even where a hand-tuned twin exists.
SPARSIFY_PREFIX = "sparsify:"

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> List[str]:
    return sorted(_REGISTRY)


def _timm_model(name: str) -> bool:
    import timm
    return timm.is_model(name)


def is_backbone(name: str) -> bool:
    """True for a hand-tuned twin's name, any timm model name, and ``sparsify:<timm name>``."""
    base = name[len(SPARSIFY_PREFIX):] if name.startswith(SPARSIFY_PREFIX) else name
    return (base == name and name in _REGISTRY) or _timm_model(base)


def create_backbone(name: str, backend: str = "native", **kwargs) -> nn.Module:
    """Build the sparse backbone ``name`` (a timm model name).

    ``backend``: who executes its sparse ops, ``native`` (our engine) or ``minkowski``
    (MinkowskiEngine, optional); parameters and state_dict are the same for both.

    A hand-tuned twin is used where one is registered; any other timm name (or ``sparsify:<name>``,
    to force it) is ``sparsify(timm.create_model(name, **kwargs))`` with timm's own state_dict keys.
    """
    from sparse_mim.engine.backend import check_backend_usable

    check_backend_usable(backend)  # fails now (with install instructions) rather than at the first batch
    if not is_backbone(name):
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown model {name!r}: neither a hand-tuned backbone nor a timm model "
                                   f"name.{hint} Hand-tuned: {', '.join(list_backbones())}")
    if name in _REGISTRY:
        model = _REGISTRY[name](**kwargs)
    else:
        from .sparsified import sparsify_timm
        model = sparsify_timm(name.removeprefix(SPARSIFY_PREFIX), **kwargs)
    model.name = name
    model.backend = backend
    return model

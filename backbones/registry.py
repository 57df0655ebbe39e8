"""One registry of sparse backbones, named like timm's models (``create_backbone`` ~ ``timm.create_model``)."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List

import torch.nn as nn

__all__ = ["register_backbone", "create_backbone", "list_backbones", "UnknownBackboneError"]

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


class UnknownBackboneError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> List[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, backend: str = "native", **kwargs) -> nn.Module:
    """Build the sparse backbone registered as ``name`` (a timm model name).

    ``backend``: who executes its sparse ops, ``native`` (our engine) or ``minkowski``
    (MinkowskiEngine, optional); parameters and state_dict are the same for both."""
    from sparse_mim.engine.backend import check_backend, import_minkowski

    check_backend(backend)
    if backend == "minkowski":
        import_minkowski()  # fail now, with the install instructions, rather than at the first batch
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown model {name!r}.{hint} Available: {', '.join(list_backbones())}")
    model = _REGISTRY[name](**kwargs)
    model.name = name
    model.backend = backend
    return model

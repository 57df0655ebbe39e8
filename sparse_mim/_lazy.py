"""Package attributes imported on first use (PEP 562), so that ``sparse-mim pretrain --help`` and
config errors answer before torch, timm and huggingface_hub are imported (seconds on a small CPU)."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable


def lazy_exports(package: str, namespace: dict, modules: Dict[str, Iterable[str]]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from ``modules`` (relative module ->
    names it exports) the first time it is asked for, and keeps it in the package's ``namespace``."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        namespace[name] = value
        return value

    return __getattr__

"""Which library executes the sparse ops: our engine (``native``, the default) or MinkowskiEngine.

The backend is another execution path of the same modules: parameters, state_dicts and semantics
do not change, only who computes convolutions, norms and pools of a ``SparseTensor``. The masked-dense
reference and dense tensors never depend on it. MinkowskiEngine is optional and imported lazily.
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
import threading

__all__ = ["BACKENDS", "use_backend", "current_backend", "check_backend", "import_minkowski",
           "MinkowskiUnavailableError", "INSTALL_MINKOWSKI"]

BACKENDS = ("native", "minkowski")
_state = threading.local()

INSTALL_MINKOWSKI = (
    "MinkowskiEngine 0.5.4 is built from source (CPU-only here): apt-get install -y libopenblas-dev "
    "build-essential, then, in an environment that already has torch: SETUPTOOLS_USE_DISTUTILS=stdlib "
    "MAX_JOBS=2 pip install --no-build-isolation MinkowskiEngine==0.5.4 (or pip install --no-build-isolation "
    "-e \".[minkowski]\"); see docs/minkowski.md")


class MinkowskiUnavailableError(ImportError):
    """backend='minkowski' was asked for, but MinkowskiEngine cannot be imported."""


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the sparse ops inside the block on backend ``name`` (``native`` or ``minkowski``)."""
    check_backend(name)
    if name == "minkowski":
        import_minkowski()
    previous = current_backend()
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def current_backend() -> str:
    return getattr(_state, "backend", "native")


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

"""Errors of the general (``sparsify``) path: what cannot run sparsely is named, never run wrong."""
from __future__ import annotations

__all__ = ["UnsupportedLayerError", "UnsupportedOperationError", "SparsifyMismatchError"]


class UnsupportedLayerError(TypeError):
    """A model holds layers with no sparse counterpart; raised by ``sparsify`` before any computation.

    ``layers`` is the list of ``(module path, type name)`` that were refused.
    """

    def __init__(self, message: str, layers=()):
        super().__init__(message)
        self.layers = list(layers)


class UnsupportedOperationError(UnsupportedLayerError):
    """A torch function called on a sparse tensor (in a model's own ``forward``) has no sparse meaning."""


class SparsifyMismatchError(UnsupportedLayerError):
    """``sparsify``'s dry run found the sparse encoder (every patch visible) differing from the dense model.

    Raised instead of returning an encoder that would silently compute another network.
    """

"""sparse-mim: SparK masked image modelling for CNNs with a genuinely sparse encoder."""
from .engine import (MaskedDenseTensor, PatchCoordinateManager, SiteCoordinateManager, SparseInputError,
                     SparseTensor, execution)

from .engine import UnsupportedLayerError

__version__ = "0.1.0"
__all__ = ["SparseTensor", "MaskedDenseTensor", "PatchCoordinateManager", "SiteCoordinateManager",
           "SparseInputError", "UnsupportedLayerError", "execution", "sparsify", "__version__"]


def sparsify(model, feature_modules=None):
    """Any timm / torchvision CNN as a sparse SparK encoder (see ``backbones.sparsified.sparsify``;
    imported lazily: ``backbones`` builds on this package)."""
    from backbones.sparsified import sparsify as _sparsify
    return _sparsify(model, feature_modules)

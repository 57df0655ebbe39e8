"""sparse-mim: SparK masked image modelling for CNNs with a genuinely sparse encoder."""
from .engine import (MaskedDenseTensor, PatchCoordinateManager, SiteCoordinateManager, SparseInputError,
                     SparseTensor, execution)

__version__ = "0.1.0"
__all__ = ["SparseTensor", "MaskedDenseTensor", "PatchCoordinateManager", "SiteCoordinateManager",
           "SparseInputError", "execution", "__version__"]

"""sparse-mim: SparK masked image modelling for CNNs with a genuinely sparse encoder.

The names below are imported on first use (``sparse_mim._lazy``): importing the package, or its
command line, does not import torch.
"""
from ._lazy import lazy_exports

__version__ = "0.1.0"
__all__ = ["SparseTensor", "MaskedDenseTensor", "PatchCoordinateManager", "SiteCoordinateManager",
           "SparseInputError", "UnsupportedLayerError", "patch_input", "use_settings", "sparsify", "__version__"]

__getattr__ = lazy_exports(__name__, globals(), {
    ".engine": ["MaskedDenseTensor", "PatchCoordinateManager", "SiteCoordinateManager", "SparseInputError",
                "SparseTensor", "UnsupportedLayerError", "patch_input", "use_settings"],
})


def sparsify(model, feature_modules=None):
    """Any timm / torchvision CNN as a sparse SparK encoder (see ``backbones.sparsified.sparsify``;
    imported lazily: ``backbones`` builds on this package)."""
    from backbones.sparsified import sparsify as _sparsify
    return _sparsify(model, feature_modules)

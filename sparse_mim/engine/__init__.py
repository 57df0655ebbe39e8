"""The sparse engine: SparseTensor, coordinate managers, functional ops and torch.nn-style modules."""
from . import ops
from .errors import SparsifyMismatchError, UnsupportedLayerError, UnsupportedOperationError
from .backend import BACKENDS, MinkowskiUnavailableError, current_backend, use_backend
from .coords import CoordinateManager, PatchCoordinateManager, SiteCoordinateManager, SparseInputError
from .nn import *  # noqa: F401,F403
from .nn import __all__ as _nn_all
from .ops.window import WindowGeometry, execution
from .tensor import MaskedDenseTensor, SiteTensor, SparseTensor, check_image_size
from .inputs import patch_input
from .sparsify import sparsify_layers, supported_layer_types, unsupported_layers

__all__ = ["ops", "BACKENDS", "MinkowskiUnavailableError", "current_backend", "use_backend", "CoordinateManager", "PatchCoordinateManager", "SiteCoordinateManager", "SparseInputError",
           "WindowGeometry", "execution", "MaskedDenseTensor", "SiteTensor", "SparseTensor",
           "check_image_size", "patch_input", "UnsupportedLayerError", "UnsupportedOperationError", "SparsifyMismatchError", "sparsify_layers",
           "supported_layer_types", "unsupported_layers"] + list(_nn_all)

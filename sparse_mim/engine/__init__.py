"""The sparse engine: SparseTensor, coordinate managers, functional ops and torch.nn-style modules."""
from . import collect, ops  # collect installs how torch functions run on site tensors
from .errors import SparsifyMismatchError, UnsupportedLayerError, UnsupportedOperationError
from .backend import BackendError, backend_names, check_backend_usable
from .coords import CoordinateManager, PatchCoordinateManager, SiteCoordinateManager, SparseInputError
from .minkowski import MinkowskiUnavailableError
from .nn import *  # noqa: F401,F403
from .nn import __all__ as _nn_all
from .ops.window import WindowGeometry
from .settings import EngineSettings, current_settings, use_settings
from .tensor import MaskedDenseTensor, SiteTensor, SparseTensor, check_image_size
from .inputs import patch_input
from .sparsify import sparsify_layers, supported_layer_types, unsupported_layers

__all__ = ["ops", "BackendError", "MinkowskiUnavailableError", "backend_names", "check_backend_usable",
           "EngineSettings", "current_settings", "use_settings", "CoordinateManager", "PatchCoordinateManager",
           "SiteCoordinateManager", "SparseInputError", "WindowGeometry", "MaskedDenseTensor", "SiteTensor",
           "SparseTensor", "check_image_size", "patch_input", "UnsupportedLayerError", "UnsupportedOperationError",
           "SparsifyMismatchError", "sparsify_layers", "supported_layer_types", "unsupported_layers"] + list(_nn_all)

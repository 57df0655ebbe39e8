"""Weight conversion in three layers: `read` (the one reader) returns a checkpoint's weights and what
is known about it; layout adapters (`layouts/`) rename an encoder from the layout it was written in
(official SparK, official ConvNeXt names, ConvNeXt V2 FCMAE, MinkowskiEngine) to timm's names; targets
(`targets/`) take those dicts to timm, torchvision, Detectron2 or MinkowskiEngine's layout. Depends
only on names and tensors, never on training code."""
from sparse_mim.engine.minkowski_layout import dense_bias_to_me, dense_kernel_to_me, me_bias_to_dense, me_kernel_to_dense

from .errors import ConversionError
from .layouts.fcmae import fcmae_to_timm, timm_to_fcmae
from .reader import Checkpoint, read
from .targets import detectron2_config_hints, to_detectron2, to_minkowski, to_timm, to_torchvision

__all__ = [
    "Checkpoint",
    "ConversionError",
    "dense_bias_to_me",
    "dense_kernel_to_me",
    "detectron2_config_hints",
    "fcmae_to_timm",
    "me_bias_to_dense",
    "me_kernel_to_dense",
    "read",
    "timm_to_fcmae",
    "to_detectron2",
    "to_minkowski",
    "to_timm",
    "to_torchvision",
]

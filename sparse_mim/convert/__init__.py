"""Weight conversion: our encoder checkpoints -> timm, torchvision and Detectron2 names, ConvNeXt V2
FCMAE checkpoints -> timm, and the MinkowskiEngine kernel layout both ways. Depends only on names and tensors, never on training code."""
from sparse_mim.engine.minkowski_layout import dense_bias_to_me, dense_kernel_to_me, me_bias_to_dense, me_kernel_to_dense
from .detectron2 import detectron2_config_hints, to_detectron2
from .errors import ConversionError
from .fcmae import fcmae_to_timm, from_fcmae, timm_to_fcmae
from .sources import load_encoder_state_dict
from .minkowski_checkpoints import from_minkowski_layout, to_minkowski
from .timm_names import to_timm
from .torchvision_names import to_torchvision

__all__ = [
    "ConversionError",
    "dense_bias_to_me",
    "dense_kernel_to_me",
    "detectron2_config_hints",
    "fcmae_to_timm",
    "from_fcmae",
    "from_minkowski_layout",
    "load_encoder_state_dict",
    "me_bias_to_dense",
    "me_kernel_to_dense",
    "timm_to_fcmae",
    "to_detectron2",
    "to_minkowski",
    "to_timm",
    "to_torchvision",
]

"""Weight conversion: our encoder checkpoints -> timm, torchvision and Detectron2 names, and the
MinkowskiEngine kernel layout. Depends only on names and tensors, never on training code."""
from .detectron2 import detectron2_config_hints, to_detectron2
from .errors import ConversionError
from .minkowski import dense_bias_to_me, dense_kernel_to_me, me_bias_to_dense, me_kernel_to_dense
from .sources import load_encoder_state_dict
from .timm_names import to_timm
from .torchvision_names import to_torchvision

__all__ = [
    "ConversionError",
    "dense_bias_to_me",
    "dense_kernel_to_me",
    "detectron2_config_hints",
    "load_encoder_state_dict",
    "me_bias_to_dense",
    "me_kernel_to_dense",
    "to_detectron2",
    "to_timm",
    "to_torchvision",
]

"""Targets: encoder weights in timm's names (`read(path).encoder`) -> the names and layouts another
library loads, each checked against that library's own key list. They take dicts only: reading a
file is `reader.read`'s job.

* `timm`: `to_timm` (the identity, verified against `timm.create_model(arch)`);
* `torchvision`: `to_torchvision` (ResNets and ConvNeXts);
* `detectron2`: `to_detectron2` (ResNets; writes the `.pkl`);
* `minkowski`: `to_minkowski` (MinkowskiEngine's layout; FCMAE's for ConvNeXt V2).
"""
from .detectron2 import detectron2_config_hints, to_detectron2
from .minkowski import to_minkowski
from .timm import to_timm
from .torchvision import to_torchvision

__all__ = ["detectron2_config_hints", "to_detectron2", "to_minkowski", "to_timm", "to_torchvision"]

"""Pretraining data: image folders, the built-in demo images, SparK's augmentation and the loader."""
from .datasets import (IMAGE_EXTENSIONS, AugmentedImages, DataError, ImageFolder, build_dataset, check_readable,
                       find_images)
from .demo import DemoImages
from .loader import build_loader, check_batch_fits, per_rank_batch, set_epoch
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform, build_transform, denormalize

__all__ = ["IMAGE_EXTENSIONS", "AugmentedImages", "DataError", "ImageFolder", "DemoImages", "build_dataset",
           "check_readable", "find_images", "build_loader", "check_batch_fits", "per_rank_batch", "set_epoch", "IMAGENET_MEAN",
           "IMAGENET_STD", "PretrainTransform", "build_transform", "denormalize"]

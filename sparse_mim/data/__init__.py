"""Pretraining data: image folders, the built-in demo images, SparK's augmentation and the loader."""
from .build import build_dataset
from .datasets import (IMAGE_EXTENSIONS, AugmentedImages, DataError, ImageFolder, check_readable, find_images,
                       first_readable)
from .demo import DemoImages
from .loader import build_loader, check_batch_fits, per_rank_batch, set_epoch
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform, build_transform, denormalize

__all__ = ["IMAGE_EXTENSIONS", "AugmentedImages", "DataError", "ImageFolder", "DemoImages", "build_dataset",
           "check_readable", "find_images", "first_readable", "build_loader", "check_batch_fits", "per_rank_batch",
           "set_epoch", "IMAGENET_MEAN", "IMAGENET_STD", "PretrainTransform", "build_transform", "denormalize"]

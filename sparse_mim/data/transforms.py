"""SparK's pretraining augmentation: RandomResizedCrop(scale 0.67-1, bicubic) -> flip -> ImageNet normalise.

The random choices come from an explicit ``torch.Generator`` instead of torch's global RNG, so the
crop an image gets depends only on the seed the dataset hands in (see ``datasets.sample_seed``):
the same for any number of workers or ranks, and again after a resume.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PretrainTransform", "build_transform", "denormalize", "normalize_uint8",
           "normalized_tensor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_INV_STD_255 = 1 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) of any strides -> contiguous ImageNet-normalised float32, as
    ``normalize(to_tensor(...))``: one (transposing) uint8 -> float copy and two in-place ops instead of
    to_tensor's division pass and normalize's two more; equal to torchvision's result within 5e-7."""
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    out.copy_(images)
    return out.sub_(_MEAN_255.to(out.device)).mul_(_INV_STD_255.to(out.device))


def normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ImageNet-normalised (3, H, W) float32, as ``normalize(to_tensor(image))`` but
    cheaper (fewer passes over the pixels, see ``normalize_uint8``), which counts in the input
    pipeline's time per item."""
    hwc = torch.from_numpy(np.array(image, dtype=np.uint8))  # a copy: PIL's own buffer is read-only
    return normalize_uint8(hwc.permute(2, 0, 1))


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator).item())


class PretrainTransform:
    """PIL image -> normalised (3, img_size, img_size) float tensor, random per ``generator``."""

    def __init__(self, img_size: int, scale: Tuple[float, float] = (0.67, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5):
        self.img_size = int(img_size)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio
        self.hflip = hflip

    def crop_box(self, width: int, height: int, generator: torch.Generator) -> Tuple[int, int, int, int]:
        """(top, left, h, w) of a crop covering ``scale`` of the area with aspect ratio in ``ratio``.

        Ten tries at a random box; if none fits, the largest centred box whose aspect ratio lies
        within ``ratio`` (torchvision's RandomResizedCrop rule).
        """
        area = width * height
        for _ in range(10):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*self.log_ratio, generator))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return _randint(height - h, generator), _randint(width - w, generator), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if generator is None:
            generator = torch.default_generator
        top, left, h, w = self.crop_box(*image.size, generator)
        image = TF.resized_crop(image, top, left, h, w, [self.img_size, self.img_size],
                                interpolation=TF.InterpolationMode.BICUBIC)
        if torch.rand((), generator=generator).item() < self.hflip:
            image = TF.hflip(image)
        return normalized_tensor(image)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(img_size={self.img_size}, scale={self.scale}, "
                f"interpolation=bicubic, hflip={self.hflip}, normalize=imagenet)")


def build_transform(img_size: int, scale: Tuple[float, float] = (0.67, 1.0)) -> PretrainTransform:
    """``scale``: the crop's share of the image area (SparK 0.67-1; FCMAE 0.2-1)."""
    return PretrainTransform(img_size, tuple(scale))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) -> RGB in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)

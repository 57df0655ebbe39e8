"""``data.decode=tensor|gpu``: decoding with TorchCodec's ``decode_jpeg`` and SparK's augmentation
as tensor ops (antialiased bicubic ``resized_crop``), in the loader workers or on the GPU.

A worker reads the file's bytes and draws the crop box and flip from the image's seed (the same draws,
from the same seed, as ``PretrainTransform``). Then:

- ``tensor``: the worker decodes (libjpeg-turbo) and augments on its CPU: faster than the PIL path
  (benchmarks/RESULTS.md, "Input pipeline"), because torch's uint8 bicubic resize is faster than PIL's;
- ``gpu``: the worker hands over the bytes; ``EncodedBatch.to(device)`` decodes the batch with nvJPEG
  (one batched ``decode_jpeg`` call) and crops, resizes, flips and normalises on the GPU, for
  machines whose CPUs cannot feed their GPUs.

Files that are not whole baseline JPEGs (PNG, CMYK JPEGs, files cut short, the in-memory demo images)
are decoded with PIL in the worker and take the same tensor path from there; PIL refuses a cut file,
so it is skipped and reported like any unreadable one.

The crops are close to PIL's but not bit-equal (on the CPU within 2 grey levels, see
benchmarks/RESULTS.md, "Input pipeline"), and nvJPEG may differ from libjpeg-turbo by a level or two
more; a run therefore changes slightly when it switches decoders. For one decoder and device the
result depends only on the seed, like the PIL path. JPEGs are decoded by TorchCodec's ``decode_jpeg``
(``torchvision.io.decode_jpeg`` is deprecated): libjpeg-turbo on the CPU, nvJPEG on the GPU.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .datasets import AugmentedImages, DataError, first_readable
from .transforms import PretrainTransform, normalize_uint8

__all__ = ["DECODERS", "EncodedItem", "EncodedBatch", "EncodedImages", "EncodedCollate", "TensorDecodedImages"]

#: ``data.decode`` choices: ``pil`` (PIL decode + augment in the workers), ``tensor`` (this module, in
#: the workers) or ``gpu`` (this module, on the device).
DECODERS = ("pil", "tensor", "gpu")


@dataclass
class EncodedItem:
    """One image as a worker hands it over: JPEG bytes (``encoded``) or a decoded (3, H, W) uint8
    tensor, with its crop box ``(top, left, h, w)``, its flip and the file's name for error messages."""

    data: torch.Tensor
    encoded: bool
    box: Tuple[int, int, int, int]
    flip: bool
    name: str


def _is_whole_baseline_jpeg(image: Image.Image, raw: bytes) -> bool:
    """A JPEG decode_jpeg reads in full. A file cut short lacks the end-of-image marker: libjpeg-turbo
    would fill the missing rows with grey without an error, PIL refuses it, so it goes to PIL."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and raw.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def _decode_one(item: EncodedItem, device: torch.device) -> torch.Tensor:
    from torchcodec.decoders import decode_jpeg

    if not item.encoded:
        return item.data.to(device, non_blocking=True)
    return decode_jpeg(item.data, mode="RGB", device=device)


def _crop(image: torch.Tensor, item: EncodedItem, img_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> the item's crop, resized to (3, img_size, img_size) uint8 and flipped if drawn."""
    import torchvision.transforms.v2.functional as F

    top, left, h, w = item.box
    crop = F.resized_crop(image, top, left, h, w, [img_size, img_size],
                          interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    return crop.flip(-1) if item.flip else crop


class EncodedImages(Dataset):
    """``base`` (any ``AugmentedImages``) with decoding and augmentation left to ``EncodedBatch.to``.

    Item ``i`` is ``(EncodedItem, -1)``, or ``(EncodedItem of the next readable image, i)`` when file
    ``i`` cannot be opened, as in ``AugmentedImages``. Only the header is parsed here, so a file whose
    header reads but whose data is broken fails later, at decoding, with its name.
    """

    def __init__(self, base: AugmentedImages, transform: PretrainTransform):
        self.base, self.transform = base, transform
        self.collate_fn = EncodedCollate(transform.img_size)  # build_loader uses a dataset's collate_fn

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def describe(self) -> str:
        return self.base.describe() + " (JPEGs decoded on the GPU)"

    def name(self, index: int) -> str:
        return self.base.name(index)

    def _item(self, index: int, generator: torch.Generator) -> EncodedItem:
        path = getattr(self.base, "path", None)
        encoded = False
        if path is not None:
            raw = path(index).read_bytes()
            with Image.open(io.BytesIO(raw)) as image:  # parses the header: fails on non-images
                encoded = _is_whole_baseline_jpeg(image, raw)
                if encoded:
                    data, size = torch.frombuffer(bytearray(raw), dtype=torch.uint8), image.size
                else:
                    image = image.convert("RGB")
        else:
            image = self.base.load(index).convert("RGB")
        if not encoded:
            data, size = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous(), image.size
        box = self.transform.crop_box(*size, generator)
        flip = torch.rand((), generator=generator).item() < self.transform.hflip
        return EncodedItem(data, encoded, box, flip, self.base.name(index))

    def __getitem__(self, index: int) -> Tuple[EncodedItem, int]:
        generator = self.base.generator(index)
        return first_readable(index, len(self), lambda i: self._item(i, generator), self.describe, self.name)


class EncodedBatch:
    """A batch of ``EncodedItem``; ``.to(device)`` returns the normalised (B, 3, S, S) float32 batch.

    The trainer moves its batch with ``images.to(device, non_blocking=True)``, so a loader of
    ``EncodedImages`` drops in for the PIL one without a change to the training step; the decoding
    time then counts as compute in the data-wait figures, since it runs on the GPU.
    """

    def __init__(self, items: Sequence[EncodedItem], img_size: int):
        self.items, self.img_size = list(items), int(img_size)

    def pin_memory(self) -> "EncodedBatch":
        for item in self.items:
            item.data = item.data.pin_memory()
        return self

    def _decode(self, device: torch.device) -> List[torch.Tensor]:
        from torchcodec.decoders import decode_jpeg

        images: List[Optional[torch.Tensor]] = [None] * len(self.items)
        jpegs = [i for i, item in enumerate(self.items) if item.encoded]
        if jpegs:
            try:  # one batched call: what nvJPEG is fast at
                decoded = decode_jpeg([self.items[i].data for i in jpegs], mode="RGB", device=device)
            except RuntimeError:  # find the file that broke the batch and name it
                decoded = []
                for i in jpegs:
                    try:
                        decoded.append(_decode_one(self.items[i], device))
                    except RuntimeError as error:
                        raise DataError(f"could not decode {self.items[i].name} with data.decode=gpu "
                                        f"({str(error).splitlines()[0]}); fix or remove the file, or use "
                                        f"data.decode=pil or tensor, which skip unreadable files") from None
            for i, image in zip(jpegs, decoded):
                images[i] = image
        for i, item in enumerate(self.items):
            if not item.encoded:
                images[i] = _decode_one(item, device)
        return images

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:  # noqa: ARG002 -- Tensor.to's signature
        device = torch.device(device)
        crops = [_crop(image, item, self.img_size) for item, image in zip(self.items, self._decode(device))]
        return normalize_uint8(torch.stack(crops))


class EncodedCollate:
    """``DataLoader`` collate: ``[(EncodedItem, bad), ...]`` -> ``(EncodedBatch, bad indices)``."""

    def __init__(self, img_size: int):
        self.img_size = int(img_size)

    def __call__(self, batch: Sequence[Tuple[EncodedItem, int]]) -> Tuple[EncodedBatch, torch.Tensor]:
        items, bad = zip(*batch)
        return EncodedBatch(items, self.img_size), default_collate(list(bad))


class TensorDecodedImages(EncodedImages):
    """``data.decode=tensor``: ``EncodedImages``' decode and augmentation done in the worker, on its CPU.

    Items are finished ``(3, S, S)`` float tensors, batched by the default collate like the PIL path's;
    a file that fails to decode is replaced by the next readable one and reported, as there.
    """

    def __init__(self, base: AugmentedImages, transform: PretrainTransform):
        super().__init__(base, transform)
        self.collate_fn = None

    def describe(self) -> str:
        return self.base.describe()

    def _item(self, index: int, generator: torch.Generator) -> torch.Tensor:
        item = super()._item(index, generator)
        cpu = torch.device("cpu")
        return normalize_uint8(_crop(_decode_one(item, cpu), item, self.transform.img_size))

"""Pretraining data: which files are images, what errors say, skipping unreadable files, SparK's
augmentation, the demo images, and how the loader splits a global batch over processes."""
from __future__ import annotations

import math

import pytest
import torch
from helpers.runs import make_images
from PIL import Image

from sparse_mim.data import (DataError, DemoImages, ImageFolder, PretrainTransform, build_dataset, build_loader,
                             find_images, per_rank_batch, set_epoch)
from sparse_mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalized_tensor


def _transform():
    return PretrainTransform(32)


# -- finding images -----------------------------------------------------------------------------
def test_imagenet_root_uses_its_train_folder_of_class_subfolders(tmp_path):
    for cls in ("n01", "n02"):
        make_images(tmp_path / "train" / cls, 2, ext=".JPEG")
    make_images(tmp_path / "val" / "n01", 3, ext=".JPEG")  # not pretraining data
    root, files = find_images(tmp_path)
    assert root == tmp_path / "train"
    assert len(files) == 4 and all(f.parent.parent == root for f in files)


def test_root_holding_class_subfolders_directly_is_accepted(tmp_path):
    make_images(tmp_path / "cats", 2)
    make_images(tmp_path / "dogs", 3)
    assert len(ImageFolder(tmp_path, _transform())) == 5


def test_flat_and_nested_folders_are_searched_recursively_with_any_case_extension(tmp_path):
    names = ["a.jpg", "b.JPEG", "c.Png", "d.bmp", "e.WEBP", "deep/er/f.jpeg"]
    image = Image.new("RGB", (40, 40), (10, 200, 30))
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / name, format=name.rsplit(".", 1)[1].upper().replace("JPG", "JPEG"))
    (tmp_path / "notes.txt").write_text("not an image")
    _, files = find_images(tmp_path)
    assert sorted(f.relative_to(tmp_path).as_posix() for f in files) == sorted(names)


def test_missing_path_is_a_clear_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        find_images(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_folder_without_images_is_a_clear_error_naming_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="no images found") as e:
        build_dataset(str(tmp_path), _transform())
    assert str(tmp_path) in str(e.value)


def test_a_file_instead_of_a_folder_is_a_clear_error(tmp_path):
    path = make_images(tmp_path, 1)[0]
    with pytest.raises(DataError, match="not a folder"):
        find_images(path)


# -- unreadable images --------------------------------------------------------------------------
def test_unreadable_image_is_replaced_by_the_next_readable_one_and_reported_by_its_index(tmp_path):
    make_images(tmp_path, 3)
    (tmp_path / "img_001.png").write_bytes(b"this is not a png")
    dataset = ImageFolder(tmp_path, _transform())
    image, unreadable = dataset[1]
    assert unreadable == 1 and image.shape == (3, 32, 32)
    assert [dataset[i][1] for i in (0, 2)] == [-1, -1]
    assert dataset.name(1) == str(tmp_path / "img_001.png")


def test_consecutive_unreadable_files_are_each_reported_once_by_their_own_item(tmp_path):
    make_images(tmp_path, 4)
    for name in ("img_001.png", "img_002.png"):
        (tmp_path / name).write_bytes(b"broken")
    dataset = ImageFolder(tmp_path, _transform())
    assert [dataset[i][1] for i in range(4)] == [-1, 1, 2, -1]  # item 1 falls back past 2 to 3


def test_truncated_jpeg_counts_as_unreadable(tmp_path):
    path = make_images(tmp_path, 2, ext=".jpg")[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert ImageFolder(tmp_path, _transform())[0][1] == 0


def test_all_images_unreadable_is_an_error_not_a_hang(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="no readable image in 3 images"):
        ImageFolder(tmp_path, _transform())[0]


# -- augmentation -------------------------------------------------------------------------------
def test_transform_gives_normalised_square_crops():
    image = Image.new("RGB", (90, 60), (124, 116, 104))  # about the ImageNet mean
    out = PretrainTransform(64)(image, torch.Generator().manual_seed(0))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((124, 116, 104), IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(out.mean((1, 2)), expected, atol=1e-2)


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def test_fast_normalisation_equals_torchvision_to_tensor_then_normalize():
    import torchvision.transforms.functional as TF

    image = _noise_image(37, 23)  # odd, non-square: a transposition error would show
    expected = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
    out = normalized_tensor(image)
    assert out.shape == expected.shape == (3, 23, 37) and out.dtype == torch.float32 and out.is_contiguous()
    assert (out - expected).abs().max() < 1e-6


@pytest.mark.parametrize("seed", range(6))
def test_transform_equals_torchvision_resized_crop_flip_and_normalize_for_the_same_draws(seed):
    """Same box and flip draw -> the same pixels as torchvision's ops (so only the draws are ours)."""
    import torchvision.transforms.functional as TF

    image, t = _noise_image(90, 61, seed), PretrainTransform(48)
    out = t(image, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    top, left, h, w = t.crop_box(90, 61, g)
    ref = TF.resized_crop(image, top, left, h, w, [48, 48], interpolation=TF.InterpolationMode.BICUBIC)
    if torch.rand((), generator=g).item() < t.hflip:
        ref = TF.hflip(ref)
    ref = TF.normalize(TF.to_tensor(ref), IMAGENET_MEAN, IMAGENET_STD)
    assert (out - ref).abs().max() < 1e-6


def test_random_resized_crop_covers_67_to_100_percent_with_aspect_ratio_three_quarters_to_four_thirds():
    t, g = PretrainTransform(64), torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = t.crop_box(400, 300, g)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.67 - 0.01 <= h * w / (400 * 300) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    make_images(tmp_path, 3)
    a, b = ImageFolder(tmp_path, _transform(), seed=1), ImageFolder(tmp_path, _transform(), seed=1)
    assert torch.equal(a[0][0], b[0][0])
    torch.rand(100)  # the global RNG plays no part
    assert torch.equal(a[0][0], b[0][0])
    b.set_epoch(1)
    assert not torch.equal(a[0][0], b[0][0])


def test_demo_images_need_no_download_and_are_ready_to_train():
    demo = DemoImages(PretrainTransform(64))
    assert len(demo) >= 64 and len(demo.photos) >= 4
    image, unreadable = demo[5]
    assert image.shape == (3, 64, 64) and unreadable == -1
    assert isinstance(build_dataset(None, _transform()), DemoImages)


# -- loader -------------------------------------------------------------------------------------
def _indexed(n):
    class Indexed(torch.utils.data.Dataset):
        epoch = 0

        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.tensor(i), 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def describe(self):
            return f"{n} numbers"

    return Indexed()


def _first_batches(loader, epoch=0, start=0):
    set_epoch(loader, epoch, start)
    return [batch.tolist() for batch, _ in loader]


def test_each_rank_gets_an_interleaved_share_of_the_same_global_batches():
    data = _indexed(50)
    single = _first_batches(build_loader(data, 8, seed=3))
    ranks = [_first_batches(build_loader(data, 8, world_size=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 50 // 8  # drop_last
    for step, batch in enumerate(single):
        assert ranks[0][step] == batch[0::2] and ranks[1][step] == batch[1::2]


def test_resuming_mid_epoch_skips_exactly_the_batches_already_seen():
    loader = build_loader(_indexed(40), 4, seed=0)
    full = _first_batches(loader, epoch=2)
    assert _first_batches(loader, epoch=2, start=3) == full[3:]
    assert _first_batches(loader, epoch=2) == full  # and a later epoch starts from the beginning again


def test_epochs_are_shuffled_differently():
    loader = build_loader(_indexed(40), 4, seed=0)
    assert _first_batches(loader, 0) != _first_batches(loader, 1)


def test_global_batch_must_divide_over_the_processes():
    assert per_rank_batch(64, 4) == 16
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        per_rank_batch(10, 4)


def test_fewer_images_than_one_global_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_loader(_indexed(5), 8)


def test_loader_length_is_the_same_number_of_steps_for_any_world_size():
    data = _indexed(103)
    assert {len(build_loader(data, 12, world_size=w, rank=0)) for w in (1, 2, 3, 4)} == {math.floor(103 / 12)}


def test_a_folder_without_a_readable_image_names_its_files(tmp_path):
    for i in range(2):
        (tmp_path / f"bad{i}.jpg").write_text("not an image")
    with pytest.raises(DataError, match="no readable image in 2 images") as e:
        ImageFolder(tmp_path, _transform())[0]
    assert str(tmp_path / "bad0.jpg") in str(e.value) and str(tmp_path / "bad1.jpg") in str(e.value)


def test_too_many_consecutive_unreadable_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr("sparse_mim.data.datasets.MAX_CONSECUTIVE_UNREADABLE", 2)
    make_images(tmp_path, 4)
    for name in ("img_001.png", "img_002.png"):
        (tmp_path / name).write_bytes(b"broken")
    with pytest.raises(DataError, match="2 consecutive images from index 1 could not be read") as e:
        ImageFolder(tmp_path, _transform())[1]
    assert f"{tmp_path / 'img_001.png'} (" in str(e.value) and f"{tmp_path / 'img_002.png'} (" in str(e.value)

"""``data.decode=tensor|gpu``: decode_jpeg + tensor augmentation, in the workers (tensor) or when the
batch moves to the device (gpu: workers hand over JPEG bytes + the seeded draws). The tensor ops are
device-agnostic, so everything but nvJPEG itself is checked here on the CPU against the PIL pipeline;
the CPU-vs-CUDA comparison runs where a GPU is present."""
from __future__ import annotations

import pytest
import torch
from helpers.runs import TINY, make_images, metrics
from PIL import Image

from sparse_mim.data import DataError, PretrainTransform, build_dataset, build_loader
from sparse_mim.data.datasets import sample_seed
from sparse_mim.data.tensor_decode import EncodedBatch, EncodedImages, TensorDecodedImages
from sparse_mim.data.transforms import IMAGENET_STD

#: one grey level in normalised units, for the channel with the smallest std
GREY = 1 / (255 * min(IMAGENET_STD))


def _photos(folder, count=12, size=96, ext=".jpg"):
    return make_images(folder, count, size=size, ext=ext)


def _pair(folder, img_size=64, seed=5, decode="gpu"):
    t = PretrainTransform(img_size)
    return build_dataset(str(folder), t, seed=seed), build_dataset(str(folder), t, seed=seed, decode=decode)


def _batch(dataset, indices):
    """What the trainer gets on the CPU from ``images.to(device)`` for these items."""
    items = [dataset[i] for i in indices]
    if isinstance(dataset, TensorDecodedImages):
        return torch.stack([image for image, _ in items]), [bad for _, bad in items]
    batch, bad = dataset.collate_fn(items)
    return batch.to("cpu"), bad.tolist()


def test_workers_draw_the_same_crop_and_flip_as_the_pil_transform(tmp_path):
    _photos(tmp_path, ext=".jpg")
    pil, enc = _pair(tmp_path)
    assert isinstance(enc, EncodedImages)
    for index in range(len(enc)):
        item, bad = enc[index]
        g = torch.Generator().manual_seed(sample_seed(5, 0, index))
        box = pil.transform.crop_box(96, 96, g)
        flip = torch.rand((), generator=g).item() < 0.5
        assert bad == -1 and item.encoded and item.box == box and item.flip == flip


@pytest.mark.parametrize("decode", ["tensor", "gpu"])
@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_decoded_batch_matches_the_pil_pipeline_within_two_grey_levels(tmp_path, ext, decode):
    """JPEGs take decode_jpeg, PNGs are decoded in the worker; both then crop/resize as tensors."""
    _photos(tmp_path, ext=ext)
    pil, enc = _pair(tmp_path, decode=decode)
    for epoch in (0, 1):
        pil.set_epoch(epoch), enc.set_epoch(epoch)
        expected = torch.stack([pil[i][0] for i in range(len(pil))])
        if decode == "gpu":
            assert all(enc[i][0].encoded == (ext == ".jpg") for i in range(len(enc)))
        images, bad = _batch(enc, range(len(enc)))
        assert bad == [-1] * len(enc)
        assert images.shape == expected.shape == (12, 3, 64, 64) and images.dtype == torch.float32
        diff = (images - expected).abs()
        assert diff.max() <= 2.05 * GREY and diff.mean() < 0.1 * GREY


@pytest.mark.parametrize("decode", ["tensor", "gpu"])
def test_demo_images_work_with_tensor_decoding(decode):
    t = PretrainTransform(64)
    pil, enc = build_dataset(None, t, seed=1), build_dataset(None, t, seed=1, decode=decode)
    expected = torch.stack([pil[i][0] for i in (0, 7)])
    assert (_batch(enc, (0, 7))[0] - expected).abs().max() <= 2.05 * GREY


@pytest.mark.parametrize("decode", ["tensor", "gpu"])
def test_loader_batches_are_the_same_for_any_worker_count(tmp_path, decode):
    _photos(tmp_path, count=16, ext=".jpg")
    _, enc = _pair(tmp_path, decode=decode)
    batches = []
    for workers in (0, 2):
        loader = build_loader(enc, 8, num_workers=workers, seed=2)
        batches.append([images.to("cpu") for images, _ in loader])
    assert len(batches[0]) == 2 and all(torch.equal(a, b) for a, b in zip(*batches))


def test_unreadable_file_is_replaced_by_the_next_and_reported(tmp_path):
    _photos(tmp_path, count=4, ext=".jpg")
    (tmp_path / "img_001.jpg").write_bytes(b"\x00" * 50)
    _, enc = _pair(tmp_path)
    item, bad = enc[1]
    assert bad == 1 and item.name.endswith("img_002.jpg")


def test_a_jpeg_whose_data_is_broken_names_the_file_at_decoding(tmp_path):
    paths = _photos(tmp_path, count=3, ext=".jpg")
    raw = bytearray(paths[1].read_bytes())
    table = raw.index(b"\xff\xc4")  # the first Huffman table: its code-length counts made impossible
    raw[table + 5:table + 21] = b"\xff" * 16
    paths[1].write_bytes(bytes(raw))
    _, enc = _pair(tmp_path)
    items = [enc[i] for i in range(3)]
    assert all(item.encoded and bad == -1 for item, bad in items)  # the header reads: the worker passes it on
    with pytest.raises(DataError, match=r"could not decode .*img_001\.jpg.*use data\.decode=pil or tensor"):
        enc.collate_fn(items)[0].to("cpu")
    pil, in_workers = _pair(tmp_path, decode="tensor")  # decoded in the worker: skipped as PIL skips it
    assert pil[1][1] == 1 and in_workers[1][1] == 1 and in_workers[2][1] == -1


@pytest.mark.parametrize("decode", ["tensor", "gpu"])
def test_a_jpeg_cut_short_is_skipped_like_pil_skips_it_not_filled_with_grey(tmp_path, decode):
    paths = _photos(tmp_path, count=3, ext=".jpg")
    paths[1].write_bytes(paths[1].read_bytes()[:-300])  # a download cut off: no end-of-image marker
    pil, enc = _pair(tmp_path, decode=decode)
    assert pil[1][1] == 1 and enc[1][1] == 1 and enc[2][1] == -1


def test_gpu_decoding_is_refused_clearly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from sparse_mim.train import compose_config, pretrain
    from sparse_mim.train.config import ConfigError

    with pytest.raises(ConfigError, match="data.decode=gpu .* use data.decode=tensor .* or pil"):
        pretrain(compose_config([*TINY, "data.decode=gpu", f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match="data.decode must be one of pil, tensor, gpu"):
        pretrain(compose_config([*TINY, "data.decode=turbo", f"output_dir={tmp_path / 'run'}"]))


def test_pretraining_with_tensor_and_gpu_decoding_follows_the_pil_run(tmp_path, monkeypatch):
    """The trainer's side of data.decode (loader collate, the .to() in the step, the pictures); the gpu
    path runs on the CPU by letting the config check believe a GPU is there."""
    import sparse_mim.train.config as config_module
    from sparse_mim.train import compose_config, pretrain

    _photos(tmp_path / "data", count=8, ext=".jpg")
    monkeypatch.setattr(config_module, "_cuda_available", lambda: True)
    losses = {}
    for decode in ("pil", "tensor", "gpu"):
        out = tmp_path / decode
        pretrain(compose_config([*TINY, f"data.path={tmp_path / 'data'}", f"data.decode={decode}",
                                 "train.max_steps=2", "train.epochs=1", f"output_dir={out}"]))
        losses[decode] = [m["loss"] for m in metrics(out) if "loss" in m]
        assert len(losses[decode]) == 2 and list(out.glob("*.png"))
    # the same crops within two grey levels: the same losses to a few parts in 1e4
    assert losses["tensor"] == pytest.approx(losses["pil"], rel=1e-3)
    assert losses["gpu"] == pytest.approx(losses["tensor"], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_decoding_gives_the_cpu_crops(tmp_path):
    make_images(tmp_path, 16, size=160, ext=".jpg")
    with Image.open(next(tmp_path.glob("*.jpg"))) as im:
        assert im.format == "JPEG"
    _, enc = _pair(tmp_path, img_size=128)
    batch, _ = enc.collate_fn([enc[i] for i in range(len(enc))])
    cpu, cuda = batch.to("cpu"), EncodedBatch(batch.items, 128).to("cuda").cpu()
    diff = (cpu - cuda).abs()
    # nvJPEG's IDCT and upsampling may differ from libjpeg-turbo's by a grey level or two
    assert diff.max() <= 3.05 * GREY and diff.mean() < 0.5 * GREY


@pytest.mark.parametrize("decode", ["tensor", "gpu"])
def test_decoding_uses_no_deprecated_torchvision_image_api(tmp_path, decode):
    import warnings

    _photos(tmp_path, count=2, ext=".jpg")
    _, dataset = _pair(tmp_path, decode=decode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        images, _ = _batch(dataset, [0, 1])
    assert images.shape == (2, 3, 64, 64)

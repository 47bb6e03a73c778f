"""Image datasets, loaded by torchvision from small files in the real on-disk formats.

Each test writes a few images in the format the real dataset ships in (CIFAR-10's pickled
batches, MNIST's IDX files, SVHN's .mat, CelebA's folder and annotation lists, LSUN's lmdb
databases of WebP images, a folder of PNGs) and checks what the model sees: shapes, value ranges, the exact inverse back to
[0, 1], and the one-line error when a dataset is missing.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.celeba
import torchvision.datasets.cifar
import torchvision.datasets.svhn
from omegaconf import OmegaConf
from PIL import Image
from torchvision import datasets

from conftest import run_cli
from ncsn.config import config_dir
from ncsn.data import first_tensor, infinite_batches
from ncsn.data.images import (IMAGE_DATASETS, DatasetNotFoundError, ModelSpace,
                              build_image_data, inverse_logit_transform, logit_transform)

N = 4                                   # images per file


def pixels(shape, seed: int) -> np.ndarray:
    """Random 8-bit pixels that include both extremes 0 and 255."""
    x = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    x.flat[0], x.flat[1] = 0, 255
    return x


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision compares each file's md5 with that of the real dataset's file. The tests
    write small files in the same formats, so only that comparison is replaced: the
    existence checks and all of torchvision's parsing still run."""
    def exists(fpath, md5=None) -> bool:
        return os.path.isfile(fpath)
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn,
                   torchvision.datasets.celeba):
        monkeypatch.setattr(module, "check_integrity", exists)


# ----------------------------------------------------------------------------- writers
def write_cifar10(root: Path) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/: data_batch_1..5 and test_batch (dicts of "data" (N, 3072) uint8
    in CHW order and "labels"), batches.meta. Returns the images as (N, 3, 32, 32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = {"train": [], "test": []}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = pixels((N, 3 * 32 * 32), seed=i)
        entry = {"batch_label": name, "data": data, "labels": list(range(N)),
                 "filenames": [f"{name}_{k}.png" for k in range(N)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        images["test" if name == "test_batch" else "train"].append(data.reshape(N, 3, 32, 32))
    meta = {"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": N}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {split: np.concatenate(parts) for split, parts in images.items()}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: magic 0x0000 08 <ndim> (uint8 data), the dims as big-endian int32, data."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str) -> dict[str, np.ndarray]:
    """<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte. Returns (N, 28, 28) images."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    images = {}
    for seed, (split, prefix) in enumerate([("train", "train"), ("test", "t10k")]):
        images[split] = pixels((N, 28, 28), seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[split])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(N))
    return images


def write_svhn(root: Path) -> dict[str, np.ndarray]:
    """svhn/{train,test}_32x32.mat: X of shape (32, 32, 3, N) uint8, y of shape (N, 1) in
    1..10. Returns (N, 3, 32, 32) images."""
    from scipy.io import savemat

    (root / "svhn").mkdir(parents=True)
    images = {}
    for seed, split in enumerate(["train", "test"]):
        images[split] = pixels((N, 3, 32, 32), seed)
        labels = np.array([10, 1, 2, 3], dtype=np.uint8).reshape(N, 1)
        savemat(root / "svhn" / f"{split}_32x32.mat",
                {"X": images[split].transpose(2, 3, 1, 0), "y": labels})
    return images


def write_celeba(root: Path, partition=(0, 0, 0, 1, 1, 2, 2)) -> None:
    """celeba/img_align_celeba/*.jpg (178x218) and the five annotation lists. Each split gets
    at least two images: torchvision's CelebA cannot index a split of one."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{k + 1:06d}.jpg" for k in range(len(partition))]
    for k, name in enumerate(names):
        Image.fromarray(pixels((218, 178, 3), k)).save(folder / "img_align_celeba" / name)

    def rows(values):
        return "".join(f"{name} {' '.join(map(str, v))}\n" for name, v in zip(names, values))

    def with_header(header, values):
        return f"{len(names)}\n{' '.join(header)}\n" + rows(values)

    n = len(names)
    (folder / "list_eval_partition.txt").write_text(rows([[p] for p in partition]))
    (folder / "identity_CelebA.txt").write_text(rows([[k + 1] for k in range(n)]))
    (folder / "list_bbox_celeba.txt").write_text(
        with_header(["image_id", "x_1", "y_1", "width", "height"], [[1, 2, 3, 4]] * n))
    (folder / "list_landmarks_align_celeba.txt").write_text(
        with_header([f"p{k}" for k in range(10)], [list(range(10))] * n))
    (folder / "list_attr_celeba.txt").write_text(
        with_header([f"attr{k}" for k in range(40)], [[1, -1] * 20] * n))


LSUN_COLOURS = {"train": [(200, 30, 90), (0, 255, 128), (10, 20, 30), (255, 255, 0)],
                "val": [(1, 2, 3), (250, 128, 7)]}


def write_lsun(root: Path, category: str = "church_outdoor") -> dict[str, torch.Tensor]:
    """lsun/<category>_{train,val}_lmdb/: lmdb databases (data.mdb, lock.mdb) whose values are
    WebP images, as in the real dataset; lossless here, so that pixels come back exactly.
    Image k is 48 wide and 40 high, of one colour, with 2-pixel stripes of the complementary
    colour at its left and right edges that a centre crop to a square drops. Returns, per
    split, the colours in [0, 1] as (N, 3) in key order (the order lmdb reads them in)."""
    import lmdb

    colours = {}
    for split, rgbs in LSUN_COLOURS.items():
        path = root / "lsun" / f"{category}_{split}_lmdb"
        path.mkdir(parents=True)
        env = lmdb.open(str(path), map_size=1 << 22)
        with env.begin(write=True) as txn:
            for k, rgb in enumerate(rgbs):
                image = np.empty((40, 48, 3), dtype=np.uint8)
                image[:] = rgb
                image[:, :2] = image[:, -2:] = 255 - np.array(rgb, dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="WEBP", lossless=True)
                txn.put(f"{k:040x}".encode(), buffer.getvalue())   # LSUN's keys: 40 hex digits
        env.close()
        colours[split] = torch.tensor(rgbs, dtype=torch.float32) / 255
    return colours


def write_image_folder(path: Path, n_per_class: int = 5, size=(40, 30)) -> None:
    """path/<class>/<k>.png for two classes, RGB, width x height = size."""
    for c in ("cats", "dogs"):
        (path / c).mkdir(parents=True)
        for k in range(n_per_class):
            image = pixels((size[1], size[0], 3), seed=10 * len(c) + k)
            Image.fromarray(image).save(path / c / f"{k}.png")


def config(name: str, root: Path, **overrides) -> dict:
    return {"name": name, "root": str(root), "random_flip": False, "num_workers": 0,
            **overrides}


def stack(dataset) -> torch.Tensor:
    """All items of a dataset as one (N, C, H, W) tensor."""
    return torch.stack([first_tensor(dataset[i]) for i in range(len(dataset))])


# ----------------------------------------------------------------------------- loaders
def test_cifar10_items_are_the_pixels_over_255(tmp_path, skip_md5):
    raw = write_cifar10(tmp_path)
    data = build_image_data(config("cifar10", tmp_path))
    assert data.kind == "images" and data.shape == (3, 32, 32)
    assert len(data.train) == 5 * N and len(data.test) == N
    image, label = data.train[1]
    assert image.shape == data.shape and image.dtype == torch.float32 and label == 1
    for split, dataset in (("train", data.train), ("test", data.test)):
        expected = torch.from_numpy(raw[split]).float() / 255
        torch.testing.assert_close(stack(dataset), expected)


@pytest.mark.parametrize("rescaled, logit", [(False, False), (True, False), (False, True)])
def test_to_data_space_inverts_the_model_space(tmp_path, skip_md5, rescaled, logit):
    raw = write_cifar10(tmp_path)
    data = build_image_data(config("cifar10", tmp_path, rescaled=rescaled,
                                   logit_transform=logit))
    x = stack(data.test)
    if rescaled:
        assert x.min() == -1.0 and x.max() == 1.0
    if logit:
        assert torch.isfinite(x).all() and x.min() < -10 and x.max() > 10
    expected = torch.from_numpy(raw["test"]).float() / 255
    torch.testing.assert_close(data.to_data_space(x), expected, atol=1e-5, rtol=0)


def test_logit_transform_round_trip_and_clamped_inverse():
    x = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(1000)])
    y = logit_transform(x, 1e-6)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(inverse_logit_transform(y, 1e-6), x, atol=1e-6, rtol=0)
    space = ModelSpace(rescaled=True)
    torch.testing.assert_close(space.inverse(space(x)), x)
    assert space.inverse(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]   # samples that stray


def test_uniform_dequantization_stays_in_each_pixels_bin(tmp_path, skip_md5):
    raw = write_cifar10(tmp_path)
    data = build_image_data(config("cifar10", tmp_path, uniform_dequantization=True))
    x = stack(data.test)
    assert x.min() >= 0.0 and x.max() < 1.0
    # (k + u) / 256 with u in [0, 1): the floor recovers the pixel value k.
    assert torch.equal(torch.floor(x * 256).to(torch.uint8), torch.from_numpy(raw["test"]))
    assert not torch.equal(x, stack(data.test))              # fresh noise on every access


def test_gaussian_dequantization_stays_in_range_and_logit_stays_finite(tmp_path, skip_md5):
    raw = write_cifar10(tmp_path)
    cfg = config("cifar10", tmp_path, gaussian_dequantization=True, uniform_dequantization=True,
                 logit_transform=True, gaussian_dequantization_std=0.05)
    data = build_image_data(cfg)
    x = data.to_data_space(stack(data.test))
    assert torch.isfinite(stack(data.test)).all()
    assert x.min() >= 0.0 and x.max() <= 1.0
    expected = torch.from_numpy(raw["test"]).float() / 255
    assert (x - expected).abs().mean() < 0.05


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_native_and_resized(tmp_path, name, folder):
    raw = write_mnist(tmp_path, folder)
    data = build_image_data(config(name, tmp_path))
    assert data.shape == (1, 28, 28) and len(data.train) == N and len(data.test) == N
    expected = torch.from_numpy(raw["train"]).float().unsqueeze(1) / 255
    torch.testing.assert_close(stack(data.train), expected)
    resized = build_image_data(config(name, tmp_path, image_size=32, rescaled=True))
    x = stack(resized.train)
    assert resized.shape == (1, 32, 32) and x.shape == (N, 1, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_svhn_mat_files(tmp_path, skip_md5):
    raw = write_svhn(tmp_path)
    data = build_image_data(config("svhn", tmp_path))
    assert data.shape == (3, 32, 32) and len(data.train) == N
    torch.testing.assert_close(stack(data.test), torch.from_numpy(raw["test"]).float() / 255)
    assert data.train[0][1] == 0                          # SVHN's label 10 is the digit 0


def test_celeba_crop_and_resize(tmp_path, skip_md5):
    write_celeba(tmp_path)
    data = build_image_data(config("celeba", tmp_path, image_size=32, random_flip=True))
    assert data.shape == (3, 32, 32)
    assert len(data.train) == 3 and len(data.test) == 2
    x = stack(data.train)
    assert x.shape == (3, 3, 32, 32) and x.min() >= 0.0 and x.max() <= 1.0
    valid = build_image_data(config("celeba", tmp_path, test_split="valid"))
    assert stack(valid.test).shape == (2, 3, 64, 64)


def test_lsun_lmdb_resize_and_centre_crop(tmp_path, monkeypatch):
    pytest.importorskip("lmdb")
    monkeypatch.chdir(tmp_path)            # torchvision caches the keys in ./_cache_*
    colours = write_lsun(tmp_path)
    data = build_image_data(config("lsun", tmp_path, image_size=32))
    assert data.shape == (3, 32, 32) and len(data.train) == 4 and len(data.test) == 2
    image, label = data.train[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    # 48x40 -> 38x32 -> the central 32x32: one colour, no trace of the edge stripes.
    for split, dataset in (("train", data.train), ("val", data.test)):
        expected = colours[split][:, :, None, None].expand(-1, 3, 32, 32)
        torch.testing.assert_close(stack(dataset), expected)
    assert len(list(tmp_path.glob("_cache_*"))) == 2               # one per database

    # Again, while the first still lives, in [-1, 1] and through DataLoader workers.
    rescaled = build_image_data(config("lsun", tmp_path, image_size=24, rescaled=True,
                                       random_flip=True, load_test=False))
    assert rescaled.test is None
    x = stack(rescaled.train)
    assert x.shape == (4, 3, 24, 24) and x.min() >= -1.0 and x.max() <= 1.0
    torch.testing.assert_close(rescaled.to_data_space(x),
                               colours["train"][:, :, None, None].expand(-1, 3, 24, 24))
    batch = next(infinite_batches(rescaled.train, 3, torch.Generator().manual_seed(0),
                                  num_workers=2))
    assert batch.shape == (3, 3, 24, 24)
    # Both share the one open database (lmdb >= 3 refuses a second open), each with its own
    # transform.
    assert data.train[0][0].shape == (3, 32, 32)


def test_image_folder_split_channels_and_test_folder(tmp_path):
    write_image_folder(tmp_path / "pets")
    data = build_image_data(config("image_folder", tmp_path, path="pets", image_size=16,
                                   test_fraction=0.2, split_seed=3))
    assert data.shape == (3, 16, 16) and len(data.train) == 8 and len(data.test) == 2
    x = stack(data.train)
    assert x.shape == (8, 3, 16, 16) and x.min() >= 0.0 and x.max() <= 1.0
    train_paths = {data.train.dataset.dataset.samples[i][0] for i in data.train.indices}
    test_paths = {data.test.dataset.dataset.samples[i][0] for i in data.test.indices}
    assert not train_paths & test_paths

    write_image_folder(tmp_path / "held_out", n_per_class=1)
    grey = build_image_data(config("image_folder", tmp_path, path=str(tmp_path / "pets"),
                                   test_path="held_out", channels=1, image_size=8,
                                   crop_size=24))
    assert grey.shape == (1, 8, 8) and len(grey.train) == 10 and len(grey.test) == 2
    assert stack(grey.test).shape == (2, 1, 8, 8)


def write_flat_folder(path: Path, n: int, size=(12, 10)) -> None:
    """path/<k>.png, n RGB images, no class subfolders."""
    path.mkdir(parents=True)
    for k in range(n):
        Image.fromarray(pixels((size[1], size[0], 3), seed=k)).save(path / f"{k}.png")


def test_image_folder_root_is_the_folder_of_classes_or_of_images(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="ncsn")
    write_image_folder(tmp_path / "pets")                               # 2 classes x 5
    classes = build_image_data(config("image_folder", tmp_path / "pets", image_size=8,
                                      test_fraction=0.2))
    assert len(classes.train) == 8 and len(classes.test) == 2
    assert f"image folder {tmp_path / 'pets'}: 10 images, 2 classes (cats, dogs)" in caplog.text

    write_flat_folder(tmp_path / "flat", 7)
    flat = build_image_data(config("image_folder", tmp_path / "flat", image_size=8,
                                   test_fraction=0.0, load_test=False))
    assert len(flat.train) == 7 and {label for _, label in flat.train} == {0}
    assert stack(flat.train).shape == (7, 3, 8, 8)
    assert f"image folder {tmp_path / 'flat'}: flat folder, 7 images" in caplog.text

    # Without path, a relative test_path is taken as root is: against the working directory.
    monkeypatch.chdir(tmp_path)
    held_out = build_image_data(config("image_folder", "flat", test_path="pets", image_size=8))
    assert len(held_out.train) == 7 and len(held_out.test) == 10


def one_line_not_found(root: Path, **overrides) -> str:
    with pytest.raises(DatasetNotFoundError) as info:
        build_image_data(config("image_folder", root, **overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_image_folder_errors_name_the_folder(tmp_path):
    write_image_folder(tmp_path / "pets")
    (tmp_path / "pets" / "birds").mkdir()                               # an empty class
    (tmp_path / "pets" / "fish").mkdir()
    (tmp_path / "pets" / "fish" / "notes.txt").write_text("not an image")
    message = one_line_not_found(tmp_path / "pets")
    assert f"class 'birds' has no images: {tmp_path / 'pets' / 'birds'} holds no file" in message
    assert "1 other class folders: fish" in message

    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in one_line_not_found(tmp_path / "empty")
    assert "looked for images" in one_line_not_found(tmp_path / "missing")

    write_image_folder(tmp_path / "mixed", n_per_class=1)
    write_flat_folder(tmp_path / "mixed" / "loose", 0)
    Image.fromarray(pixels((4, 4, 3), seed=0)).save(tmp_path / "mixed" / "stray.png")
    message = one_line_not_found(tmp_path / "mixed")
    assert f"image folder {tmp_path / 'mixed'} holds both images (1) and subfolders " \
           f"(cats, dogs, loose)" in message


def test_image_folder_path_picks_a_folder_under_root_as_before(tmp_path):
    write_image_folder(tmp_path / "data" / "images")
    data = build_image_data(config("image_folder", tmp_path / "data", path="images",
                                   test_path="images/dogs", image_size=8))
    assert len(data.train) == 10 and len(data.test) == 5


# Two steps of a tiny U-Net on 8x8 images; the noise table given, not measured on the data.
FOLDER_RUN = ["dataset=image_folder", "dataset.image_size=8", "dataset.num_workers=0",
              "model=unet_small", "model.ch=8", "noise.num_scales=4", "noise.sigma_begin=1.0",
              "sampler.n_steps_each=1", "trainer.n_steps=2", "trainer.ckpt_every=2",
              "trainer.batch_size=4", "trainer.n_plot_samples=0", "trainer.device=cpu"]


def test_ncsn_train_on_a_flat_folder_and_a_one_line_error_for_an_empty_class(tmp_path):
    write_flat_folder(tmp_path / "faces", 6)
    result = run_cli("ncsn-train", *FOLDER_RUN, f"dataset.root={tmp_path / 'faces'}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "flat folder, 6 images" in (tmp_path / "run" / "train.log").read_text()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()

    (tmp_path / "pets" / "birds").mkdir(parents=True)
    write_image_folder(tmp_path / "pets")
    result = run_cli("ncsn-train", *FOLDER_RUN, f"dataset.root={tmp_path / 'pets'}",
                     f"hydra.run.dir={tmp_path / 'run2'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("ncsn-train: error: image folder class 'birds' has no images: "
                               f"{tmp_path / 'pets' / 'birds'}")


def test_digits_need_no_files_and_split_by_seed():
    data = build_image_data({"name": "digits"})
    assert data.shape == (1, 8, 8) and data.kind == "images"
    assert len(data.test) == round(0.2 * 1797) and len(data.train) + len(data.test) == 1797
    x = stack(data.train)
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(x * 16, torch.round(x * 16))          # values 0..16 over 16
    again = build_image_data({"name": "digits"})
    assert torch.equal(stack(again.test), stack(data.test))
    other = build_image_data({"name": "digits", "split_seed": 1})
    assert not torch.equal(stack(other.test), stack(data.test))

    big = build_image_data({"name": "digits", "image_size": 16, "rescaled": True,
                            "uniform_dequantization": True, "load_test": False})
    y = stack(big.train)
    assert big.test is None and y.shape[1:] == (1, 16, 16)
    assert y.min() >= -1.0 and y.max() < 1.0


def test_a_digits_validation_split_is_held_out_from_training_and_leaves_the_test_split():
    def rows(dataset):
        return {tuple(x.flatten().tolist()) + (y,) for x, y in dataset}
    plain = build_image_data({"name": "digits"})
    with_validation = build_image_data({"name": "digits", "validation_fraction": 0.1})
    validation, train = rows(with_validation.test), rows(with_validation.train)
    assert len(with_validation.test) == round(0.1 * 1797)
    assert len(with_validation.train) == 1797 - round(0.2 * 1797) - round(0.1 * 1797)
    assert not validation & train and not validation & rows(plain.test)
    assert train | validation == rows(plain.train)      # carved out of the training split
    # metric=nll scores the test split of such a run all the same.
    from ncsn.evaluate.nll import held_out_split
    split = held_out_split({"name": "digits", "validation_fraction": 0.1})
    assert len(split.dataset) == len(plain.test)
    with pytest.raises(ValueError, match="validation_fraction must lie in"):
        build_image_data({"name": "digits", "validation_fraction": 0.8})


def test_batches_for_the_training_loop(tmp_path, skip_md5):
    write_cifar10(tmp_path)
    data = build_image_data(config("cifar10", tmp_path, random_flip=True, rescaled=True))
    batch = next(infinite_batches(data.train, 6, torch.Generator().manual_seed(0)))
    assert batch.shape == (6, *data.shape) and batch.min() >= -1 and batch.max() <= 1


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, extra", [
    ("cifar10", {}), ("mnist", {}), ("fashion_mnist", {}), ("svhn", {}), ("celeba", {}),
    ("image_folder", {"path": "my_images"})])
def test_missing_dataset_is_one_clear_line(tmp_path, monkeypatch, name, extra):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as info:
        build_image_data({"name": name, "root": "data", **extra})   # relative to the cwd
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    assert str(tmp_path.resolve() / "data") in message
    assert "place" in message or "put the images" in message
    assert info.value.__cause__ is not None                       # torchvision's error, chained


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed") as info:
        build_image_data({"name": "cifar10", "root": str(tmp_path), "download": True})
    assert "\n" not in str(info.value) and str(tmp_path.resolve()) in str(info.value)


def test_lsun_needs_lmdb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)                 # import lmdb fails
    with pytest.raises(ImportError, match=r'pip install "ncsn\[lsun\]"'):
        build_image_data({"name": "lsun", "root": str(tmp_path)})


def test_missing_lsun_names_the_database(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", types.ModuleType("lmdb"))
    with pytest.raises(DatasetNotFoundError, match="church_outdoor_train_lmdb") as info:
        build_image_data({"name": "lsun", "root": str(tmp_path)})
    assert str(tmp_path.resolve() / "lsun") in str(info.value)
    (tmp_path / "lsun" / "church_outdoor_train_lmdb").mkdir(parents=True)   # not unzipped yet
    with pytest.raises(DatasetNotFoundError, match="church_outdoor_train_lmdb/data.mdb"):
        build_image_data({"name": "lsun", "root": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown LSUN category"):
        build_image_data({"name": "lsun", "root": str(tmp_path), "category": "church"})


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="exclude each other"):
        build_image_data({"name": "digits", "rescaled": True, "logit_transform": True})
    with pytest.raises(ValueError, match="unknown image dataset"):
        build_image_data({"name": "cifar100"})
    with pytest.raises(Exception, match="image_sise"):
        build_image_data({"name": "digits", "image_sise": 8})


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", sorted(IMAGE_DATASETS))
def test_yaml_sets_every_field_of_its_schema(name):
    yaml = OmegaConf.load(Path(config_dir()) / "dataset" / f"{name}.yaml")
    assert list(yaml.defaults) == [f"/schema/dataset/{name}@_here_", "_self_"]
    del yaml["defaults"]
    schema = OmegaConf.structured(IMAGE_DATASETS[name])
    assert set(yaml) == set(schema) and yaml.name == name
    OmegaConf.merge(schema, yaml)                                 # types agree

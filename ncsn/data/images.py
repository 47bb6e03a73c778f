"""Image datasets: torchvision's loaders, NCSN's preprocessing, and the map back to [0, 1].

Every image goes

    PIL image -> (crop, resize) -> tensor (C, H, W) in [0, 1] -> (random flip, train split only)
    -> (dequantization) -> model space: [0, 1], [-1, 1] (``rescaled``) or R (``logit_transform``)

and :func:`build_image_data` returns a :class:`ncsn.data.Data` whose ``to_data_space`` undoes
the last step. Each dataset lives in its own folder under ``root``, except ``image_folder``,
whose ``root`` is the folder of images itself. One that is not on disk and cannot be
downloaded raises :class:`DatasetNotFoundError`, whose message is one line: what was looked
for, where, and how to provide it.
"""
from __future__ import annotations

import importlib
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import Dataset, Subset

log = logging.getLogger(__name__)

from ncsn.data.device import RawImages
from ncsn.data.space import ModelSpace, inverse_logit_transform, logit_transform


class _LazyModule:
    """A module imported at its first use. torchvision takes about 2 s to import (it imports
    torch._dynamo), which every command would otherwise pay before its first line, points
    and mistakes included."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


datasets = _LazyModule("torchvision.datasets")
transforms = _LazyModule("torchvision.transforms")
_folder = _LazyModule("torchvision.datasets.folder")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk (or not laid out as its loader reads it) and could not be
    downloaded. The message is one line."""


# ----------------------------------------------------------------------------- configs
@dataclass
class ImageDataConfig:
    name: str = "cifar10"
    root: str = "data"                   # datasets live in root/<their folder>; ~ and relative
                                         # paths are resolved against the working directory
    download: bool = False               # fetch a missing dataset with torchvision's downloader
    image_size: int = 32                 # height = width of the images the model sees
    random_flip: bool = True             # random horizontal flips of the training split
    rescaled: bool = False               # map [0, 1] to [-1, 1]
    logit_transform: bool = False        # map x to logit(lambda + (1 - 2 lambda) x)
    logit_lambda: float = 1e-6
    uniform_dequantization: bool = False     # x -> (255 x + u) / 256, u ~ U(0, 1)
    gaussian_dequantization: bool = False    # x -> clamp(x + std z, 0, 1), z ~ N(0, 1)
    gaussian_dequantization_std: float = 0.01
    load_test: bool = True               # build the test split; false: Data.test is None
    num_workers: int = 4                 # DataLoader worker processes


@dataclass
class CIFAR10Config(ImageDataConfig):
    name: str = "cifar10"


@dataclass
class MNISTConfig(ImageDataConfig):
    name: str = "mnist"
    image_size: int = 28                 # native 28x28; another size resizes
    random_flip: bool = False            # digits are not mirror-symmetric


@dataclass
class FashionMNISTConfig(MNISTConfig):
    name: str = "fashion_mnist"


@dataclass
class SVHNConfig(ImageDataConfig):
    name: str = "svhn"
    random_flip: bool = False


@dataclass
class CelebAConfig(ImageDataConfig):
    name: str = "celeba"
    image_size: int = 64                 # NCSN: 32, NCSNv2: 64
    crop_size: int = 140                 # NCSN: centre crop of the 178x218 aligned faces, then resize
    test_split: str = "test"             # test | valid


@dataclass
class LSUNConfig(ImageDataConfig):
    name: str = "lsun"
    category: str = "church_outdoor"     # church_outdoor | bedroom | tower | ... (LSUN scenes)
    image_size: int = 96                 # NCSNv2: church_outdoor 96, bedroom and tower 128


@dataclass
class ImageFolderConfig(ImageDataConfig):
    name: str = "image_folder"
    root: str = "data"                   # the folder of images: root/<image>, or class subfolders
                                         # root/<class>/<image> (torchvision's ImageFolder)
    path: Optional[str] = None           # null: root itself; a name: the folder root/path (an
                                         # absolute path as it is)
    image_size: int = 64
    channels: int = 3                    # 3: RGB, 1: greyscale
    crop_size: Optional[int] = None      # centre crop before resizing; null: resize the shorter
                                         # side to image_size, then centre-crop a square
    test_path: Optional[str] = None      # a folder for the test split, laid out like the
                                         # training one; relative: under root when path is
                                         # given, else to the working directory (like root);
                                         # null: hold out test_fraction of the training folder
    test_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class DigitsConfig(ImageDataConfig):
    name: str = "digits"                 # scikit-learn's 1,797 8x8 digits: no download
    image_size: int = 8                  # native 8x8; another size resizes (bilinear)
    random_flip: bool = False
    num_workers: int = 0                 # in memory: worker processes only cost start-up time
    test_fraction: float = 0.2           # held out by a seeded random permutation
    validation_fraction: float = 0.0     # > 0: also hold out this fraction (of all 1,797) as a
                                         # validation split, which the trainer then scores
                                         # (test loss, trainer.keep_best) instead of the test
                                         # split; the test split is the same either way
    split_seed: int = 0


IMAGE_DATASETS = {
    "cifar10": CIFAR10Config,
    "mnist": MNISTConfig,
    "fashion_mnist": FashionMNISTConfig,
    "svhn": SVHNConfig,
    "celeba": CelebAConfig,
    "lsun": LSUNConfig,
    "image_folder": ImageFolderConfig,
    "digits": DigitsConfig,
}

LSUN_CATEGORIES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room",
                   "dining_room", "kitchen", "living_room", "restaurant", "tower")


def image_config(cfg) -> ImageDataConfig:
    """The typed config of ``cfg``: a config dataclass, a DictConfig or a plain dict with a
    ``name``; keys it leaves out take that dataset's defaults, unknown keys are an error."""
    if isinstance(cfg, ImageDataConfig):
        return cfg
    name = cfg["name"]
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {sorted(IMAGE_DATASETS)}")
    merged = OmegaConf.merge(OmegaConf.structured(IMAGE_DATASETS[name]), cfg)
    return OmegaConf.to_object(merged)


# ----------------------------------------------------------------------------- transforms
def pixel_levels(dataset_name: str) -> int | None:
    """Values a pixel takes: 17 for the 8x8 digits (k/16), 256 for 8-bit images; None for
    continuous points."""
    if dataset_name not in IMAGE_DATASETS:
        return None
    return 17 if dataset_name == "digits" else 256


def off_grid(cfg) -> str | None:
    """Why the pixels the model sees have left the dataset's ``pixel_levels`` grid (None:
    they have not). Resizing PIL images keeps 8 bits, but the 8x8 digits are resized as
    tensors of k/16 (bilinear), which lands between the 17 values."""
    if cfg.name == "digits" and cfg.image_size != 8:
        return (f"dataset.image_size={cfg.image_size} resizes the 8x8 digits (bilinear), which "
                f"moves their pixels off the 17 values k/16 that bits/dim counts")
    return None


def likelihood_levels(cfg) -> int | None:
    """K when a density of the model's pixels gives bits/dim of the K-level data (its
    -log p, less d log K, bounds the discrete -log P: uniformly dequantized pixels still on
    the dataset's grid); None when it does not (then -log p is in nats of the continuous
    data it sees, and no bound): no dequantization, the clamped Gaussian one (it leaves
    pixels exactly on 0 and 1, 29% of the digits', where a density is unbounded), or
    pixels resized off their grid."""
    if (cfg.uniform_dequantization and not cfg.gaussian_dequantization
            and off_grid(cfg) is None):
        return pixel_levels(cfg.name)
    return None


class UniformDequantize:
    """x in {0, 1/(L-1), ..., 1} -> (x (L-1) + u) / L, u ~ U(0, 1): a density on [0, 1) whose
    likelihood bounds the discrete one (Theis, van den Oord, Bethge 2016). L = 256 for 8-bit
    images."""

    def __init__(self, levels: int = 256):
        self.levels = levels

    def __call__(self, x: Tensor) -> Tensor:
        return (x * (self.levels - 1) + torch.rand_like(x)) / self.levels


class GaussianDequantize:
    """x -> clamp(x + std z, 0, 1), z ~ N(0, I) (NCSNv2's small Gaussian noise, kept in [0, 1]
    so that the logit transform stays finite)."""

    def __init__(self, std: float = 0.01):
        self.std = std

    def __call__(self, x: Tensor) -> Tensor:
        return (x + self.std * torch.randn_like(x)).clamp(0.0, 1.0)


def model_space(cfg: ImageDataConfig) -> ModelSpace:
    if cfg.rescaled and cfg.logit_transform:
        raise ValueError("dataset.rescaled and dataset.logit_transform exclude each other; "
                         "set one of them to false")
    return ModelSpace(cfg.rescaled, cfg.logit_transform, cfg.logit_lambda)


def _tensor_steps(cfg: ImageDataConfig, train: bool, levels: int = 256) -> list:
    """Steps on a (C, H, W) tensor in [0, 1]: flip (training split only), dequantize, then map
    to model space. ``levels``: how many values a pixel takes (256 for 8-bit images)."""
    steps = [transforms.RandomHorizontalFlip()] if train and cfg.random_flip else []
    if cfg.uniform_dequantization:
        steps.append(UniformDequantize(levels))
    if cfg.gaussian_dequantization:
        steps.append(GaussianDequantize(cfg.gaussian_dequantization_std))
    return steps + [model_space(cfg)]


def _resize(image_size: int, native: Optional[int] = None,
            crop_size: Optional[int] = None) -> list:
    """PIL steps giving image_size x image_size images: a centre crop of ``crop_size`` (if
    given), a resize of the shorter side, a centre crop to a square. None when the images'
    ``native`` size already is ``image_size``."""
    if native == image_size:
        return []
    crop = [transforms.CenterCrop(crop_size)] if crop_size else []
    return crop + [transforms.Resize(image_size), transforms.CenterCrop(image_size)]


def _pil_transform(cfg: ImageDataConfig, train: bool, pil_steps: list) -> transforms.Compose:
    """PIL image -> ``pil_steps`` -> (C, H, W) tensor in [0, 1] -> :func:`_tensor_steps`."""
    return transforms.Compose([*pil_steps, transforms.ToTensor(), *_tensor_steps(cfg, train)])


# ----------------------------------------------------------------------------- missing data
def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _not_found(title: str, expected: str, where: Path, how: str,
               reason: str = "") -> DatasetNotFoundError:
    """The one-line error: what was looked for, where, and how to provide it."""
    message = f"{title} not found{reason}: looked for {expected} in {where}; {how}"
    return DatasetNotFoundError(message.replace("\n", " "))


def _how_to_download(expected: str, where: Path, origin: str) -> str:
    return (f"download it with dataset.download=true on a machine with internet, "
            f"or place {expected} ({origin}) in {where}")


def _load(make: Callable[[], Dataset], title: str, expected: str, where: Path,
          how: str, download: bool) -> Dataset:
    """Call a torchvision constructor; its "Dataset not found" (or, with ``download``, any
    failure to download: urllib, gdown and torchvision each raise their own kind) becomes
    :class:`DatasetNotFoundError`, chained to the original error."""
    try:
        return make()
    except Exception as error:
        missing = isinstance(error, FileNotFoundError) or (
            isinstance(error, RuntimeError) and "not found" in str(error).lower())
        if not (download or missing):
            raise
        if download:
            reason = f" and its download failed ({_first_line(error)})"
        else:   # torchvision says "not found or corrupted": a file may be partial
            reason = " or incomplete" if isinstance(error, RuntimeError) else ""
        raise _not_found(title, expected, where, how, reason) from error


# ----------------------------------------------------------------------------- datasets
Split = Callable[[bool], Dataset]           # train: bool -> that split


def _splits(cfg: ImageDataConfig, load: Split):
    """(train, test) = (load(True), load(False)); test is None unless ``cfg.load_test``."""
    return load(True), (load(False) if cfg.load_test else None)


def _torchvision_splits(cfg: ImageDataConfig, make: Split, title: str, expected: str,
                        where: Path, origin: str):
    """Both splits from ``make(train)``, a torchvision constructor, with missing files
    reported by :func:`_load`."""
    how = _how_to_download(expected, where, origin)

    def load(train: bool) -> Dataset:
        return _load(lambda: make(train), title, expected, where, how, cfg.download)
    return _splits(cfg, load)


def _cifar10(cfg: ImageDataConfig, root: Path):
    def make(train: bool) -> Dataset:
        transform = _pil_transform(cfg, train, _resize(cfg.image_size, native=32))
        return datasets.CIFAR10(str(root), train=train, transform=transform,
                                download=cfg.download)
    return _torchvision_splits(cfg, make, "CIFAR-10", "cifar-10-batches-py/", root,
                               "extracted from cifar-10-python.tar.gz"), 3


def _mnist_like(class_name: str, title: str, origin: str):
    def build(cfg: ImageDataConfig, root: Path):
        dataset_class = getattr(datasets, class_name)       # torchvision.datasets.MNIST, ...

        def make(train: bool) -> Dataset:
            transform = _pil_transform(cfg, train, _resize(cfg.image_size, native=28))
            return dataset_class(str(root), train=train, transform=transform,
                                 download=cfg.download)
        folder = dataset_class.__name__
        expected = f"{folder}/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte"
        return _torchvision_splits(cfg, make, title, expected, root, origin), 1
    return build


def _svhn(cfg: ImageDataConfig, root: Path):
    where = root / "svhn"

    def make(train: bool) -> Dataset:
        transform = _pil_transform(cfg, train, _resize(cfg.image_size, native=32))
        return datasets.SVHN(str(where), split="train" if train else "test",
                             transform=transform, download=cfg.download)
    return _torchvision_splits(cfg, make, "SVHN", "train_32x32.mat and test_32x32.mat", where,
                               "the cropped-digits files of ufldl.stanford.edu/housenumbers"), 3


def _celeba(cfg: CelebAConfig, root: Path):
    def make(train: bool) -> Dataset:
        steps = _resize(cfg.image_size, crop_size=cfg.crop_size)
        return datasets.CelebA(str(root), split="train" if train else cfg.test_split,
                               transform=_pil_transform(cfg, train, steps),
                               download=cfg.download)
    expected = "celeba/img_align_celeba/ and the five celeba/*.txt annotation files"
    return _torchvision_splits(cfg, make, "CelebA", expected, root,
                               "the aligned images and annotation files of CelebA"), 3


def _require_lmdb() -> None:
    try:
        import lmdb  # noqa: F401
    except ImportError:
        raise ImportError('the LSUN dataset needs the lmdb package: pip install "ncsn[lsun]"') \
            from None


class _Transformed(Dataset):
    """The items ``(image, label)`` of ``dataset`` as ``(transform(image), label)``."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label


# torchvision's LSUN opens its lmdb database when built, and lmdb >= 3 refuses to open one
# that is already open in the process (LMDB forbids it; older bindings let it pass). So each
# database is opened once and shared, untransformed, by every dataset built on it while any
# of them lives: <path of the _lmdb folder> -> datasets.LSUN.
_OPEN_LSUN: "weakref.WeakValueDictionary[str, Dataset]" = weakref.WeakValueDictionary()


def _lsun(cfg: LSUNConfig, root: Path):
    """root/lsun/<category>_{train,val}_lmdb, resized and centre-cropped as in NCSNv2. Note:
    torchvision's LSUN caches each database's keys in a ``_cache_*`` file in the working
    directory."""
    _require_lmdb()
    if cfg.category not in LSUN_CATEGORIES:
        raise ValueError(f"unknown LSUN category {cfg.category!r}; choose one of "
                         f"{list(LSUN_CATEGORIES)}")
    where = root / "lsun"

    def load(train: bool) -> Dataset:
        split = f"{cfg.category}_{'train' if train else 'val'}"
        # The database is the file data.mdb: an empty or half-unzipped folder would otherwise
        # fail in lmdb.open with "No such file or directory" and no hint.
        if not (where / f"{split}_lmdb" / "data.mdb").is_file():
            reason = " (torchvision cannot download LSUN)" if cfg.download else ""
            how = (f"download {split}_lmdb.zip with the LSUN tools (github.com/fyu/lsun: "
                   f"download.py -c {cfg.category}) and unzip it in {where}")
            raise _not_found("LSUN", f"{split}_lmdb/data.mdb", where, how, reason)
        key = str(where / f"{split}_lmdb")
        database = _OPEN_LSUN.get(key)
        if database is None:
            database = _OPEN_LSUN[key] = datasets.LSUN(str(where), classes=[split])
        return _Transformed(database, _pil_transform(cfg, train, _resize(cfg.image_size)))
    return _splits(cfg, load), 3


def _split_indices(n: int, test_fraction: float, seed: int,
                   validation_fraction: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded random permutation of range(n) cut into (train, test, validation) indices:
    the test part holds its first round(n * test_fraction), the validation part the next
    round(n * validation_fraction), so the test split does not move with the validation one."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"dataset.test_fraction must lie in [0, 1), got {test_fraction}")
    if not 0.0 <= validation_fraction < 1.0 - test_fraction:
        raise ValueError(f"dataset.validation_fraction must lie in [0, 1 - test_fraction) = "
                         f"[0, {1.0 - test_fraction:g}), got {validation_fraction}")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_validation = round(n * test_fraction), round(n * validation_fraction)
    return (permutation[n_test + n_validation:], permutation[:n_test],
            permutation[n_test:n_test + n_validation])


def _flat_image_folder_class() -> type:
    """torchvision's ImageFolder over the images in ``root`` (and, as ImageFolder walks a
    class folder, in its subfolders) without class subfolders: one class, label 0. Made at
    first use (torchvision's import is slow) and kept as the module's ``FlatImageFolder``,
    so that a DataLoader worker can unpickle it by name."""
    if "FlatImageFolder" not in globals():
        class FlatImageFolder(datasets.ImageFolder):
            __doc__ = _flat_image_folder_class.__doc__

            def find_classes(self, directory):
                return [""], {"": 0}                    # the class folder root/"" is root
        FlatImageFolder.__module__, FlatImageFolder.__qualname__ = __name__, "FlatImageFolder"
        globals()["FlatImageFolder"] = FlatImageFolder
    return globals()["FlatImageFolder"]


def __getattr__(name: str):
    if name == "FlatImageFolder":
        return _flat_image_folder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def image_folder_paths(cfg: ImageFolderConfig, root: Optional[Path] = None
                       ) -> tuple[Path, Optional[Path]]:
    """(training folder, test folder or None) of an image_folder config: ``root`` itself,
    or root/path when ``path`` is given; ``test_path`` is taken as ``path`` would be, under
    root when ``path`` is given, else against the working directory as ``root`` is."""
    root = root if root is not None else Path(cfg.root).expanduser().resolve()
    train = root if cfg.path is None else root / Path(cfg.path).expanduser()
    if cfg.test_path is None:
        return train, None
    base = Path.cwd() if cfg.path is None else root
    return train, (base / Path(cfg.test_path).expanduser()).resolve()


def _scan(where: Path) -> tuple[list[str], int]:
    """(names of the subfolders, number of image files) directly in ``where``."""
    how = (f"put the images in it ({where}/0001.png) or in class subfolders "
           f"({where}/<class>/0001.png), or point dataset.root at such a folder")
    try:
        entries = list(os.scandir(where))
    except (FileNotFoundError, NotADirectoryError) as error:
        raise _not_found("image folder", "images or class subfolders of images", where,
                         how) from error
    folders = sorted(e.name for e in entries if e.is_dir())
    extensions = _folder.IMG_EXTENSIONS
    n_images = sum(e.is_file() and _folder.has_file_allowed_extension(e.name, extensions)
                   for e in entries)
    if not folders and not n_images:
        raise _not_found("image folder", "images or class subfolders of images", where, how,
                         f" (no file ending in {', '.join(_folder.IMG_EXTENSIONS)})")
    if folders and n_images:
        raise DatasetNotFoundError(
            f"image folder {where} holds both images ({n_images}) and subfolders "
            f"({_some(folders)}): the images must all lie in it or all in class subfolders; "
            f"move them, or point dataset.path at one subfolder")
    return folders, n_images


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def image_folder(where: Path) -> datasets.ImageFolder:
    """The images in ``where``, untransformed (items: (PIL image, class index)): class
    subfolders ``where/<class>/.../<image>`` as torchvision's ImageFolder reads them, or the
    images directly in ``where`` (one class). A missing or empty folder, a class folder
    without images, and images beside subfolders raise :class:`DatasetNotFoundError`, one
    line naming the folder."""
    folders, _ = _scan(where)
    if not folders:
        images = _flat_image_folder_class()(str(where))
        log.info("image folder %s: flat folder, %d images", where, len(images))
        return images
    images = datasets.ImageFolder(str(where), allow_empty=True)
    found = set(images.targets)
    empty = [c for i, c in enumerate(images.classes) if i not in found]
    if empty:
        raise DatasetNotFoundError(
            f"image folder class {empty[0]!r} has no images: {where / empty[0]} holds no file "
            f"ending in {', '.join(_folder.IMG_EXTENSIONS)}"
            + (f" (nor do {len(empty) - 1} other class folders: {_some(empty[1:])})"
               if len(empty) > 1 else "")
            + "; add images to it or remove it")
    log.info("image folder %s: %d images, %d classes (%s)", where, len(images),
             len(images.classes), _some(images.classes))
    return images


def _image_folder(cfg: ImageFolderConfig, root: Path):
    if cfg.channels not in (1, 3):
        raise ValueError(f"dataset.channels must be 1 or 3, got {cfg.channels}")
    grey = [transforms.Grayscale(1)] if cfg.channels == 1 else []
    steps = grey + _resize(cfg.image_size, crop_size=cfg.crop_size)

    def split(images: Dataset, train: bool) -> Dataset:
        return _Transformed(images, _pil_transform(cfg, train, steps))

    where, test_where = image_folder_paths(cfg, root)
    images = image_folder(where)
    if test_where is not None:
        test = split(image_folder(test_where), False) if cfg.load_test else None
        return (split(images, True), test), cfg.channels
    train_idx, test_idx, _ = _split_indices(len(images), cfg.test_fraction, cfg.split_seed)
    test = None
    if cfg.load_test and len(test_idx) > 0:
        test = Subset(split(images, False), test_idx.tolist())
    return (Subset(split(images, True), train_idx.tolist()), test), cfg.channels


class TensorImageDataset(Dataset):
    """Images held in memory, (N, C, H, W) in [0, 1], with labels (N,). An item is
    ``(transform(image), label)``: a (C, H', W') tensor and an int."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor]):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def _digits(cfg: DigitsConfig, root: Path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)   # (1797, 1, 8, 8)
    labels = torch.from_numpy(digits.target)
    resize = [] if cfg.image_size == 8 else [transforms.Resize(cfg.image_size, antialias=True)]

    def split(indices: Tensor, train: bool) -> Dataset:
        # Pixels take 17 values, 0..16: uniform dequantization spreads each over 1/17.
        transform = transforms.Compose(resize + _tensor_steps(cfg, train, levels=17))
        return TensorImageDataset(images[indices], labels[indices], transform)

    train_idx, test_idx, validation_idx = _split_indices(
        len(images), cfg.test_fraction, cfg.split_seed, cfg.validation_fraction)
    # With a validation split, it is the held-out split (model selection never sees the test).
    held_out_idx = validation_idx if cfg.validation_fraction > 0 else test_idx
    held_out = split(held_out_idx, False) if cfg.load_test and len(held_out_idx) > 0 else None
    return (split(train_idx, True), held_out), 1


# ----------------------------------------------------------------------------- on the device
NATIVE_SIZES = {"cifar10": 32, "svhn": 32, "mnist": 28, "fashion_mnist": 28, "digits": 8}


def _uint8_pixels(name: str, train: Dataset) -> Optional[Tensor]:
    """The training split's pixels as (N, C, H, W) uint8, read from the dataset object."""
    if name == "cifar10":
        return torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()    # (N, H, W, C)
    if name == "svhn":
        return torch.from_numpy(train.data)                                     # (N, C, H, W)
    if name in ("mnist", "fashion_mnist"):
        return train.data.unsqueeze(1)                                          # (N, H, W)
    if name == "digits":
        return train.images.mul(16).round().to(torch.uint8)                     # k / 16
    return None


def raw_images(cfg: ImageDataConfig, train: Dataset):
    """The training split as :class:`ncsn.data.device.RawImages` for batching on the
    device: the datasets that fit in memory, at their native size (a resize stays on the
    per-item path); None for the others."""
    if NATIVE_SIZES.get(cfg.name) != cfg.image_size:
        return None
    pixels = _uint8_pixels(cfg.name, train)
    return RawImages(pixels, levels=pixel_levels(cfg.name),
                     random_flip=cfg.random_flip,
                     uniform_dequantization=cfg.uniform_dequantization,
                     gaussian_dequantization=cfg.gaussian_dequantization,
                     gaussian_std=cfg.gaussian_dequantization_std, space=model_space(cfg))


# name -> builder(cfg, root) returning ((train, test or None), channels)
_BUILDERS = {
    "cifar10": _cifar10,
    "mnist": _mnist_like("MNIST", "MNIST", "gunzipped from yann.lecun.com/exdb/mnist"),
    "fashion_mnist": _mnist_like("FashionMNIST", "Fashion-MNIST",
                                 "gunzipped from github.com/zalandoresearch/fashion-mnist"),
    "svhn": _svhn,
    "celeba": _celeba,
    "lsun": _lsun,
    "image_folder": _image_folder,
    "digits": _digits,
}


def build_image_data(cfg) -> "Data":
    """The image dataset named by ``cfg.name`` (a config dataclass of :data:`IMAGE_DATASETS`,
    a DictConfig or a dict; see :func:`image_config`).

    Returns a ``Data`` with kind "images", shape (C, image_size, image_size), train and test
    splits whose items are (image, label) with the image a (C, H, W) tensor in model space,
    and ``to_data_space`` mapping model space back to [0, 1]. Raises
    :class:`DatasetNotFoundError` when the files are missing and cannot be downloaded.
    """
    from ncsn.data import Data          # here: ncsn.data may import this module

    cfg = image_config(cfg)
    space = model_space(cfg)
    root = Path(cfg.root).expanduser().resolve()
    (train, test), channels = _BUILDERS[cfg.name](cfg, root)
    return Data(train, test, shape=(channels, cfg.image_size, cfg.image_size), kind="images",
                to_data_space=space.inverse, raw_train=raw_images(cfg, train))


__all__ = ["DatasetNotFoundError", "IMAGE_DATASETS", "ImageDataConfig", "CIFAR10Config",
           "MNISTConfig", "FashionMNISTConfig", "SVHNConfig", "CelebAConfig", "LSUNConfig",
           "ImageFolderConfig", "DigitsConfig", "image_config", "build_image_data",
           "image_folder", "image_folder_paths",
           "ModelSpace", "likelihood_levels", "off_grid", "logit_transform", "inverse_logit_transform", "UniformDequantize",
           "GaussianDequantize", "TensorImageDataset", "LSUN_CATEGORIES"]

"""Samples on disk, read back a batch at a time: an ``.npz`` with an array ``samples``, a
folder of ``.npz`` shards, or a folder of images."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ncsn.registry import ConfigError

# The extensions pytorch-fid reads from a folder (its IMAGE_EXTENSIONS), so a folder scored
# there is scored here from the same files.
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


class SampleFiles:
    """Samples on disk: an ``.npz`` with an array ``samples``, a folder of ``.npz`` shards
    (``shards/*.npz`` as ncsn-sample writes them, or ``*.npz``), or a folder of images
    (``images/*.png`` as ncsn-sample writes them, or ``*.png``; the subfolders come first,
    so ncsn-sample's output folder, with its ``samples.png`` grid, reads right).

    Arrays may be images -- uint8 (N, H, W, C) as ncsn-sample writes them, or float in [0, 1]
    as (N, C, H, W) or (N, H, W, C) -- or points (N, d). ``batches`` reads them a batch at a
    time (a large ``.npz`` is streamed from its zip member) as float (B, C, H, W) in [0, 1]
    or float (B, d).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise FileNotFoundError(f"samples not found: {self.path} (give an .npz file with an "
                                    f"array 'samples', or a folder of .npz shards or PNG images)")
        self.shards, self.images = self._find()
        if self.shards:
            headers = [_npy_header(p) for p in self.shards]
            self._length = sum(shape[0] for shape, _ in headers)
            self.shape = _sample_shape(headers[0][0], headers[0][1], self.shards[0])
        else:
            self._length = len(self.images)
            self.shape = _read_image(self.images[0]).permute(2, 0, 1).shape

    def _find(self) -> tuple[list[Path], list[Path]]:
        if self.path.is_file():
            if self.path.suffix != ".npz":
                raise ConfigError(f"samples={self.path}: expected an .npz file or a folder")
            return [self.path], []
        for folder in (self.path / "shards", self.path):
            shards = sorted(folder.glob("*.npz"))
            if shards:
                return shards, []
        for folder in (self.path / "images", self.path):
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
                if folder.is_dir() else []
            if images:
                return [], images
        raise FileNotFoundError(f"no samples in {self.path}: expected shards/*.npz or *.npz "
                                f"(array 'samples'), or images/ or the folder itself holding "
                                f"{', '.join('*' + s for s in IMAGE_SUFFIXES)} files")

    def __len__(self) -> int:
        return self._length

    @property
    def kind(self) -> str:
        return "images" if len(self.shape) == 3 else "points"

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        if self.shards:
            for shard in self.shards:
                for chunk in _npz_chunks(shard, batch_size):
                    yield _as_samples(chunk, shard)
            return
        for start in range(0, len(self.images), batch_size):
            files = self.images[start:start + batch_size]
            try:
                pixels = torch.stack([_read_image(p) for p in files])      # (B, H, W, C)
            except RuntimeError:
                raise ConfigError(f"the images in {self.path} differ in size or channels; "
                                  f"FID needs one size") from None
            yield pixels.permute(0, 3, 1, 2).float() / 255


def _read_image(path: Path) -> Tensor:
    """An image file -> uint8 (H, W, C), C = 1 for greyscale and 3 otherwise."""
    with Image.open(path) as image:
        image = image if image.mode == "L" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(image))
    return pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array ``samples`` in an .npz, read from its header only."""
    try:
        with zipfile.ZipFile(path) as archive, _open_member(archive, path) as f:
            shape, _, dtype = _read_header(f)
    except (zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(f"cannot read {path} as an .npz file: {err}") from None
    return shape, dtype


def _open_member(archive: zipfile.ZipFile, path: Path):
    if "samples.npy" not in archive.namelist():
        names = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise ConfigError(f"{path} holds arrays {names}; a samples file needs an array "
                          f"'samples'")
    return archive.open("samples.npy")


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    reader = {(1, 0): np.lib.format.read_array_header_1_0}.get(
        version, np.lib.format.read_array_header_2_0)
    return reader(f)


def _npz_chunks(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """The array ``samples`` of an .npz, ``batch_size`` rows at a time, read from the zip
    member as a stream (compressed or not), so a 50,000-image file is never loaded whole."""
    with zipfile.ZipFile(path) as archive, _open_member(archive, path) as f:
        shape, fortran_order, dtype = _read_header(f)
        if dtype.hasobject:
            raise ConfigError(f"{path}: 'samples' holds Python objects; save numbers")
        if fortran_order:                                   # rare: read it whole
            array = np.load(path)["samples"]
            yield from (array[i:i + batch_size] for i in range(0, len(array), batch_size))
            return
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        for start in range(0, shape[0], batch_size):
            rows = min(batch_size, shape[0] - start)
            yield np.frombuffer(f.read(rows * row_bytes), dtype).reshape(rows, *shape[1:])


def _image_layout(shape: Sequence[int], dtype: np.dtype) -> str:
    """NCHW or NHWC for a 4-d array: uint8 arrays with 1 or 3 trailing channels are NHWC
    (what ncsn-sample writes), otherwise 1 or 3 leading channels mean NCHW."""
    if shape[-1] in (1, 3) and (dtype == np.uint8 or shape[1] not in (1, 3)):
        return "NHWC"
    if shape[1] in (1, 3):
        return "NCHW"
    raise ConfigError(f"cannot tell the channels of image samples of shape {tuple(shape)}: "
                      f"expected (N, H, W, C) or (N, C, H, W) with C = 1 or 3")


def _sample_shape(shape: Sequence[int], dtype: np.dtype, path: Path) -> tuple[int, ...]:
    """The shape of one sample: (C, H, W) for images, (d,) for points."""
    if len(shape) == 2:
        return (shape[1],)
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if len(shape) == 4:
        return tuple(shape[1:]) if _image_layout(shape, dtype) == "NCHW" else \
            (shape[3], shape[1], shape[2])
    raise ConfigError(f"{path}: 'samples' has shape {tuple(shape)}; expected points (N, d) or "
                      f"images (N, H, W), (N, H, W, C), (N, C, H, W)")


def _as_samples(chunk: np.ndarray, path: Path) -> Tensor:
    """An array chunk -> float (B, C, H, W) in [0, 1] or float (B, d)."""
    x = torch.from_numpy(chunk.astype(chunk.dtype.newbyteorder("=")))  # native, writable
    if x.ndim == 2:
        return x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif _image_layout(x.shape, chunk.dtype) == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float() / 255
    x = x.float()
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ConfigError(f"{path}: float image samples must lie in [0, 1], found values in "
                          f"[{lo:.3g}, {hi:.3g}] (map [-1, 1] images with (x + 1) / 2)")
    return x.clamp(0, 1)

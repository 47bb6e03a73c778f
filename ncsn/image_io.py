"""Image files: samples streamed to disk, image files read in, pictures and animations.

Samples on disk (what ``ncsn-sample`` writes, what an FID needs):

    OUT/images/000000.png, 000001.png, ...        one PNG per image
    OUT/shards/samples_00000.npz, ...             one shard per batch: array ``samples``,
                                                  uint8 (N, H, W, C), the PNGs' pixels

Both hold 8-bit pixels (x * 255 rounded, x clamped to [0, 1]); ncsn-eval reads either
(``ncsn.evaluate.files.SampleFiles``). Pictures (grids, GIFs, strips) of images smaller
than 32 pixels are enlarged by pixel repetition, so that an 8x8 digit is visible.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ncsn import viz
from ncsn.sampling import quiet

SAVE_AS = ("npz", "png", "both", "none")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PICTURE_MIN_SIDE = 32


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) floats in [0, 1] (clamped) -> (B, H, W, C) uint8, rounded as
    torchvision's save_image rounds."""
    pixels = images.detach().clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()


def _pil(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a greyscale (C = 1) or RGB PIL image."""
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


# ----------------------------------------------------------------------------- streams
class SampleWriter:
    """Write batches of data-space images ``(B, C, H, W)`` in [0, 1] as they come: PNG files
    under ``out/images`` and/or one ``.npz`` shard per batch under ``out/shards``
    (``save_as``: npz | png | both | none). Nothing is kept but a counter."""

    def __init__(self, out: str | Path, save_as: str = "npz", n_total: int | None = None):
        if save_as not in SAVE_AS:
            raise ValueError(f"save_as must be one of {', '.join(SAVE_AS)}, got {save_as!r}")
        self.out, self.save_as = Path(out), save_as
        self.digits = max(6, len(str(max(0, (n_total or 0) - 1))))
        self.count, self.n_shards = 0, 0
        if save_as in ("png", "both"):
            (self.out / "images").mkdir(parents=True, exist_ok=True)
        if save_as in ("npz", "both"):
            (self.out / "shards").mkdir(parents=True, exist_ok=True)

    def write(self, images: Tensor) -> None:
        pixels = to_uint8(images).numpy()                                  # (B, H, W, C)
        if self.save_as in ("png", "both"):
            for j, image in enumerate(pixels):
                _pil(image).save(self.out / "images" / f"{self.count + j:0{self.digits}d}.png")
        if self.save_as in ("npz", "both"):
            np.savez(self.out / "shards" / f"samples_{self.n_shards:05d}.npz", samples=pixels)
            self.n_shards += 1
        self.count += len(pixels)


def write_stream(batches: Iterable[Tensor], out: str | Path, save_as: str = "npz",
                 n_total: int | None = None, keep: int = 64, progress: bool = True) -> Tensor:
    """Write every batch of ``batches`` (data-space ``(B, C, H, W)`` in [0, 1]) with a
    :class:`SampleWriter`, with a progress bar over images (``n_total`` of them, if known).

    Memory holds one batch and the first ``keep`` images, which are returned (for a grid).
    """
    writer = SampleWriter(out, save_as, n_total)
    kept: list[Tensor] = []
    n_kept = 0
    with tqdm(total=n_total, desc="samples", unit="img", disable=quiet(progress)) as bar:
        for images in batches:
            if n_kept < keep:
                kept.append(images[:keep - n_kept].cpu().clone())   # not a view of the batch
                n_kept += len(kept[-1])
            writer.write(images)
            bar.update(len(images))
    return torch.cat(kept) if kept else torch.empty(0)


# ----------------------------------------------------------------------------- image files
def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders expanded to the image
    files they hold (sorted)."""
    files: list[Path] = []
    for path in map(lambda p: Path(p).expanduser(), paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    if not files:
        raise FileNotFoundError(f"no image files in {', '.join(map(str, paths))} "
                                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_images(paths: Sequence[str | Path], channels: int, image_size: int) -> Tensor:
    """Image files (or folders of them) as ``(N, channels, image_size, image_size)`` in
    [0, 1]: converted to greyscale or RGB, the shorter side resized to ``image_size``, then
    centre-cropped to a square."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"images with {channels} channels cannot be read from files")
    from torchvision import transforms          # here: torchvision is slow to import

    prepare = transforms.Compose([transforms.Resize(image_size),
                                  transforms.CenterCrop(image_size), transforms.ToTensor()])
    return torch.stack([prepare(Image.open(p).convert(mode)) for p in image_files(paths)])


# ----------------------------------------------------------------------------- pictures
def enlarge(images: Tensor, min_side: int = PICTURE_MIN_SIDE) -> Tensor:
    """Repeat pixels (nearest neighbour) by the smallest integer factor that makes the
    images' height at least ``min_side``; ``(..., H, W)`` of any dtype."""
    factor = math.ceil(min_side / images.shape[-2])
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def save_picture(images: Tensor, path: str | Path, nrow: int | None = None) -> None:
    """A grid of data-space images ``(B, C, H, W)`` (clamped to [0, 1]) saved as PNG with
    torchvision, small images enlarged."""
    viz.save_grid(enlarge(images.float()), path, nrow=nrow)


def _frame(images: Tensor, nrow: int) -> np.ndarray:
    """uint8 images ``(B, C, H, W)`` -> one enlarged grid ``(H', W', C)`` uint8."""
    from torchvision.utils import make_grid

    grid = make_grid(enlarge(images), nrow=nrow, padding=viz.GRID_PADDING,
                     pad_value=round(255 * viz.GRID_PAD_VALUE))          # (3, H', W')
    grid = grid[:1] if images.shape[1] == 1 else grid
    return grid.permute(1, 2, 0).numpy()


def save_gif(frames: Sequence[Tensor], path: str | Path, duration_ms: int = 80,
             hold_last_ms: int = 1000) -> None:
    """An animated GIF, one frame per uint8 batch ``(B, C, H, W)`` of ``frames`` (each
    shown as a grid), looping, the last frame held ``hold_last_ms``."""
    nrow = max(1, int(math.sqrt(len(frames[0]))))
    pictures = [_pil(_frame(f, nrow)) for f in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=durations,
                     loop=0, optimize=False, disposal=1)


def save_strip(frames: Sequence[Tensor], path: str | Path, n_chains: int = 8,
               n_columns: int = 10) -> None:
    """A PNG with one row per chain (the first ``n_chains``) and ``n_columns`` frames of
    the record (evenly spaced, first and last included) from left to right."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(n_columns, len(frames))).round())
    columns = torch.stack([frames[int(i)][:n_chains] for i in picks], dim=1)   # (N, T, C, H, W)
    images = columns.reshape(-1, *columns.shape[2:])
    Image.fromarray(_frame(images, nrow=len(picks)).squeeze(-1)).save(path)

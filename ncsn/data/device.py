"""Image datasets held on the training device as 8-bit pixels, batched there.

CIFAR-10, SVHN, MNIST, Fashion-MNIST and the digits fit in any device's memory as uint8
(150 MB for CIFAR-10). Instead of a DataLoader that decodes, flips and dequantizes one image
at a time, :func:`device_batches` indexes the pixels on the device and transforms this
rank's rows of each global batch there. Each image's flip and dequantization noise come
from its own generator (:func:`ncsn.data.order.item_seed`), drawn in the order of the
per-item transforms, so this path and the DataLoader's give the same batches for the same
seed, and any world size gives the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ncsn.data.space import ModelSpace
from ncsn.data.order import global_batch_indices, item_generator, item_seed


@dataclass
class RawImages:
    """A training split as 8-bit pixels and the per-item steps that turn them into inputs."""

    pixels: Tensor                   # (N, C, H, W) uint8; the value k stands for k / (levels - 1)
    levels: int                      # values a pixel takes: 256, or 17 for the digits
    random_flip: bool
    uniform_dequantization: bool
    gaussian_dequantization: bool
    gaussian_std: float
    space: ModelSpace


def _item_noise(raw: RawImages, seeds: list[int], shape: torch.Size
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's random draws from its own generator, in the order of its transforms: a
    flip draw rand(1) < 0.5 (RandomHorizontalFlip), then rand(C, H, W) (UniformDequantize),
    then randn(C, H, W) (GaussianDequantize). Returns (flip (B,) bool, uniform (B, C, H, W),
    normal (B, C, H, W)); the unused ones empty."""
    flips, uniforms, normals = [], [], []
    for seed in seeds:
        g = item_generator(seed)
        if raw.random_flip:
            flips.append(torch.rand(1, generator=g) < 0.5)
        if raw.uniform_dequantization:
            uniforms.append(torch.rand(shape, generator=g))
        if raw.gaussian_dequantization:
            normals.append(torch.randn(shape, generator=g))
    empty = torch.empty(0)
    return (torch.cat(flips) if flips else empty, torch.stack(uniforms) if uniforms else empty,
            torch.stack(normals) if normals else empty)


def transform_batch(raw: RawImages, pixels: Tensor, seeds: list[int]) -> Tensor:
    """(B, C, H, W) uint8 on the device -> model inputs: [0, 1], flip, dequantize, model space,
    each step the per-item transform's formula applied to the whole batch; ``seeds``: each
    image's (:func:`ncsn.data.order.item_seed`)."""
    device = pixels.device
    x = pixels.float().div(raw.levels - 1)                           # ToTensor: k / 255
    flip, uniform, normal = (t.to(device, non_blocking=True)
                             for t in _item_noise(raw, seeds, x.shape[1:]))
    if raw.random_flip:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if raw.uniform_dequantization:
        x = (x * (raw.levels - 1) + uniform) / raw.levels
    if raw.gaussian_dequantization:
        x = (x + raw.gaussian_std * normal).clamp(0.0, 1.0)
    return raw.space(x)


def device_batches(raw: RawImages, batch_size: int, seed: int, device: torch.device | str,
                   start_batch: int = 0, rows: slice | None = None) -> Iterator[Tensor]:
    """This rank's ``rows`` (all by default) of every global batch of ``batch_size`` from
    step ``start_batch`` on, (rows, C, H, W) on ``device``: the global order of
    :func:`ncsn.data.order.global_batch_indices`, full batches only."""
    pixels = raw.pixels.to(device)
    rows = rows if rows is not None else slice(0, batch_size)
    step = start_batch
    while True:
        indices = global_batch_indices(len(pixels), batch_size, seed, step)[rows]
        seeds = [item_seed(seed, step, j, batch_size) for j in range(rows.start, rows.stop)]
        yield transform_batch(raw, pixels[indices.to(device)], seeds)
        step += 1


__all__ = ["RawImages", "device_batches", "transform_batch"]

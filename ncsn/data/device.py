"""Image datasets held on the training device as 8-bit pixels, batched there.

CIFAR-10, SVHN, MNIST, Fashion-MNIST and the digits fit in any device's memory as uint8
(150 MB for CIFAR-10). Instead of a DataLoader that decodes, flips and dequantizes one image
at a time, :func:`device_batches` indexes the pixels on the device and transforms whole
batches there. It draws every random number from the same generators, in the same order,
as ``infinite_batches`` over the per-item transforms (without workers): the permutation of
each epoch from the run's data generator, each image's flip and dequantization noise from
torch's global generator. So both paths give the same batches for the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ncsn.data.images import ModelSpace


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


def _item_noise(raw: RawImages, batch: int, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's random draws in the order of its transforms: a flip draw rand(1) <
    0.5 (RandomHorizontalFlip), then rand(C, H, W) (UniformDequantize), then randn(C, H, W)
    (GaussianDequantize). Returns (flip (B,) bool, uniform (B, C, H, W), normal (B, C, H, W));
    the unused ones empty. One call when no normal draw is needed: the CPU generator fills
    a tensor element by element, so rand(B, 1 + CHW) is B calls rand(1), rand(C, H, W)."""
    empty = torch.empty(0)
    if not raw.gaussian_dequantization:
        u = torch.rand(batch, int(raw.random_flip) + (shape.numel() if
                                                        raw.uniform_dequantization else 0))
        flip = u[:, 0] < 0.5 if raw.random_flip else empty
        uniform = u[:, int(raw.random_flip):].view(batch, *shape) \
            if raw.uniform_dequantization else empty
        return flip, uniform, empty
    flips, uniforms, normals = [], [], []
    for _ in range(batch):                    # randn fills blocks of 16: draw image by image
        if raw.random_flip:
            flips.append(torch.rand(1) < 0.5)
        if raw.uniform_dequantization:
            uniforms.append(torch.rand(shape))
        normals.append(torch.randn(shape))
    flip = torch.cat(flips) if flips else empty
    return flip, torch.stack(uniforms) if uniforms else empty, torch.stack(normals)


def transform_batch(raw: RawImages, pixels: Tensor) -> Tensor:
    """(B, C, H, W) uint8 on the device -> model inputs: [0, 1], flip, dequantize, model space,
    each step the per-item transform's formula applied to the whole batch."""
    device = pixels.device
    x = pixels.float().div(raw.levels - 1)                           # ToTensor: k / 255
    flip, uniform, normal = (t.to(device, non_blocking=True)
                             for t in _item_noise(raw, len(x), x.shape[1:]))
    if raw.random_flip:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if raw.uniform_dequantization:
        x = (x * (raw.levels - 1) + uniform) / raw.levels
    if raw.gaussian_dequantization:
        x = (x + raw.gaussian_std * normal).clamp(0.0, 1.0)
    return raw.space(x)


def device_batches(raw: RawImages, batch_size: int, generator: torch.Generator,
                   device: torch.device | str, start_batch: int = 0) -> Iterator[Tensor]:
    """Training batches forever, (B, C, H, W) on ``device``: a random permutation per epoch
    from ``generator``, full batches only. ``generator`` is freshly seeded; a run resumed
    after ``start_batch`` batches replays the permutations and continues mid-epoch
    (``ncsn.data.replay_epochs``)."""
    from ncsn.data import replay_epochs
    pixels = raw.pixels.to(device)
    n = len(pixels)
    offset = replay_epochs(n, batch_size, generator, start_batch)
    while True:
        # A DataLoader draws its workers' base seed from the global generator at every epoch;
        # drawn here too, so that the flips and the noise stay in step with it (a resumed
        # epoch drew it before the checkpoint that restored the global generator).
        if offset == 0:
            torch.empty((), dtype=torch.int64).random_()
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(offset * batch_size, n - batch_size + 1, batch_size):
            yield transform_batch(raw, pixels[order[start:start + batch_size]])
        offset = 0
        # RandomSampler draws a second permutation for the remainder of n samples, n % n = 0.
        torch.randperm(n, generator=generator)


__all__ = ["RawImages", "device_batches", "transform_batch"]

"""The order of the training data and the seeds of its random transforms, as functions of
the run's seed alone.

A data-parallel run splits every global batch over its ranks (rank r holds rows
``distributed.shard(B)`` of it). For N ranks to train as one process, and for a checkpoint
to resume under another world size, what a row holds must not depend on who reads it:

- the epoch's order is a permutation drawn from a generator seeded with (seed, epoch), so
  every rank knows the global batch of any step without reading a single image;
- the random transforms of an image (a flip, the dequantization noise) draw from a
  generator seeded with (seed, its position in the whole run: step x B + row), so the image
  at row j of step k is flipped and dequantized alike whichever rank, DataLoader worker or
  path (per-item transforms or whole batches on the device) produces it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

# Streams kept apart: an epoch's order, an image's transforms.
_ORDER, _ITEM = 0, 1


def derived_seed(*keys: int) -> int:
    """A 63-bit seed for torch's generators that depends on every key (numpy's SeedSequence
    hashes them: nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


@lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order (n,) in which epoch ``epoch`` visits a training split of ``n`` samples."""
    generator = torch.Generator().manual_seed(derived_seed(seed, _ORDER, epoch))
    return torch.randperm(n, generator=generator)


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The dataset indices (B,) of step ``step``'s global batch (steps count from 0): full
    batches of each epoch's permutation, the remainder of an epoch left out."""
    epoch, k = divmod(step, n // batch_size)
    return epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def item_seed(seed: int, step: int, row: int, batch_size: int) -> int:
    """The seed of the random transforms of the image at row ``row`` of step ``step``'s
    global batch of ``batch_size``."""
    return derived_seed(seed, _ITEM, step * batch_size + row)


def item_generator(seed: int) -> torch.Generator:
    """A CPU generator for one image's random transforms."""
    return torch.Generator().manual_seed(seed)


__all__ = ["derived_seed", "epoch_permutation", "global_batch_indices", "item_seed",
           "item_generator"]

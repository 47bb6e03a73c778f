"""Datasets: what the training loop and the samplers see.

A :class:`Data` bundles the train and test splits with the shape of one sample and the map
from the model's space back to data space (identity for 2-D points; the inverse of
rescaling or the logit transform for images, back to [0, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset
from omegaconf import DictConfig, OmegaConf

from ncsn.data.toy import GaussianMixture, make_toy


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class Data:
    train: Dataset                       # items: a tensor x, or (x, label)
    test: Dataset | None
    shape: tuple[int, ...]               # one sample, e.g. (2,) or (3, 32, 32)
    kind: str = "points"                 # points | images
    to_data_space: Callable[[Tensor], Tensor] = field(default=_identity)
    raw_train: Any = None                # ncsn.data.device.RawImages: the training split as
                                         # uint8 pixels, when it fits on the device


def first_tensor(item) -> Tensor:
    """A dataset item is a tensor or a tuple whose first element is the tensor."""
    return item[0] if isinstance(item, (tuple, list)) else item


def replay_epochs(n: int, batch_size: int, generator: torch.Generator, start_batch: int) -> int:
    """Bring a freshly seeded ``generator`` to where an epoch-wise sampler stood after
    ``start_batch`` full batches of ``n`` samples, and return how many batches of the
    current epoch were already drawn.

    Each finished epoch drew two permutations from ``generator`` (RandomSampler's, and its
    draw for the n % n = 0 remaining samples); the current one has drawn its first
    permutation only if it has begun (the caller draws it again). A run resumed at any step
    thus sees the batches, in order, that the run that never stopped saw.
    """
    epochs, offset = divmod(start_batch, n // batch_size)
    for _ in range(2 * epochs):
        torch.randperm(n, generator=generator)
    return offset


class _ResumedRandomSampler(RandomSampler):
    """RandomSampler whose first epoch starts ``skip`` samples into its permutation."""

    def __init__(self, data_source, generator: torch.Generator, skip: int):
        super().__init__(data_source, generator=generator)
        self.skip = skip

    def __iter__(self):
        order = super().__iter__()
        for _ in range(self.skip):            # the permutation is drawn; skip what was used
            next(order)
        self.skip = 0
        yield from order


def infinite_batches(dataset: Dataset, batch_size: int, generator: torch.Generator,
                     num_workers: int = 0, start_batch: int = 0) -> Iterator[Tensor]:
    """Random training batches forever, drawn with ``generator``.

    An in-memory ``TensorDataset`` is indexed directly (fast for 2-D data): each batch draws
    from ``generator``, whose state is checkpointed, so a resumed run continues with it.
    Any other dataset goes through a DataLoader with a random sampler that draws a
    permutation per epoch: there ``generator`` must be freshly seeded, and a run resumed
    after ``start_batch`` batches replays the permutations (not the images) to continue
    mid-epoch where it stopped. The per-image random draws (flips, dequantization) come from
    torch's global generator, which the checkpoint restores; with ``num_workers`` > 0 they
    come from the workers' seeds instead and a resumed epoch differs in them.
    """
    if isinstance(dataset, TensorDataset):
        tensor = dataset.tensors[0]
        while True:
            yield tensor[torch.randint(len(tensor), (batch_size,), generator=generator)]
    offset = replay_epochs(len(dataset), batch_size, generator, start_batch)
    sampler = _ResumedRandomSampler(dataset, generator, skip=offset * batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers > 0 else None)
    epoch = iter(loader) if offset == 0 else _without_global_draws(lambda: iter(loader))
    while True:
        yield from (first_tensor(batch) for batch in epoch)
        epoch = iter(loader)


def _without_global_draws(make):
    """``make()`` with torch's global generator left as it was: a DataLoader draws its
    workers' base seed from it when an epoch begins, which a resumed epoch already did."""
    state = torch.get_rng_state()
    try:
        return make()
    finally:
        torch.set_rng_state(state)


def training_batches(data: Data, batch_size: int, generator: torch.Generator,
                     device: torch.device | str = "cpu", num_workers: int = 0,
                     on_device: bool = True, seed: int | None = None,
                     start_batch: int = 0) -> Iterator[Tensor]:
    """The training loop's global batches: drawn on ``device`` from the uint8 pixels when the
    dataset keeps them (``data.raw_train``) and ``on_device``, else by
    :func:`infinite_batches` (DataLoader workers, pinned memory, prefetching). Both give the
    same batches for the same seed (the loader without workers).

    ``generator`` is the run's data generator as checkpointed; ``start_batch`` the batches
    already drawn (the resumed step). The epoch-wise paths (images) reseed it with ``seed``
    and replay the epochs' permutations, so a resumed run continues mid-epoch exactly.
    """
    if len(data.train) < batch_size:
        raise ValueError(f"trainer.batch_size={batch_size} is larger than the training split "
                         f"({len(data.train)} samples): full batches never come; lower it")
    if not isinstance(data.train, TensorDataset) and seed is not None:
        generator.manual_seed(seed)
    if on_device and data.raw_train is not None:
        from ncsn.data.device import device_batches
        return device_batches(data.raw_train, batch_size, generator, device, start_batch)
    return infinite_batches(data.train, batch_size, generator, num_workers=num_workers,
                            start_batch=start_batch)


def build_toy_data(cfg) -> Data:
    """A 2-D toy dataset from its config (``ncsn.config.ToyDataConfig`` and subclasses)."""
    common = {"name", "n_samples", "n_test", "seed"}
    values = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    params = {k: v for k, v in values.items() if k not in common}
    train = make_toy(cfg.name, cfg.n_samples, seed=cfg.seed, **params)
    test = make_toy(cfg.name, cfg.n_test, seed=cfg.seed + 1, **params)
    return Data(TensorDataset(train), TensorDataset(test), shape=tuple(train.shape[1:]))


__all__ = ["Data", "GaussianMixture", "make_toy", "infinite_batches", "build_toy_data",
           "first_tensor", "training_batches"]

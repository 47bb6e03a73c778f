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


def infinite_batches(dataset: Dataset, batch_size: int, generator: torch.Generator,
                     num_workers: int = 0) -> Iterator[Tensor]:
    """Random training batches forever, drawn with ``generator`` (its state is checkpointed,
    so a resumed run sees the same batches).

    An in-memory ``TensorDataset`` is indexed directly (fast for 2-D data); any other
    dataset goes through a DataLoader with a seeded random sampler.
    """
    if isinstance(dataset, TensorDataset):
        tensor = dataset.tensors[0]
        while True:
            yield tensor[torch.randint(len(tensor), (batch_size,), generator=generator)]
    sampler = RandomSampler(dataset, generator=generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers > 0 else None)
    while True:
        for batch in loader:
            yield first_tensor(batch)


def training_batches(data: Data, batch_size: int, generator: torch.Generator,
                     device: torch.device | str = "cpu", num_workers: int = 0,
                     on_device: bool = True) -> Iterator[Tensor]:
    """The training loop's global batches: drawn on ``device`` from the uint8 pixels when the
    dataset keeps them (``data.raw_train``) and ``on_device``, else by
    :func:`infinite_batches` (DataLoader workers, pinned memory, prefetching). Both give the
    same batches for the same seed (the loader without workers)."""
    if len(data.train) < batch_size:
        raise ValueError(f"trainer.batch_size={batch_size} is larger than the training split "
                         f"({len(data.train)} samples): full batches never come; lower it")
    if on_device and data.raw_train is not None:
        from ncsn.data.device import device_batches
        return device_batches(data.raw_train, batch_size, generator, device)
    return infinite_batches(data.train, batch_size, generator, num_workers=num_workers)


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

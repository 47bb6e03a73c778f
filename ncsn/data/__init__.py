"""Datasets: what the training loop and the samplers see.

A :class:`Data` bundles the train and test splits with the shape of one sample and the map
from the model's space back to data space (identity for 2-D points; the inverse of
rescaling or the logit transform for images, back to [0, 1]).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from omegaconf import DictConfig, OmegaConf

from ncsn.data.order import global_batch_indices, item_seed
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


class _SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)``: the item's random transforms (torchvision's
    flips, the dequantization noise) draw from torch's CPU generator seeded with ``seed``
    and leave it as it was, in the main process and in DataLoader workers alike."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)        # the CPU generator only, not CUDA's
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


class _RankRows(Sampler):
    """A batch sampler of this rank's rows of every global batch from step ``start`` on:
    lists of ``(dataset index, item seed)``, forever (see :mod:`ncsn.data.order`)."""

    def __init__(self, n: int, batch_size: int, seed: int, rows: slice, start: int = 0):
        self.n, self.batch_size, self.seed, self.rows, self.start = n, batch_size, seed, rows, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            indices = global_batch_indices(self.n, self.batch_size, self.seed, step)
            yield [(int(indices[j]), item_seed(self.seed, step, j, self.batch_size))
                   for j in range(self.rows.start, self.rows.stop)]
            step += 1


def usable_workers(requested: int) -> int:
    """DataLoader workers for ``requested``: at most the CPUs this process may run on (its
    affinity: what SLURM's --cpus-per-task or taskset leave it), since more workers than
    CPUs only contend with each other and with the training step."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(requested, cpus or 1))


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores the stop signals (Ctrl-C, SIGTERM, SLURM's SIGUSR1/2):
    sent to the whole process group (a terminal's Ctrl-C, ``timeout``, a scheduler), they
    would kill the workers before the trainer checkpoints, and the trainer would fail on
    its lost workers instead. The trainer stops them itself when it exits."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def infinite_batches(dataset: Dataset, batch_size: int, generator: torch.Generator,
                     num_workers: int = 0, start_batch: int = 0, seed: int | None = None,
                     rows: slice | None = None) -> Iterator[Tensor]:
    """This process's ``rows`` (all by default) of random global training batches of
    ``batch_size``, forever.

    An in-memory ``TensorDataset`` (2-D points) is indexed directly: each global batch
    draws its indices with ``generator``, whose state is checkpointed, and keeps ``rows``.
    Any other dataset goes through a DataLoader that reads, decodes and transforms only
    ``rows`` of each global batch, in ``num_workers`` workers of this process (at most its
    CPUs: :func:`usable_workers`; they leave the stop signals to the trainer): the global
    order and each image's random transforms are functions of ``seed`` (by default
    ``generator``'s initial seed), the step and the row (:mod:`ncsn.data.order`), so a run
    resumed at step ``start_batch`` continues mid-epoch exactly, under any world size.
    """
    rows = rows if rows is not None else slice(0, batch_size)
    if isinstance(dataset, TensorDataset):
        tensor = dataset.tensors[0]
        while True:
            yield tensor[torch.randint(len(tensor), (batch_size,), generator=generator)[rows]]
    seed = generator.initial_seed() if seed is None else seed
    num_workers = usable_workers(num_workers)
    loader = DataLoader(_SeededItems(dataset),
                        batch_sampler=_RankRows(len(dataset), batch_size, seed, rows, start_batch),
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if num_workers > 0 else None,
                        # The workers' base seed from a generator of the loader's own: torch's
                        # global one is the objectives' (the same on every rank).
                        generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=_leave_stop_signals_to_the_trainer)
    yield from (first_tensor(batch) for batch in loader)


def training_batches(data: Data, batch_size: int, generator: torch.Generator,
                     device: torch.device | str = "cpu", num_workers: int = 0,
                     on_device: bool = True, seed: int | None = None,
                     start_batch: int = 0, rows: slice | None = None) -> Iterator[Tensor]:
    """The training loop's batches: this rank's ``rows`` (all by default) of every global
    batch of ``batch_size``. Drawn on ``device`` from the uint8 pixels when the dataset keeps
    them (``data.raw_train``) and ``on_device``, else by :func:`infinite_batches`
    (DataLoader workers, pinned memory, prefetching). Both give the same batches for the
    same seed.

    ``generator`` is the run's data generator as checkpointed (2-D points draw from it);
    images follow ``seed`` (default: ``generator``'s initial seed); ``start_batch`` is the
    number of steps already taken (the resumed step).
    """
    if len(data.train) < batch_size:
        from ncsn.parts import ConfigError

        raise ConfigError(f"trainer.batch_size={batch_size} is larger than the training split "
                          f"({len(data.train)} samples): full batches never come; use "
                          f"trainer.batch_size={_largest_power_of_two(len(data.train))} or "
                          f"less, or more data")
    seed = generator.initial_seed() if seed is None else seed
    if on_device and data.raw_train is not None:
        from ncsn.data.device import device_batches
        return device_batches(data.raw_train, batch_size, seed, device, start_batch, rows)
    return infinite_batches(data.train, batch_size, generator, num_workers=num_workers,
                            start_batch=start_batch, seed=seed, rows=rows)


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


def _largest_power_of_two(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)

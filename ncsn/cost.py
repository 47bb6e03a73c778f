"""What sampling will cost, known before it starts: the network evaluations (NFE) that the
sampler's schedule fixes (:func:`ncsn.registry.planned_nfe`) times the seconds one of them
takes, timed on the network itself."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from ncsn import registry


def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def seconds_per_evaluation(net: nn.Module, x: Tensor, sigma: Tensor | None = None,
                           autocast: Callable[[], ContextManager] = nullcontext) -> float:
    """Wall time of one ``net(x, sigma)`` on ``x``'s device, under ``autocast()``: the second
    of two calls (the first pays for warm-up)."""
    for _ in range(2):
        synchronize(x.device)
        start = time.perf_counter()
        with autocast():
            net(x, sigma)
        synchronize(x.device)
    return time.perf_counter() - start


def duration(seconds: float) -> str:
    """A time for the log: "0.52 s", "95 s", "14 min", "3.2 h"."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def sampling_cost(sampler, n_samples: int, batch_size: int, n_ranks: int = 1) -> str:
    """One line saying what drawing ``n_samples`` from ``sampler`` (a
    :class:`ncsn.generate.CheckpointSampler`) in batches of ``batch_size`` will cost: the
    network evaluations per sample and in all, and a time, from timing one evaluation of
    its network on a batch and taking ``n_ranks`` ranks to share the batches."""
    batch = min(batch_size, n_samples)
    x = torch.zeros(batch, *sampler.shape, device=sampler.device)
    sigma = sampler.sigmas[-1:].expand(batch) if sampler.model_cfg is None or \
        registry.is_conditional(sampler.model_cfg) else None
    seconds = seconds_per_evaluation(sampler.net, x, sigma)
    rounds = math.ceil(math.ceil(n_samples / batch) / n_ranks)     # batches a rank draws
    over = f" over {n_ranks} ranks" if n_ranks > 1 else ""
    head = f"sampling {n_samples:,} samples with {sampler.sampler_cfg.name}"
    nfe = registry.planned_nfe(sampler.sampler_cfg, len(sampler.sigmas))
    if nfe is None:
        return (f"{head}: the solver picks the number of network evaluations (no estimate); "
                f"one on a batch of {batch} takes {duration(seconds)} here")
    return (f"{head}: NFE {nfe} per sample, {nfe * n_samples:,} in all; one network "
            f"evaluation on a batch of {batch} takes {duration(seconds)} here, so about "
            f"{duration(nfe * rounds * seconds)}{over} (n_samples, batch_size and the "
            f"sampler's settings set this)")

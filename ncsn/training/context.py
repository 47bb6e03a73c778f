"""Contexts a step or an evaluation runs in: evaluation mode, autocast, a random stream
of its own, and waiting for the device."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ncsn.training.run import Run


@contextmanager
def evaluating(net: nn.Module):
    """``net`` in evaluation mode inside the block, back in training mode after: batch
    statistics (a batch-normalised flow) and dropout are training's alone."""
    net.eval()
    try:
        yield net
    finally:
        net.train()


@contextmanager
def isolated_rng(device: torch.device):
    """Evaluation and pictures draw random numbers without disturbing training's stream,
    so a run's weights do not depend on how often it draws pictures."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def autocast(run: Run):
    dtype = run.speed.amp_dtype
    return torch.autocast(run.device.type, dtype=dtype) if dtype is not None else nullcontext()

"""One optimisation step: loss, backward in micro-batches, clip, Adam, EMA."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ncsn import losses
from ncsn.training.context import autocast
from ncsn.training.ema import update_ema
from ncsn.training.rng import rng_state, set_rng_state
from ncsn.training.schedule import learning_rate

if TYPE_CHECKING:
    from ncsn.training.run import Run


@dataclass
class StepStats:
    """One step's numbers, left on the training device (reading them would wait for it)."""

    loss: Tensor                 # () the batch mean
    per_sample: Tensor           # (B,)
    labels: Tensor | None        # (B,) the noise level of each sample; None: not annealed
    grad_norm: Tensor            # () before clipping
    lr: float


def _grad_norm(run: Run) -> Tensor:
    """The total gradient norm, clipped to optim.grad_clip when set; stays on the device."""
    params = [p for p in run.net.parameters() if p.grad is not None]
    if run.cfg.optim.grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, run.cfg.optim.grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def train_step(run: Run, x: Tensor, rows: slice | None = None,
               global_batch: int | None = None) -> StepStats:
    """One optimisation step on batch ``x`` (B, ...), rows ``rows`` (default: all) of a global
    batch of ``global_batch`` (default: ``len(x)``) when the other rows are other processes':
    loss (under autocast for bf16/fp16), backward (scaled for fp16) in trainer.accumulate
    micro-batches, clip, Adam, EMA.

    Nothing here waits for the device: the loss, the per-level losses, the gradient norm and
    the finiteness check accumulate in ``run.monitor``, read every ``log_every`` steps and
    before every checkpoint (:func:`check_finite`), so a non-finite loss never reaches one.
    """
    t = run.cfg.trainer
    lr = learning_rate(run.step, run.cfg.optim, t.n_steps, t.batch_size)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.speed.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    run.optimizer.zero_grad(set_to_none=True)
    if run.dropout is not None:
        run.dropout.start_step(run.step)
    per_sample, labels = _backward(run, x, rows or slice(0, len(x)), global_batch or len(x))
    loss = per_sample.mean()
    scaler = run.speed.scaler
    scaler.unscale_(run.optimizer)
    grad_norm = _grad_norm(run)
    scaler.step(run.optimizer)            # fp16: skips a step with infinite gradients
    scaler.update()
    if run.ema is not None:
        update_ema(run)
    run.step += 1
    stats = StepStats(loss.detach(), per_sample, labels, grad_norm.detach(), lr)
    run.monitor.record(run.step, stats, check_grad=not scaler.is_enabled())
    return stats


def _backward(run: Run, x: Tensor, rows: slice, global_batch: int) -> tuple[Tensor, Tensor | None]:
    """Gradients of the mean loss over ``x`` in trainer.accumulate micro-batches; returns the
    per-sample losses (B,) and noise levels (B,) or None.

    Each micro-batch draws its rows of the objective's draws for the global batch
    (``ncsn.losses.batch_shard``), from the random state the step began with (set back
    before each), and adds sum / len(x) of its losses to the gradients: the step equals one
    pass over the whole batch. Under DDP, the gradients are averaged over the processes
    once, with the last micro-batch (``no_sync`` before it).
    """
    k = run.cfg.trainer.accumulate
    size = len(x) // k
    start_state = rng_state(run.device) if k > 1 else None
    parts, part_labels = [], []
    for m in range(k):
        if m > 0:
            set_rng_state(run.device, start_state)
        part = slice(m * size, (m + 1) * size)
        part_rows = slice(rows.start + part.start, rows.start + part.stop)
        last = m == k - 1
        sync = nullcontext() if last or not isinstance(run.net, DistributedDataParallel) \
            else run.net.no_sync()
        with sync:
            with losses.batch_shard(part_rows, global_batch), autocast(run):
                per_sample, labels = run.objective(run.net, x[part])
            per_sample = per_sample.float()
            run.speed.scaler.scale(per_sample.sum() / len(x)).backward()
        parts.append(per_sample.detach())
        part_labels.append(labels)
    labels = torch.cat(part_labels) if part_labels[0] is not None else None
    return torch.cat(parts), labels

"""What the steps leave on the device between two reads, and the check that every
loss and gradient norm was finite."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ncsn.training.run import Run
    from ncsn.training.step import StepStats


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the message names the step and sigma."""


class StepMonitor:
    """What the steps leave on the device between two reads: the loss sums (overall and per
    noise level), the last gradient norm, and the first step whose loss or gradient norm was
    not finite, with its loss, gradient norm and noise levels. Recording never waits for the
    device; :meth:`check` reads one number."""

    def __init__(self, n_levels: int, device: torch.device):
        self.n_levels, self.device = n_levels, device
        zero = torch.zeros((), device=device)
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=device)   # 0: none yet
        self.bad_loss, self.bad_grad_norm = zero.clone(), zero.clone()
        self.bad_levels = torch.zeros(n_levels, dtype=torch.bool, device=device)
        self.reset()

    def reset(self) -> None:
        """Start new sums (after a read); the record of the first non-finite step stays."""
        self.count = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.level_sum = torch.zeros(self.n_levels, dtype=torch.float64, device=self.device)
        self.level_count = torch.zeros(self.n_levels, dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)

    def record(self, step: int, stats: "StepStats", check_grad: bool = True) -> None:
        """Add step ``step``'s loss; if it is the first non-finite one, keep what it was.
        ``check_grad=False`` (fp16): the gradient scaler skips steps with infinite gradients."""
        self.count += 1
        self.loss_sum += stats.loss.double()
        self.grad_norm = stats.grad_norm
        finite = torch.isfinite(stats.per_sample)                       # (B,)
        ok = finite.all() & torch.isfinite(stats.grad_norm) if check_grad else finite.all()
        first = ~ok & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.bad_loss = torch.where(first, stats.loss, self.bad_loss)
        self.bad_grad_norm = torch.where(first, stats.grad_norm, self.bad_grad_norm)
        if stats.labels is not None:
            per_sample = stats.per_sample.double()
            self.level_sum.index_add_(0, stats.labels, per_sample)
            self.level_count.index_add_(0, stats.labels, torch.ones_like(per_sample))
            bad_now = torch.zeros(self.n_levels, device=self.device).index_add_(
                0, stats.labels, (~finite).float()) > 0
            self.bad_levels = torch.where(first, bad_now, self.bad_levels)

    def check(self, run: "Run") -> None:
        """Raise :class:`NonFiniteLossError` if any step since the start was not finite."""
        step = int(self.first_bad_step)
        if step == 0:
            return
        loss, grad_norm = float(self.bad_loss), float(self.bad_grad_norm)
        where = ""
        bad = self.bad_levels.nonzero().flatten().cpu()
        if len(bad) > 0:
            sigmas = [float(s) for s in run.sigmas[bad]]
            where = " at sigma " + ", ".join(f"{s:.4g}" for s in sigmas[:5])
            where += " ..." if len(sigmas) > 5 else ""
        every = run.cfg.trainer.log_every
        found = (f"(found at step {run.step}: the loss is checked every trainer.log_every="
                 f"{every} steps and before every checkpoint)")
        last_good = run.run_dir / "checkpoints" / "last.pt"
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss} at step {step}{where} {found}; the last good checkpoint "
                f"is {last_good}; try a lower optim.lr or optim.grad_clip=1.0")
        raise NonFiniteLossError(
            f"gradient norm became {grad_norm} at step {step} (loss {loss:.4g}) {found}; the "
            f"last good checkpoint is {last_good}; try optim.grad_clip=1.0 or a lower optim.lr")


def check_finite(run: Run) -> None:
    """Raise :class:`NonFiniteLossError` (step, sigma, last good checkpoint) if a step's loss
    or gradient norm was not finite; called before every checkpoint and log read."""
    run.monitor.check(run)

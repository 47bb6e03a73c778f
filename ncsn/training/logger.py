"""Progress: TensorBoard scalars, and a log line every trainer.log_every steps when no
bar is shown."""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from ncsn import registry
from ncsn.cost import duration
from ncsn.data.images import image_config, likelihood_levels
from ncsn.training.monitor import check_finite

if TYPE_CHECKING:
    from ncsn.training.run import Run
    from ncsn.training.step import StepStats


log = logging.getLogger(__name__)


class TrainLogger:
    """TensorBoard scalars every ``log_every`` steps: loss, loss per noise level, gradient
    norm, learning rate, steps per second, read from ``run.monitor`` (the only reads of the
    device in the loop, with the finiteness check before them)."""

    MAX_LEVEL_CURVES = 16

    def __init__(self, run: Run):
        self.run, self.every = run, max(1, run.cfg.trainer.log_every)
        self.writer = run.writer
        n = len(run.sigmas)
        self.levels = sorted({round(i * (n - 1) / max(1, min(n, self.MAX_LEVEL_CURVES) - 1))
                              for i in range(min(n, self.MAX_LEVEL_CURVES))})
        self.last_loss = math.nan            # the mean loss of the last read, for the bar
        # Without a bar (stderr a file: SLURM, nohup, | tee) each read is also a log line.
        self.lines = False
        self.unit = loss_unit(run)
        self.t0 = time.perf_counter()

    def update(self, stats: StepStats) -> None:
        if self.run.step % self.every == 0:
            self.flush(stats)

    def flush(self, stats: StepStats) -> None:
        check_finite(self.run)
        step, w, monitor = self.run.step, self.writer, self.run.monitor
        count = max(1, monitor.count)
        self.last_loss = float(monitor.loss_sum) / count
        w.add_scalar("train/loss", self.last_loss, step)
        w.add_scalar("train/grad_norm", float(monitor.grad_norm), step)
        w.add_scalar("train/lr", stats.lr, step)
        steps_per_sec = count / (time.perf_counter() - self.t0)
        w.add_scalar("train/steps_per_sec", steps_per_sec, step)
        if self.lines:
            self.log_line(stats.lr, steps_per_sec)
        level_sum, level_count = monitor.level_sum.cpu(), monitor.level_count.cpu()
        for i in self.levels:
            if level_count[i] > 0:
                w.add_scalar(f"loss_per_sigma/{i:04d}_sigma_{float(self.run.sigmas[i]):.3g}",
                             level_sum[i] / level_count[i], step)
        monitor.reset()
        self.t0 = time.perf_counter()

    def log_line(self, lr: float, steps_per_sec: float) -> None:
        """One line of progress, what the bar would show: the step, the mean loss since the
        last line, the speed (steps/s, and images or samples per second over the global
        batch), lr, time left."""
        t = self.run.cfg.trainer
        left = (t.n_steps - self.run.step) / max(steps_per_sec, 1e-9)
        per = "img/s" if self.run.data.kind == "images" else "samples/s"
        log.info("step %d/%d: loss %.5g%s, %.3g steps/s, %.0f %s, lr %.3g, %s left",
                 self.run.step, t.n_steps, self.last_loss, self.unit, steps_per_sec,
                 steps_per_sec * t.batch_size, per, lr, duration(left))


def nll_unit(dataset_cfg) -> str:
    """The unit of a flow's negative log-likelihood (see registry's loss=nll): bits/dim of
    uniformly dequantized images on their pixel grid, nats of the model's input otherwise
    (points; images a flow trains on by score matching without such dequantization)."""
    if dataset_cfg.name not in registry.IMAGE_DATASETS:
        return " nats"
    return " bits/dim" if likelihood_levels(image_config(dataset_cfg)) else " nats"


def loss_unit(run: Run) -> str:
    """The training loss's unit for the log: a likelihood's (loss=nll), else none (score
    matching's losses are squared score errors with no common unit)."""
    return nll_unit(run.cfg.dataset) if run.cfg.loss.name == "nll" else ""

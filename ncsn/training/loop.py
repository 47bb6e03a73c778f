"""The training loop: :func:`train` resumes or starts a run, then steps, logs, checkpoints
and draws pictures until trainer.n_steps, a stop signal or a non-finite loss."""
from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ncsn import distributed
from ncsn.checkpoint import best_held_out_loss
from ncsn.data import training_batches
from ncsn.training.logger import TrainLogger
from ncsn.training.pictures import report
from ncsn.training.run import build_run, describe, initialize_from_data
from ncsn.training.signals import TrainingInterrupted, stop, stop_on_signals
from ncsn.training.state import load_state, resume, save, why_fresh
from ncsn.training.step import train_step

if TYPE_CHECKING:
    from ncsn.training.run import Run


log = logging.getLogger(__name__)


class _NoWriter:
    """What ranks other than 0 hold instead of a SummaryWriter: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def train(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Train from ``cfg`` into ``run_dir``; returns the path of the final checkpoint.

    Raises :class:`TrainingInterrupted` after checkpointing on a stop signal (SIGINT,
    SIGTERM, SIGUSR1, SIGUSR2) and :class:`NonFiniteLossError` (leaving the last good
    checkpoint untouched) on a NaN loss.

    Under torch.distributed (see ``ncsn.distributed``) every rank calls this with the same
    ``cfg`` and ``run_dir``; each trains on its shard of every global batch and rank 0 alone
    writes (config, logs, TensorBoard, pictures, checkpoints).
    """
    run_dir = Path(run_dir)
    if not distributed.is_main():
        logging.getLogger("ncsn").setLevel(logging.WARNING)     # one log for the whole run
    ckpt, source = resume(cfg, run_dir)
    if ckpt is not None and ckpt["step"] >= cfg.trainer.n_steps:
        # Started again after it finished (resume=auto, a requeued job): say so rather than
        # save and report its end a second time.
        log.info("%s is at step %d of trainer.n_steps=%d: the run is complete, nothing to "
                 "train (raise trainer.n_steps to train on)", source, ckpt["step"],
                 cfg.trainer.n_steps)
        return source
    run = build_run(cfg, run_dir, sigmas=ckpt["sigmas"] if ckpt else None)
    if ckpt is not None:
        load_state(run, ckpt)
        log.info("resumed %s at step %d", source, run.step)
        if cfg.trainer.keep_best and distributed.is_main():
            run.best_loss = best_held_out_loss(run_dir / "checkpoints")
    else:
        log.info("started fresh at step 0: %s", why_fresh(cfg, run_dir))
    describe(run)
    run.writer = SummaryWriter(str(run_dir / "tb")) if distributed.is_main() else _NoWriter()
    try:
        return _loop(run)
    except TrainingInterrupted:
        raise
    except Exception as err:
        failure = distributed.first_failure(err)   # a peer's failure, when that is what it was
        if failure is err:
            raise
        raise failure from err
    finally:
        run.writer.close()


def _loop(run: Run) -> Path:
    t = run.cfg.trainer
    logger = TrainLogger(run)
    # This rank's rows of every global batch: it reads, decodes and transforms only those;
    # the objectives draw their labels and noise for the global batch and keep the same rows
    # (ncsn.losses.batch_shard).
    rows = distributed.shard(t.batch_size)
    batches = training_batches(run.data, t.batch_size, run.data_generator, run.device,
                               num_workers=run.cfg.dataset.get("num_workers", 0),
                               on_device=t.data_on_device, seed=run.cfg.seed,
                               start_batch=run.step, rows=rows)
    bar = tqdm(total=t.n_steps, initial=run.step, desc="train", dynamic_ncols=True,
               disable=not (t.progress and sys.stderr.isatty() and distributed.is_main()))
    logger.lines = bar.disable
    # On a terminal, log lines go through tqdm.write, above the bar instead of onto it.
    redirect = nullcontext() if bar.disable else logging_redirect_tqdm(tqdm_class=tqdm)
    vote = distributed.StopVote()
    path = None
    with stop_on_signals(run) as previous_handlers, bar, redirect:
        while run.step < t.n_steps:
            x = next(batches).to(run.device, non_blocking=True)
            if run.step == 0:
                initialize_from_data(run, x)
            stats = train_step(run, x, rows, t.batch_size)
            logger.update(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{logger.last_loss:.4g}", refresh=False)
            signum = vote(run.stop_signal)
            if signum:
                raise stop(run, signum, previous_handlers.get(signum))
            if run.step % t.ckpt_every == 0 or run.step == t.n_steps:
                path = save(run)
            if t.sample_every > 0 and run.step % t.sample_every == 0 and run.step != t.n_steps:
                report(run)
    vote.close()
    path = path or save(run)
    report(run)
    log.info("done: %d steps; final checkpoint %s", run.step, path.parent / "last.pt")
    return path.parent / "last.pt"

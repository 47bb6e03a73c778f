"""Stop signals: checkpoint after the current step, then hand the signal on."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ncsn import distributed
from ncsn.training.state import save

if TYPE_CHECKING:
    from ncsn.training.run import Run


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 arrived; a checkpoint was written before stopping."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint saved to {path}")


# SIGTERM: a preemption (SLURM, Kubernetes, torchrun stopping its workers); SIGUSR1 / SIGUSR2:
# the warning SLURM sends before the time limit (sbatch --signal; submitit asks for USR2).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextmanager
def stop_on_signals(run: Run):
    """The stop signals ask the loop to checkpoint and stop after the current step; a second
    SIGINT interrupts at once. Yields the handlers found before (submitit's, which requeue
    the job), to be called once the checkpoint is written."""
    def request_stop(signum, frame):
        run.stop_signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = {s: signal.signal(s, request_stop) for s in STOP_SIGNALS}
    try:
        yield previous
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop(run: Run, signum: int, previous_handler) -> TrainingInterrupted:
    """Checkpoint, wait until every rank is here (the file is complete before any process
    exits), let rank 0 alone hand the signal to the handler that was there before ours
    (submitit's requeues the job and exits), and say why the run stopped.

    The other ranks wait until rank 0 is done with that handler, whatever it does: under
    ``SLURM_KILL_BAD_EXIT=1`` a rank that exits first, with its non-zero status, makes srun
    kill rank 0 in the middle of its ``scontrol requeue``, and the job never comes back.
    """
    path = save(run)
    distributed.barrier()
    try:
        if (distributed.is_main() and callable(previous_handler)
                and previous_handler is not signal.default_int_handler):
            previous_handler(signum, None)
    finally:
        distributed.barrier()
    return TrainingInterrupted(signum, run.step, path)

"""Training: ``train(cfg, run_dir)`` runs a whole training job from a composed config (see
``ncsn.config.TrainConfig``); the CLI ``ncsn-train`` is a thin wrapper around it.

One file for each part of a training job:

- ``loop``: :func:`train` and the loop itself
- ``run``: what a run holds (:class:`Run`) and how it is built from the config
- ``step``: one optimisation step (loss, backward in micro-batches, clip, Adam, EMA)
- ``speed``: precision, CPU threads, channels-last, fused Adam, torch.compile
- ``ema``, ``schedule``: the weights' moving average, the learning rate
- ``monitor``: the step's numbers left on the device, and the finiteness check
- ``state``: the run as a checkpoint, and which checkpoint it resumes from
- ``logger``: TensorBoard scalars and the progress lines
- ``held_out``: the held-out loss and best.pt
- ``sampling_cost``: what drawing the pictures' samples will cost (``ncsn.cost``), logged
  before it starts, and how many fit in the process group's timeout
- ``pictures``: samples drawn during training and their pictures
- ``signals``: stop signals (Ctrl-C, preemption): checkpoint, then stop
- ``rng``, ``context``: random state, evaluation mode, autocast
"""
from ncsn.cost import synchronize
from ncsn.training.context import autocast, evaluating
from ncsn.training.ema import build_ema, plain_ema_state, update_ema
from ncsn.training.held_out import test_loss
from ncsn.training.logger import loss_unit, nll_unit
from ncsn.training.loop import train
from ncsn.training.monitor import NonFiniteLossError, check_finite
from ncsn.training.pictures import draw_samples, draw_shared, report
from ncsn.training.run import Run, build_run, initialize_from_data, resolve_device
from ncsn.training.sampling_cost import (log_sampling_cost, network_evaluations,
                                         samples_within_timeout, seconds_per_evaluation)
from ncsn.training.schedule import learning_rate
from ncsn.training.signals import TrainingInterrupted
from ncsn.training.speed import auto_num_threads, resolve_precision, step_flops
from ncsn.training.state import load_state, save, state_dict
from ncsn.training.step import train_step

__all__ = [
    "Run", "NonFiniteLossError", "TrainingInterrupted", "autocast", "auto_num_threads",
    "build_ema", "build_run", "check_finite", "draw_samples", "draw_shared", "evaluating",
    "initialize_from_data", "learning_rate", "load_state", "log_sampling_cost", "loss_unit",
    "network_evaluations", "nll_unit", "plain_ema_state", "report", "resolve_device",
    "resolve_precision", "samples_within_timeout", "save", "seconds_per_evaluation",
    "state_dict", "step_flops", "synchronize", "test_loss", "train", "train_step", "update_ema",
]

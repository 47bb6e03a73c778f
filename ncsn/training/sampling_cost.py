"""What drawing samples will cost, logged before it starts, and how many fit within the
process group's timeout."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ncsn import cost, distributed, registry
from ncsn.cost import duration
from ncsn.training.context import autocast, evaluating

if TYPE_CHECKING:
    from ncsn.training.run import Run


log = logging.getLogger(__name__)


def network_evaluations(sampler_cfg, n_levels: int) -> int | None:
    """Network evaluations (NFE) of one chain (:func:`ncsn.registry.planned_nfe`; None for
    the ODE sampler, whose solver picks its steps)."""
    return registry.planned_nfe(sampler_cfg, n_levels)


def seconds_per_evaluation(run: Run, n: int) -> float:
    """Wall time of one evaluation of the sampling network on a batch of ``n``, under the
    run's autocast (:func:`ncsn.cost.seconds_per_evaluation`)."""
    x = torch.zeros(n, *run.data.shape, device=run.device)
    sigma = run.sigmas[-1:].to(run.device).expand(n) if registry.is_conditional(
        run.cfg.model) else None
    with evaluating(run.sampling_net) as net:
        return cost.seconds_per_evaluation(net, x, sigma, lambda: autocast(run))


def log_sampling_cost(run: Run, n: int) -> float | None:
    """Log what drawing ``n`` samples in one batch will cost before it starts: the
    sampler's network evaluations and a time estimate from timing one of them, returned in
    seconds (None for the ODE sampler, whose solver picks its steps)."""
    nfe = network_evaluations(run.cfg.sampler, len(run.sigmas))
    if nfe is None:
        log.info("step %d: sampling %d samples with %s: the solver picks the number of "
                 "network evaluations", run.step, n, run.cfg.sampler.name)
        return None
    seconds = seconds_per_evaluation(run, n)
    log.info("step %d: sampling %d samples with %s: %d network evaluations of a batch of %d; "
             "one takes %.3g s, so about %s (trainer.n_plot_samples and the sampler's "
             "settings set this)", run.step, n, run.cfg.sampler.name, nfe, n, seconds,
             duration(nfe * seconds))
    return nfe * seconds


def samples_within_timeout(run: Run, n: int) -> int:
    """How many of ``n`` picture samples to draw: all of them in one process. Over N ranks,
    where each draws about n / N of them and the others wait for the slowest in the
    gather, rank 0 times its share and shrinks it (to none: no pictures) until it takes
    at most half of the process group's timeout, with a warning; the ranks agree on its
    answer. Half: a rank twice as slow as rank 0 still keeps the others' wait within it."""
    if not distributed.is_distributed():
        log_sampling_cost(run, n)
        return n
    fitted = _fit_share(run, n) if distributed.is_main() else None
    return distributed.broadcast_object(fitted)


def _fit_share(run: Run, n: int) -> int:
    world, limit = distributed.world_size(), distributed.TIMEOUT.total_seconds() / 2
    share = len(distributed.rank_share(n))
    seconds = log_sampling_cost(run, share)
    estimate = seconds
    while share > 0 and estimate is not None and estimate > limit:
        share = min(share - 1, int(share * limit / estimate))
        estimate = log_sampling_cost(run, share) if share > 0 else 0.0
    fitted = min(n, share * world)
    if fitted < n:
        log.warning("step %d: drawing %d picture samples would take about %s on each of %d "
                    "ranks, more than half the process group's timeout (%s); drawing %d "
                    "instead. Lower trainer.n_plot_samples or the sampler's steps, or raise "
                    "NCSN_DIST_TIMEOUT_MIN", run.step, n, duration(seconds), world,
                    duration(2 * limit), fitted)
    return fitted

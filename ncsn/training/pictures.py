"""Samples drawn during training (split over the ranks) and the pictures made of them."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ncsn import distributed, registry, viz
from ncsn.image_io import enlarge
from ncsn.sampling import per_sample_noise
from ncsn.training.context import autocast, evaluating, isolated_rng
from ncsn.training.held_out import held_out_name, keep_if_best, test_loss
from ncsn.training.logger import nll_unit
from ncsn.training.sampling_cost import samples_within_timeout

if TYPE_CHECKING:
    from ncsn.training.run import Run


log = logging.getLogger(__name__)


def draw_samples(run: Run, n: int, return_trajectory: bool = False, seed: int = 0,
                 progress: bool = False, indices: range | None = None):
    """Samples ``indices`` (default: all) of ``n`` with the sampling (EMA) weights, from the
    configured sampler, the network under the run's autocast (its output back in the
    chain's dtype): ``(B, *shape)`` model space, with ``return_trajectory`` also
    ``(K, B, *shape)``. Sample i is drawn from its own generator, seeded from ``seed`` and
    i (EDM's ``--seeds``), so a rank drawing some of them gets one process's samples."""
    indices = range(n) if indices is None else indices
    net = run.sampling_net

    def score(y: Tensor, sigma: Tensor | None) -> Tensor:
        with autocast(run):
            return net(y, sigma).to(y.dtype)
    with evaluating(net), per_sample_noise(seed, indices, run.device):
        x = registry.initial_samples(run.cfg.sampler, len(indices), run.data.shape,
                                     run.sigmas, run.device)
        return run.sampler(score, x, return_trajectory=return_trajectory, progress=progress)


def draw_shared(run: Run, n: int, return_trajectory: bool = False, progress: bool = False):
    """:func:`draw_samples` of ``n`` split over the ranks
    (:func:`ncsn.distributed.rank_share`); rank 0 gathers every rank's share and returns one
    process's result on the CPU, the other ranks return None."""
    mine = distributed.rank_share(n)
    out = None
    if len(mine) > 0:
        out = draw_samples(run, n, return_trajectory, progress=progress and distributed.is_main(),
                           indices=mine)
        out = tuple(t.cpu() for t in out) if return_trajectory else out.cpu()
    parts = distributed.gather_to_main(out)
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    if not return_trajectory:
        return torch.cat(parts)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1)


def report(run: Run) -> None:
    """Held-out loss (``best.pt`` kept when it is the lowest, with trainer.keep_best) and
    pictures (2-D: score field, samples over data, trajectories; images: a grid of
    samples), saved under ``pictures/`` and to TensorBoard. Every rank calls it: rank 0
    scores the held-out loss, every rank draws its share of the pictures' samples
    (:func:`draw_shared`), rank 0 gathers them and draws the pictures."""
    if distributed.is_main():
        with isolated_rng(run.device):
            loss = test_loss(run)
        if loss is not None:
            split = held_out_name(run.cfg.dataset)
            run.writer.add_scalar(f"{split}/loss", loss, run.step)
            unit = nll_unit(run.cfg.dataset) if registry.is_flow(run.cfg.model) else ""
            log.info("step %d: %s loss %.5g%s", run.step, split, loss, unit)
            keep_if_best(run, loss)
    with isolated_rng(run.device):
        n = run.cfg.trainer.n_plot_samples
        n = samples_within_timeout(run, n) if n > 0 else 0
        if n <= 0:
            return
        points = run.data.kind == "points" and run.data.shape == (2,)
        # Trajectories only for 2-D pictures: for images they would hold every level's batch.
        out = draw_shared(run, n, return_trajectory=points, progress=run.cfg.trainer.progress)
        if out is None:
            return
        samples, trajectory = out if points else (out, None)
        samples = run.data.to_data_space(samples)
        if points:
            report_points(run, samples, trajectory)
        elif run.data.kind == "images":
            grid = enlarge(samples[:64])
            # samples.png: the newest, as for 2-D runs; samples_STEP.png: the run's history.
            for name in ("samples.png", f"samples_{run.step:08d}.png"):
                viz.save_grid(grid, run.run_dir / "pictures" / name, nrow=8)
            run.writer.add_image("samples", viz.image_grid(grid, nrow=8), run.step)


def report_points(run: Run, samples: Tensor, trajectory: Tensor) -> None:
    data = run.data.test.tensors[0] if run.data.test is not None else run.data.train.tensors[0]
    sigma = float(run.sigmas[run.cfg.trainer.plot_sigma_index])
    with evaluating(run.sampling_net) as net:
        figures = {
            "score_field": viz.score_field_figure(net, data, sigma, device=run.device),
            "samples": viz.samples_figure(samples, data),
            "trajectories": viz.trajectories_figure(trajectory, data,
                                                    sampler=run.cfg.sampler.name),
        }
        if hasattr(net, "log_prob"):      # a flow: its exact density, data, samples
            figures["density"] = viz.density_figure(net.log_prob, data, samples,
                                                    device=run.device)
    for name, fig in figures.items():
        pixels = viz.save_figure(fig, run.run_dir / "pictures" / f"{name}.png")
        run.writer.add_image(f"pictures/{name}", pixels, run.step, dataformats="HWC")

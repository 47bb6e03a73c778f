"""What ``ncsn-sample`` writes into its output folder, for each kind of data and mode.

Points (2-D): ``samples.npz`` (array ``samples``, shape (n, 2), data space), ``samples.png``
(samples over the data) and, with ``save_trajectory``, ``trajectories.png``.

Images, ``mode=sample``: ``samples.png`` (a grid of the first ``grid_size``), the samples
streamed to ``shards/samples_*.npz`` and/or ``images/*.png`` (``save_as``, see
:mod:`ncsn.image_io`) and, with ``save_trajectory``, ``trajectories.gif`` (one frame per
level) and ``trajectories.png`` (a strip per chain).

``mode=inpaint``: ``inpainting.png``, one row per image: the masked input, the completions,
the original; ``inpainting.npz`` (``images``, ``mask``, ``completions``).

``mode=interpolate``: ``interpolation.png``, one row per interpolation;
``interpolation.npz`` (``samples``, shape (rows, n_interpolations, C, H, W)).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ncsn import distributed, registry, viz
from ncsn.cost import sampling_cost
from ncsn.data import first_tensor
from ncsn.generate import CheckpointSampler, load_sampler
from ncsn.image_io import SAVE_AS, load_images, save_gif, save_picture, save_strip, write_stream
from ncsn.image_sampling import (TrajectoryRecorder, inpaint, interpolate, make_mask,
                                 masked_picture)
from ncsn.samplers import SAMPLERS
from ncsn.sampling import KnownValues

log = logging.getLogger(__name__)
IMAGE_BATCH_SIZE = 100          # images drawn at once when batch_size is null
MASK_FRACTION = {"half": 0.5, "center": 0.25, "random": 0.5}


def write_samples(ckpt: dict, sampler_cfg, cfg, out: Path) -> Path:
    """Run ``cfg.mode`` (see :class:`ncsn.config.SampleConfig`) on checkpoint ``ckpt`` with
    ``sampler_cfg`` and write the results into ``out``; returns the main picture's path."""
    jobs = {"sample": write_images, "inpaint": write_inpainting,
            "interpolate": write_interpolation}
    if cfg.mode not in jobs:
        raise registry.ConfigError(f"mode must be one of {', '.join(jobs)}, got {cfg.mode!r}")
    if cfg.mode != "sample" and distributed.is_distributed():
        raise registry.ConfigError(f"mode={cfg.mode} runs in one process, not over "
                                   f"{distributed.world_size()} ranks: start it without "
                                   f"torchrun or srun (mode=sample splits over ranks)")
    out.mkdir(parents=True, exist_ok=True)
    sampler = load_sampler(ckpt, sampler_cfg, cfg.use_ema, cfg.device)
    if cfg.mode == "sample" and distributed.is_main():
        batch = cfg.batch_size or (IMAGE_BATCH_SIZE if sampler.is_image else cfg.n_samples)
        log.info("%s", sampling_cost(sampler, cfg.n_samples, batch, distributed.world_size()))
    if not sampler.is_image:
        if cfg.mode != "sample":
            raise registry.ConfigError(f"mode={cfg.mode} works on images; this checkpoint "
                                       f"holds points of shape {sampler.shape}")
        written = write_points(sampler, cfg, out)
    else:
        written = jobs[cfg.mode](sampler, cfg, out)
    if sampler.nfe:
        log.info("NFE: %s per sample (sampler=%s)", sampler.nfe_summary(),
                 sampler.sampler_cfg.name)
    return written


def write_points(sampler: CheckpointSampler, cfg, out: Path) -> Path:
    """``samples.npz`` and pictures of a point (e.g. 2-D) checkpoint."""
    batches = sampler.batches(cfg.n_samples, cfg.batch_size, cfg.seed,
                              return_trajectory=True, progress=True)
    if not distributed.is_main():
        return drain(batches)
    samples, trajectory = [], None
    for x, traj in batches:
        samples.append(x)
        trajectory = traj if trajectory is None else trajectory
    samples = torch.cat(samples)
    np.savez(out / "samples.npz", samples=samples.numpy())
    if sampler.shape == (2,):
        data = registry.build_data(sampler.dataset_cfg).test.tensors[0]
        viz.save_figure(viz.samples_figure(samples, data), out / "samples.png")
        if cfg.save_trajectory:
            viz.save_figure(viz.trajectories_figure(trajectory, data,
                                                    sampler=sampler.sampler_cfg.name),
                            out / "trajectories.png")
    log.info("wrote %d samples to %s and their picture to %s", len(samples),
             out / "samples.npz", out / "samples.png")
    return out / "samples.npz"


def drain(batches) -> None:
    """A rank other than 0 draws its share of ``batches`` (rank 0 gathers and writes)."""
    for _ in batches:
        pass


def _sampler_keys(sampler: CheckpointSampler, mode: str):
    """The sampler settings that inpainting (any annealed sampler) and interpolation
    (annealed Langevin) reuse."""
    allowed = (tuple(name for name, spec in SAMPLERS.items() if spec.inpaints)
               if mode == "inpaint" else ("annealed_langevin",))
    if sampler.sampler_cfg.name not in allowed:
        raise registry.ConfigError(f"mode={mode} runs one of {', '.join(allowed)}; "
                                   f"not sampler={sampler.sampler_cfg.name}")
    return sampler.sampler_cfg


def _complete(sampler: CheckpointSampler, images: torch.Tensor, mask: torch.Tensor,
              x_init: torch.Tensor, options) -> torch.Tensor:
    """Completions of data-space ``images`` (known where ``mask``) by the configured
    sampler, the known pixels set to the data perturbed to each level the network sees.
    ``options`` is ``inpaint``'s config: annealed Langevin takes its ``renoise`` and
    ``denoise`` (the reference chains'); the other samplers keep their own settings."""
    s = sampler.sampler_cfg
    if s.name == "annealed_langevin":
        try:
            return inpaint(sampler.net, images, mask, sampler.sigmas, s.step_lr, s.n_steps_each,
                           options.denoise, x_init=x_init, to_model=sampler.to_model,
                           to_data=sampler.to_data, renoise=options.renoise, progress=True)
        except ValueError as err:
            raise registry.ConfigError(f"inpaint: {err}") from None
    # the ODE's known pixels follow one smooth path y + sigma z; the others redraw z
    known = KnownValues(sampler.to_model(images), mask,
                        fixed_noise=SAMPLERS[s.name].fixed_known_noise)
    x = sampler.run(x_init, known=known, progress=True)
    return torch.where(mask.to(images.device), images, sampler.to_data(x))


def write_images(sampler: CheckpointSampler, cfg, out: Path) -> Path:
    """Stream ``cfg.n_samples`` images to disk; a grid, and the chain's record if asked."""
    if cfg.save_as not in SAVE_AS:
        raise registry.ConfigError(f"save_as must be one of {', '.join(SAVE_AS)}, "
                                   f"got {cfg.save_as!r}")
    if cfg.trajectory_every < 1 or cfg.trajectory_chains < 1:
        raise registry.ConfigError("trajectory_every and trajectory_chains must be at least 1")
    recorder = None
    if cfg.save_trajectory:
        recorder = TrajectoryRecorder(cfg.trajectory_chains, sampler.to_data,
                                      cfg.trajectory_every)
    batches = sampler.batches(cfg.n_samples, cfg.batch_size or IMAGE_BATCH_SIZE, cfg.seed,
                              recorder=recorder, progress=True)
    if not distributed.is_main():
        return drain(batches)
    grid = write_stream(batches, out, cfg.save_as, cfg.n_samples, keep=cfg.grid_size)
    save_picture(grid, out / "samples.png")
    if recorder is not None:
        save_gif(recorder.frames, out / "trajectories.gif")
        save_strip(recorder.frames, out / "trajectories.png")
    log.info("wrote %d samples to %s (save_as=%s) and a grid of %d to %s", cfg.n_samples, out,
             cfg.save_as, min(cfg.grid_size, cfg.n_samples), out / "samples.png")
    return out / "samples.png"


def known_images(sampler: CheckpointSampler, inpaint_cfg) -> torch.Tensor:
    """The images to inpaint, data space ``(N, C, H, W)``: the files of ``inpaint.images``,
    or the first ``inpaint.n_images`` of the checkpoint's dataset's test split."""
    channels, size = sampler.shape[0], sampler.shape[1]
    if inpaint_cfg.images:
        return load_images(list(inpaint_cfg.images), channels, size)
    data = registry.build_data(sampler.dataset_cfg)
    if data.test is None or len(data.test) == 0:
        raise registry.ConfigError(f"dataset={sampler.dataset_cfg.name} has no test split to "
                                   f"take images from; give files: inpaint.images=[a.png,b.png]")
    n = min(inpaint_cfg.n_images, len(data.test))
    return data.to_data_space(torch.stack([first_tensor(data.test[i]) for i in range(n)]))


def write_inpainting(sampler: CheckpointSampler, cfg, out: Path) -> Path:
    """Complete each known image ``inpaint.n_completions`` times (NCSN, Section 5)."""
    _sampler_keys(sampler, "inpaint")
    c = cfg.inpaint
    images = known_images(sampler, c)
    generator = torch.Generator().manual_seed(cfg.seed)
    fraction = c.fraction if c.fraction is not None else MASK_FRACTION.get(c.mask, 0.5)
    try:
        mask = make_mask(c.mask, images.shape, fraction, generator)
    except ValueError as err:
        raise registry.ConfigError(f"inpaint: {err}") from None
    y = images.repeat_interleave(c.n_completions, 0)                   # (N k, C, H, W)
    m = mask.repeat_interleave(c.n_completions, 0)
    torch.manual_seed(cfg.seed)
    batch = cfg.batch_size or IMAGE_BATCH_SIZE
    completions = torch.cat([
        _complete(sampler, y[i:i + batch].to(sampler.device), m[i:i + batch],
                  sampler.initial(len(y[i:i + batch]), generator), c).cpu()
        for i in range(0, len(y), batch)]).view(len(images), c.n_completions, *images.shape[1:])
    rows = torch.cat([masked_picture(images, mask)[:, None], completions, images[:, None]], 1)
    save_picture(rows.flatten(0, 1), out / "inpainting.png", nrow=rows.shape[1])
    np.savez(out / "inpainting.npz", images=images.numpy(), mask=mask.numpy(),
             completions=completions.numpy())
    log.info("inpainted %d images (%s mask), %d completions each: %s", len(images), c.mask,
             c.n_completions, out / "inpainting.png")
    return out / "inpainting.png"


def write_interpolation(sampler: CheckpointSampler, cfg, out: Path) -> Path:
    """Rows of samples interpolated with fixed noise (NCSNv2's repository)."""
    s, c = _sampler_keys(sampler, "interpolate"), cfg.interpolation
    if c.vary not in ("noise", "init", "both"):
        raise registry.ConfigError(f"interpolation.vary must be noise, init or both, "
                                   f"got {c.vary!r}")
    generator = torch.Generator().manual_seed(cfg.seed)
    start = sampler.initial(c.n_rows, generator)
    end = sampler.initial(c.n_rows, generator) if c.vary in ("init", "both") else None
    center = (s.init_low + s.init_high) / 2 if s.init == "uniform" else 0.0
    torch.manual_seed(cfg.seed)
    x = interpolate(sampler.net, sampler.sigmas, start, s.step_lr, s.n_steps_each,
                    c.n_interpolations, c.denoise, end=end,
                    interpolate_noise=c.vary in ("noise", "both"), center=center,
                    generator=generator, progress=True)
    images = sampler.to_data(x.flatten(0, 1).cpu())
    save_picture(images, out / "interpolation.png", nrow=c.n_interpolations)
    rows = images.view(*x.shape[:2], *images.shape[1:])                 # (R, K, C, H, W)
    np.savez(out / "interpolation.npz", samples=rows.numpy())
    log.info("wrote %d interpolations of %d samples: %s", c.n_rows, c.n_interpolations,
             out / "interpolation.png")
    return out / "interpolation.png"

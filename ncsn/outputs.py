"""Writing samples to disk: ``samples.npz`` (array ``samples``, shape (n, ...), in data
space) and a picture, ``samples.png``."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ncsn import registry, viz
from ncsn.generate import sample_batches

log = logging.getLogger(__name__)


def write_samples(ckpt: dict, sampler_cfg, cfg, out: Path) -> Path:
    """Sample ``cfg.n_samples`` points from ``ckpt`` with ``sampler_cfg`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    batches = sample_batches(ckpt, cfg.n_samples, cfg.batch_size, cfg.seed, sampler_cfg,
                             cfg.use_ema, cfg.device, return_trajectory=True, progress=True)
    samples, trajectory = [], None
    for x, traj in batches:
        samples.append(x)
        trajectory = traj if trajectory is None else trajectory
    samples = torch.cat(samples)
    np.savez(out / "samples.npz", samples=samples.numpy())
    _picture(ckpt, samples, trajectory, cfg, out)
    log.info("wrote %d samples to %s", len(samples), out / "samples.npz")
    return out / "samples.npz"


def _picture(ckpt: dict, samples, trajectory, cfg, out: Path) -> None:
    dataset_cfg = OmegaConf.create(ckpt["config"]["dataset"])
    if len(ckpt["data_shape"]) == 1 and ckpt["data_shape"][0] == 2:
        data = registry.build_data(dataset_cfg).test.tensors[0]
        viz.save_figure(viz.samples_figure(samples, data), out / "samples.png")
        if cfg.save_trajectory:
            viz.save_figure(viz.trajectories_figure(trajectory, data), out / "trajectory.png")
    elif len(ckpt["data_shape"]) == 3:
        viz.save_grid(samples[:256], out / "samples.png")

"""Sampling from a checkpoint: rebuild the network from the checkpoint alone (its saved
config and sigma table), then run a sampler in batches."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from ncsn import registry
from ncsn.checkpoint import CheckpointError, load_checkpoint
from ncsn.config import SCHEMAS
from ncsn.train import resolve_device


def model_from_checkpoint(ckpt: dict, use_ema: bool = True,
                          device: str | torch.device = "cpu") -> nn.Module:
    """The score network of a checkpoint dict, with its EMA weights when ``use_ema`` and
    the checkpoint has them, in eval mode."""
    cfg = OmegaConf.create(ckpt["config"])
    net = registry.build_model(cfg.model, tuple(ckpt["data_shape"]), ckpt["sigmas"])
    state = ckpt["model"]
    if use_ema and ckpt.get("ema") is not None:
        # torch's AveragedModel keeps the averaged network under "module." plus a counter.
        state = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint's weights do not fit its own model config "
                              f"({str(err).splitlines()[0]})") from None
    return net.to(device).eval()


def sampler_config(saved: dict, overrides: dict | None = None, replace: dict | None = None):
    """The checkpoint's sampler config (``saved``), or ``replace`` instead of it, with
    ``overrides`` (key -> value) applied, checked against the sampler's schema."""
    base = dict(replace if replace is not None else saved)
    schema = SCHEMAS["sampler"].get(base.get("name"))
    if schema is None:
        raise registry.ConfigError(f"unknown sampler {base.get('name')!r}; choose one of "
                                   f"{sorted(SCHEMAS['sampler'])}")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), base, overrides or {})
    except OmegaConfBaseException as err:
        raise registry.ConfigError(f"sampler config: {str(err).splitlines()[0]}") from None


def sample_batches(ckpt: dict, n_samples: int, batch_size: int | None = None, seed: int = 0,
                   sampler_cfg=None, use_ema: bool = True, device: str = "auto",
                   return_trajectory: bool = False, progress: bool = False) -> Iterator:
    """Yield batches of samples in data space (CPU tensors), ``n_samples`` in all, or
    ``(samples, trajectory)`` pairs with ``return_trajectory``. Memory does not grow with
    ``n_samples``: each batch is handed over before the next is drawn."""
    torch.manual_seed(seed)
    device = resolve_device(device)
    cfg = OmegaConf.create(ckpt["config"])
    sampler_cfg = sampler_cfg if sampler_cfg is not None else cfg.sampler
    registry.check_sampler(sampler_cfg, cfg.model)
    net = model_from_checkpoint(ckpt, use_ema, device)
    sigmas = ckpt["sigmas"].to(device)
    sampler = registry.build_sampler(sampler_cfg, sigmas)
    to_data_space = registry.data_space_map(cfg.dataset)
    shape = tuple(ckpt["data_shape"])
    generator = torch.Generator().manual_seed(seed)
    batch_size = batch_size or n_samples
    for start in range(0, n_samples, batch_size):
        n = min(batch_size, n_samples - start)
        x = registry.initial_samples(sampler_cfg, n, shape, sigmas, device, generator)
        out = sampler(net, x, return_trajectory=return_trajectory, progress=progress)
        if return_trajectory:
            x, trajectory = out
            yield to_data_space(x.cpu()), trajectory
        else:
            yield to_data_space(out.cpu())


def sample(path: str | Path, n_samples: int, **kwargs) -> Tensor:
    """Load a checkpoint and return ``n_samples`` samples in data space (CPU tensor);
    keyword arguments as :func:`sample_batches`."""
    ckpt = load_checkpoint(path)
    return torch.cat(list(sample_batches(ckpt, n_samples, **kwargs)))

"""Sampling from a checkpoint: rebuild the network from the checkpoint alone (its saved
config and sigma table), then run a sampler in batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from ncsn import distributed, registry
from ncsn.checkpoint import CheckpointError, load_checkpoint
from ncsn.config import SCHEMAS
from ncsn.data.images import IMAGE_DATASETS, image_config, model_space
from ncsn.image_sampling import TrajectoryRecorder
from ncsn.sampling import CountingNet, per_sample_noise
from ncsn.training import plain_ema_state, resolve_device


def model_from_checkpoint(ckpt: dict, use_ema: bool = True,
                          device: str | torch.device = "cpu") -> nn.Module:
    """The score network of a checkpoint dict, with its EMA weights when ``use_ema`` and
    the checkpoint has them, in eval mode."""
    cfg = OmegaConf.create(ckpt["config"])
    net = registry.build_model(cfg.model, tuple(ckpt["data_shape"]), ckpt["sigmas"])
    state = ckpt["model"]
    if use_ema and ckpt.get("ema") is not None:
        state = plain_ema_state(ckpt["ema"])
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


@dataclass
class CheckpointSampler:
    """A checkpoint's network, noise table and sampler, and the maps between the model's
    space and data space: everything needed to draw, inpaint or interpolate."""

    net: nn.Module
    sigmas: Tensor                       # (L,), on ``device``
    sampler_cfg: DictConfig
    dataset_cfg: DictConfig
    shape: tuple[int, ...]               # one sample
    device: torch.device
    model_cfg: DictConfig | None = None  # tells pc and heun whether sigma must be a table level
    nfe: list[int] = field(default_factory=list)   # network evaluations of each batch run

    def nfe_summary(self) -> str:
        """The network evaluations per sample of the batches run so far, e.g. ``"35 network
        evaluations"``, ``"1 network evaluation"`` (a flow) or, for the adaptive ODE solver,
        ``"104.5 network evaluations (98 to 111 over 2 batches)"``."""
        if not self.nfe:
            return "no network evaluations"
        if min(self.nfe) == max(self.nfe):
            n = self.nfe[0]
            return f"{n} network evaluation{'' if n == 1 else 's'}"
        return (f"{sum(self.nfe) / len(self.nfe):.1f} network evaluations ({min(self.nfe)} to "
                f"{max(self.nfe)} over {len(self.nfe)} batches)")

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def to_data(self, x: Tensor) -> Tensor:
        """Model space -> data space (images: clamped to [0, 1])."""
        return registry.data_space_map(self.dataset_cfg)(x)

    def to_model(self, x: Tensor) -> Tensor:
        """Data space -> model space (the dataset's rescaling or logit transform)."""
        if self.dataset_cfg.name in IMAGE_DATASETS:
            return model_space(image_config(self.dataset_cfg))(x)
        return x

    def initial(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` starting points of the configured distribution, in model space."""
        return registry.initial_samples(self.sampler_cfg, n, self.shape, self.sigmas,
                                        self.device, generator)

    def run(self, x: Tensor, **kwargs):
        """The configured sampler on ``x`` (keyword arguments as the sampler takes them);
        its network evaluations are appended to ``nfe``."""
        net = CountingNet(self.net)
        sampler = registry.build_sampler(self.sampler_cfg, self.sigmas, self.model_cfg)
        out = sampler(net, x, **kwargs)
        self.nfe.append(net.nfe)
        return out

    def batches(self, n_samples: int, batch_size: int | None = None, seed: int = 0,
                recorder: TrajectoryRecorder | None = None, return_trajectory: bool = False,
                progress: bool = False, on_rank: Callable | None = None) -> Iterator:
        """Yield data-space CPU batches, ``n_samples`` in all, or ``(samples, trajectory)``
        pairs with ``return_trajectory`` (the sampler's snapshots ``(K, B, ...)``, model
        space). Memory does not grow with ``n_samples``: each batch is handed over before
        the next is drawn. ``recorder`` (annealed Langevin only) records the first batch.

        Sample i (0 <= i < n_samples) is drawn from its own generator, seeded from ``seed``
        and i (EDM's ``--seeds``; :func:`ncsn.sampling.per_sample_noise`): its start and
        every noise of its chain, so the samples do not depend on ``batch_size`` or on the
        number of ranks. Under torch.distributed the global batches are dealt out in rounds,
        rank k drawing batch r N + k of round r; rank 0 gathers each round and yields every
        batch in order, the other ranks yield nothing. ``on_rank`` maps each batch on the
        rank that drew it, before the gather (the evaluation's Inception features)."""
        if recorder is not None and self.sampler_cfg.name != "annealed_langevin":
            raise registry.ConfigError(
                f"recording the chain needs sampler=annealed_langevin (one frame per noise "
                f"level), not sampler={self.sampler_cfg.name}")
        ranges = batch_ranges(n_samples, batch_size or n_samples)
        show = progress and distributed.is_main()

        def draw(b: int | None):
            if b is None:
                return None
            out = self.draw(ranges[b], seed, recorder if b == 0 else None, return_trajectory,
                            show)
            return on_rank(out) if on_rank is not None else out
        yield from gathered(draw(b) for b in rank_rounds(len(ranges)))

    def draw(self, indices: range, seed: int = 0, recorder: TrajectoryRecorder | None = None,
             return_trajectory: bool = False, progress: bool = False):
        """Samples ``indices`` of ``seed``: data space ``(B, ...)`` on the CPU, or with the
        trajectory ``(K, B, ...)`` in model space."""
        with per_sample_noise(seed, indices, self.device):
            x = self.initial(len(indices))
            if recorder is not None:
                recorder.start(x)
            out = self.run(x, return_trajectory=return_trajectory, progress=progress,
                           **({"known": recorder} if recorder is not None else {}))
        x, trajectory = out if return_trajectory else (out, None)
        if recorder is not None:
            recorder.finish(x)
        samples = self.to_data(x.cpu())
        return (samples, trajectory) if return_trajectory else samples


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """The global indices of each batch: ``[0, b), [b, 2b), ...`` up to ``n``."""
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def rank_rounds(n_batches: int) -> Iterator[int | None]:
    """This rank's batch of each round: batch r N + k for rank k of N, None once they run
    out (the last round's trailing ranks). One process: 0, 1, ..., n_batches - 1."""
    n, k = distributed.world_size(), distributed.rank()
    for first in range(0, n_batches, n):
        yield first + k if first + k < n_batches else None


def gathered(items: Iterable) -> Iterator:
    """Rank 0: each round's items of every rank, in rank order (None: a rank without one);
    the other ranks: nothing, after taking part in every round's gather."""
    for mine in items:
        for item in distributed.gather_to_main(mine) or []:
            if item is not None:
                yield item


def load_sampler(ckpt: dict, sampler_cfg=None, use_ema: bool = True,
                 device: str | torch.device = "auto") -> CheckpointSampler:
    """A :class:`CheckpointSampler` for a checkpoint dict, with its own sampler config or
    ``sampler_cfg``."""
    cfg = OmegaConf.create(ckpt["config"])
    sampler_cfg = sampler_cfg if sampler_cfg is not None else cfg.sampler
    registry.check_sampler(sampler_cfg, cfg.model)
    device = resolve_device(device) if isinstance(device, str) else device
    return CheckpointSampler(model_from_checkpoint(ckpt, use_ema, device),
                             ckpt["sigmas"].to(device), sampler_cfg, cfg.dataset,
                             tuple(ckpt["data_shape"]), device, cfg.model)


def sample_batches(ckpt: dict, n_samples: int, batch_size: int | None = None, seed: int = 0,
                   sampler_cfg=None, use_ema: bool = True, device: str = "auto",
                   return_trajectory: bool = False, progress: bool = False) -> Iterator:
    """Yield batches of samples in data space (CPU tensors), ``n_samples`` in all, or
    ``(samples, trajectory)`` pairs with ``return_trajectory`` (trajectory: ``(K, B, ...)``
    in model space). Memory does not grow with ``n_samples``: each batch is handed over
    before the next is drawn."""
    sampler = load_sampler(ckpt, sampler_cfg, use_ema, device)
    return sampler.batches(n_samples, batch_size, seed, return_trajectory=return_trajectory,
                           progress=progress)


def sample(path: str | Path, n_samples: int, **kwargs) -> Tensor:
    """Load a checkpoint and return ``n_samples`` samples in data space (CPU tensor);
    keyword arguments as :func:`sample_batches`."""
    ckpt = load_checkpoint(path)
    return torch.cat(list(sample_batches(ckpt, n_samples, **kwargs)))

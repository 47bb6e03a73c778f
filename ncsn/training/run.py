"""A training run: what it holds (:class:`Run`) and how it is built from a config."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter

from ncsn import distributed, registry
from ncsn.config import chosen_name
from ncsn.data import Data
from ncsn.training.ema import build_ema
from ncsn.training.monitor import StepMonitor
from ncsn.training.rng import DropoutStream
from ncsn.training.speed import Speed, apply_speed_options

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise registry.ConfigError(f"trainer.device={name} but no CUDA device is available; "
                                   f"use trainer.device=cpu or auto")
    if distributed.is_distributed() and name.startswith("cuda"):
        if name != "cuda":
            raise registry.ConfigError(f"trainer.device={name} names one GPU, but each of the "
                                       f"{distributed.world_size()} processes takes its own "
                                       f"(LOCAL_RANK, or the one GPU SLURM bound to it); use "
                                       f"trainer.device=cuda or auto")
        return torch.device("cuda", distributed.device_index(distributed.local_rank()))
    return torch.device(name)


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


@dataclass
class Run:
    """Everything one training job holds."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    data: Data
    sigmas: Tensor
    net: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    objective: registry.Objective
    sampler: registry.Sampler
    data_generator: torch.Generator
    step: int = 0
    stop_signal: int | None = None
    writer: SummaryWriter | None = field(default=None, repr=False)
    speed: Speed = field(default_factory=Speed)
    monitor: StepMonitor | None = field(default=None, repr=False)
    best_loss: float | None = None       # the lowest held-out loss so far (trainer.keep_best)
    dropout: "DropoutStream | None" = field(default=None, repr=False)

    @property
    def module(self) -> nn.Module:
        """The network itself: ``net`` without its DistributedDataParallel wrapper."""
        return self.net.module if isinstance(self.net, DistributedDataParallel) else self.net

    @property
    def sampling_net(self) -> nn.Module:
        """The EMA weights when kept (samples use them), the raw weights otherwise."""
        return self.ema.module if self.ema is not None else self.module


def build_run(cfg: DictConfig, run_dir: str | Path, sigmas: Tensor | None = None) -> Run:
    """Build data, sigma table, network, EMA, optimizer, objective and sampler from ``cfg``.

    Under torch.distributed every rank builds the same run (same seed); a failure on one
    rank fails all of them with its message; the network is then wrapped in
    DistributedDataParallel, which averages the gradients over the ranks.
    """
    with distributed.all_or_none():
        run = _build_run(cfg, run_dir, sigmas)
    run.net = distributed.data_parallel(run.net, run.device)
    return run


def _build_run(cfg: DictConfig, run_dir: str | Path, sigmas: Tensor | None) -> Run:
    check_batch(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.trainer.num_threads not in (None, "auto"):
        # Small networks on a busy CPU run far faster on one thread than on contended ones.
        torch.set_num_threads(cfg.trainer.num_threads)
    device = resolve_device(cfg.trainer.device)
    data = registry.build_data(cfg.dataset)
    sigmas = sigmas if sigmas is not None else registry.build_sigmas(cfg.noise, data)
    registry.check_sampler(cfg.sampler, cfg.model)
    net = registry.build_model(cfg.model, data.shape, sigmas).to(device)
    ema = build_ema(net, cfg.trainer.ema_rate) if cfg.trainer.ema else None
    o = cfg.optim
    optimizer = torch.optim.Adam(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay, amsgrad=o.amsgrad)
    run = Run(cfg=cfg, run_dir=Path(run_dir), device=device, data=data, sigmas=sigmas, net=net,
              ema=ema, optimizer=optimizer,
              # The table on the device: the objective indexes it every step, no copy.
              objective=registry.build_objective(cfg.loss, cfg.model, sigmas.to(device),
                                                 cfg.noise, cfg.dataset),
              sampler=registry.build_sampler(cfg.sampler, sigmas, cfg.model),
              data_generator=torch.Generator().manual_seed(cfg.seed),
              monitor=StepMonitor(len(sigmas), device))
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules()):
        run.dropout = DropoutStream(net, cfg.seed, device)      # after the EMA copy: not on it
    apply_speed_options(run)
    return run


def check_batch(cfg: DictConfig) -> None:
    """The global batch, its split over the processes and trainer.accumulate, checked
    before anything is built."""
    t, n = cfg.trainer, distributed.world_size()
    if t.batch_size < 1:
        raise registry.ConfigError(f"trainer.batch_size must be a positive number of samples, "
                                   f"got {t.batch_size}")
    if t.accumulate < 1:
        raise registry.ConfigError(f"trainer.accumulate must be at least 1 (micro-batches per "
                                   f"step), got {t.accumulate}")
    rows = distributed.shard(t.batch_size)              # refuses a batch that does not split
    share = rows.stop - rows.start
    if share % t.accumulate:
        divisors = [k for k in range(1, share + 1) if share % k == 0]
        where = f" on each of the {n} processes" if n > 1 else ""
        raise registry.ConfigError(
            f"trainer.accumulate={t.accumulate} must divide the {share} rows of "
            f"trainer.batch_size={t.batch_size}{where}; use one of {divisors}")
    if t.accumulate > 1 and cfg.model.get("norm") == "batch":
        raise registry.ConfigError(
            "trainer.accumulate > 1 with model.norm=batch would normalise each micro-batch by "
            "its own statistics, not the batch's; use model.norm=actnorm or trainer.accumulate=1")


def initialize_from_data(run: Run, x: Tensor) -> None:
    """Data-dependent initialisation (Glow's actnorm) from the first global batch, before the
    first step: each rank passes its rows ``x`` and the layers reduce their statistics over
    all of them, so N ranks initialise as one process. The EMA copy then starts from the
    initialised weights, not from the placeholders before them."""
    initialize = getattr(run.module, "initialize_from_data", None)
    if initialize is None or not initialize(x):
        return
    if run.ema is not None:
        run.ema.module.load_state_dict(run.module.state_dict())


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def describe(run: Run) -> None:
    """Write the resolved config.yaml (rank 0) and log what is trained: the network (its
    config group's choice, say unet_small, and its class), parameters, noise levels, device."""
    cfg = run.cfg
    restarted = distributed.restarts()
    if restarted:
        log.info("%s", restarted)
    if distributed.is_main():
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    noise = ("a normalizing flow: no noise levels" if registry.is_flow(cfg.model) else
             f"{len(run.sigmas)} noise levels, sigma {float(run.sigmas[0]):.4g} -> "
             f"{float(run.sigmas[-1]):.4g}")
    log.info("model %s: %s parameters; %s; device %s%s", chosen_name("model", cfg.model.name),
             f"{count_parameters(run.module):,}", noise, run.device,
             f"; {distributed.world_size()} processes" if distributed.is_distributed() else "")

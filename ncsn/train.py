"""The training loop: a step, checkpoint and resume, logging, pictures.

``train(cfg, run_dir)`` runs a whole training job from a composed config (see
``ncsn.config.TrainConfig``); the CLI ``ncsn-train`` is a thin wrapper around it.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ncsn import distributed, losses, registry, viz
from ncsn.checkpoint import (CheckpointError, best_held_out_loss, load_checkpoint,
                             save_best, save_checkpoint)
from ncsn.data import Data, first_tensor, training_batches
from ncsn.data.order import derived_seed
from ncsn.image_io import enlarge
from ncsn.sampling import per_sample_noise

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the message names the step and sigma."""


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 arrived; a checkpoint was written before stopping."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint saved to {path}")


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
class Speed:
    """How a step runs (set by :func:`apply_speed_options` from the trainer config): the
    autocast dtype (None: fp32), torch's gradient scaler (active for fp16 only), inputs in
    channels-last layout, a compiled network."""

    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    compiled: bool = False


class StepMonitor:
    """What the steps leave on the device between two reads: the loss sums (overall and per
    noise level), the last gradient norm, and the first step whose loss or gradient norm was
    not finite, with its loss, gradient norm and noise levels. Recording never waits for the
    device; :meth:`check` reads one number."""

    def __init__(self, n_levels: int, device: torch.device):
        self.n_levels, self.device = n_levels, device
        zero = torch.zeros((), device=device)
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=device)   # 0: none yet
        self.bad_loss, self.bad_grad_norm = zero.clone(), zero.clone()
        self.bad_levels = torch.zeros(n_levels, dtype=torch.bool, device=device)
        self.reset()

    def reset(self) -> None:
        """Start new sums (after a read); the record of the first non-finite step stays."""
        self.count = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.level_sum = torch.zeros(self.n_levels, dtype=torch.float64, device=self.device)
        self.level_count = torch.zeros(self.n_levels, dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)

    def record(self, step: int, stats: "StepStats", check_grad: bool = True) -> None:
        """Add step ``step``'s loss; if it is the first non-finite one, keep what it was.
        ``check_grad=False`` (fp16): the gradient scaler skips steps with infinite gradients."""
        self.count += 1
        self.loss_sum += stats.loss.double()
        self.grad_norm = stats.grad_norm
        finite = torch.isfinite(stats.per_sample)                       # (B,)
        ok = finite.all() & torch.isfinite(stats.grad_norm) if check_grad else finite.all()
        first = ~ok & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.bad_loss = torch.where(first, stats.loss, self.bad_loss)
        self.bad_grad_norm = torch.where(first, stats.grad_norm, self.bad_grad_norm)
        if stats.labels is not None:
            per_sample = stats.per_sample.double()
            self.level_sum.index_add_(0, stats.labels, per_sample)
            self.level_count.index_add_(0, stats.labels, torch.ones_like(per_sample))
            bad_now = torch.zeros(self.n_levels, device=self.device).index_add_(
                0, stats.labels, (~finite).float()) > 0
            self.bad_levels = torch.where(first, bad_now, self.bad_levels)

    def check(self, run: "Run") -> None:
        """Raise :class:`NonFiniteLossError` if any step since the start was not finite."""
        step = int(self.first_bad_step)
        if step == 0:
            return
        loss, grad_norm = float(self.bad_loss), float(self.bad_grad_norm)
        where = ""
        bad = self.bad_levels.nonzero().flatten().cpu()
        if len(bad) > 0:
            sigmas = [float(s) for s in run.sigmas[bad]]
            where = " at sigma " + ", ".join(f"{s:.4g}" for s in sigmas[:5])
            where += " ..." if len(sigmas) > 5 else ""
        every = run.cfg.trainer.log_every
        found = (f"(found at step {run.step}: the loss is checked every trainer.log_every="
                 f"{every} steps and before every checkpoint)")
        last_good = run.run_dir / "checkpoints" / "last.pt"
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss} at step {step}{where} {found}; the last good checkpoint "
                f"is {last_good}; try a lower optim.lr or optim.grad_clip=1.0")
        raise NonFiniteLossError(
            f"gradient norm became {grad_norm} at step {step} (loss {loss:.4g}) {found}; the "
            f"last good checkpoint is {last_good}; try optim.grad_clip=1.0 or a lower optim.lr")


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


class DropoutStream:
    """Dropout's masks from a random stream of this rank's own, as in any DDP trainer.

    The objectives draw from torch's global generator in step on every rank (each keeps its
    rows of the global batch's draws); dropout drawing from it too would give every rank the
    same masks for different images. Around each training-mode forward pass of ``net`` the
    device's generator is swapped for this stream, which each step seeds from (seed, rank,
    step): nothing to checkpoint, and a resumed run draws the masks the uninterrupted one
    drew. With dropout, N ranks are therefore not bit-equal to one process.
    """

    def __init__(self, net: nn.Module, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.state: Tensor | None = None
        self.saved: Tensor | None = None
        net.register_forward_pre_hook(self._enter)
        net.register_forward_hook(self._leave)

    def start_step(self, step: int) -> None:
        seed = derived_seed(self.seed, 2, distributed.rank(), step)
        self.state = torch.Generator(self.device).manual_seed(seed).get_state()

    def _enter(self, module: nn.Module, args) -> None:
        if module.training and self.state is not None:
            self.saved = _generator_state(self.device)
            _set_generator_state(self.device, self.state)

    def _leave(self, module: nn.Module, args, output) -> None:
        if self.saved is not None:
            self.state = _generator_state(self.device)
            _set_generator_state(self.device, self.saved)
            self.saved = None


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


# ----------------------------------------------------------------------------- speed
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# trainer.num_threads=auto: a step of fewer FLOPs than this runs on one CPU thread. Measured
# by scripts/bench_train.py --threads (docs/PERFORMANCE.md): below it a second thread gains
# little on an idle CPU and loses several times over on a busy one.
ONE_THREAD_FLOPS = 2e9


# trainer.precision=auto on the CPU: bf16 autocast for networks of at least this many forward
# FLOPs per sample, on CPUs that multiply bf16 in hardware (AMX). Measured by
# scripts/bench_train.py (docs/PERFORMANCE.md): NCSN and NCSNv2 on CIFAR-10 (20 GFLOP)
# train 2.1-2.7x faster in bf16 on this project's CPU, the digits' small U-Net (0.03 GFLOP)
# slower.
CPU_BF16_FLOPS = 1e9


def _cpu_multiplies_bf16() -> bool:
    """Whether the CPU has AMX tiles (bf16 matrix units); torch exposes it privately only."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(name: str, device: torch.device, sample_flops: float = 0.0) -> str:
    """trainer.precision -> fp32 | tf32 | bf16 | fp16. auto: bf16 on a CUDA device that has
    it (tf32 on older ones); on the CPU, bf16 for a network of ``sample_flops`` (forward,
    one sample) >= CPU_BF16_FLOPS on a CPU with AMX, fp32 otherwise."""
    if name not in PRECISIONS:
        raise registry.ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, "
                                   f"got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            large = sample_flops >= CPU_BF16_FLOPS
            return "bf16" if large and _cpu_multiplies_bf16() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "tf32"
    if name == "tf32" and device.type != "cuda":
        raise registry.ConfigError("trainer.precision=tf32 is a CUDA matmul mode; use fp32 or "
                                   "bf16 on the CPU")
    return name


def _on_cuda_by_default(value, device: torch.device, key: str) -> bool:
    """An option that is true | false | auto, where auto means "on CUDA"."""
    if value == "auto":
        return device.type == "cuda"
    if not isinstance(value, bool):
        raise registry.ConfigError(f"trainer.{key} must be true, false or auto, got {value!r}")
    return value


def sample_flops(run: Run) -> float:
    """FLOPs of the network's forward pass on one sample, counted by torch.utils.flop_counter."""
    x = torch.zeros(1, *run.data.shape, device=run.device)
    sigma = run.sigmas[:1].to(run.device) if registry.is_conditional(run.cfg.model) else None
    with torch.no_grad(), evaluating(run.net), FlopCounterMode(display=False) as counter:
        run.net(x, sigma)
    return float(counter.get_total_flops())


def step_flops(run: Run) -> float:
    """FLOPs of one training step: forward + backward ~ 3 forward passes, times the batch."""
    return 3.0 * sample_flops(run) * run.cfg.trainer.batch_size


def auto_num_threads(run: Run, flops: float | None = None) -> int:
    """trainer.num_threads=auto on the CPU: one thread for a step under ONE_THREAD_FLOPS;
    above, the cores other processes leave free (the CPU count less the one-minute load
    average), at least one and at most torch's default. Threads that contend with busy
    processes run many times slower than one thread alone (docs/PERFORMANCE.md).
    ``flops``: the step's FLOPs when already counted."""
    if (flops if flops is not None else step_flops(run)) < ONE_THREAD_FLOPS:
        return 1
    free = round((os.cpu_count() or 1) - os.getloadavg()[0])
    return max(1, min(torch.get_num_threads(), free))


def apply_speed_options(run: Run) -> None:
    """Set up ``run`` to step as fast as the device allows (trainer.precision, num_threads,
    channels_last, fused_adam, compile); see docs/PERFORMANCE.md for what each is worth."""
    t, device = run.cfg.trainer, run.device
    flops = sample_flops(run) if device.type == "cpu" else 0.0        # forward, one sample
    if t.num_threads == "auto" and device.type == "cpu":
        torch.set_num_threads(auto_num_threads(run, 3.0 * flops * t.batch_size))
    precision = resolve_precision(t.precision, device, flops)
    if device.type == "cuda":
        # TF32 for the fp32 matmuls and convolutions left outside autocast.
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    run.speed.amp_dtype = AMP_DTYPES.get(precision)
    run.speed.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if _on_cuda_by_default(t.channels_last, device, "channels_last") and len(run.data.shape) == 3:
        for net in (run.net, run.ema.module if run.ema is not None else None):
            if net is not None:
                net.to(memory_format=torch.channels_last)
        run.speed.channels_last = True
    if _on_cuda_by_default(t.fused_adam, device, "fused_adam"):
        options = {**run.optimizer.defaults, "fused": True, "foreach": None}
        run.optimizer = torch.optim.Adam(run.net.parameters(), **options)
    if t.compile:
        # In place (nn.Module.compile): the state dict keeps its keys; the EMA copy was taken
        # before and stays eager.
        run.net.compile()
        run.speed.compiled = True


# NCSNv2 (Song & Ermon 2020), Technique 5, as its code keeps it (models/ema.py): the
# shadow starts at the initial weights theta_0 and, after every optimizer step,
# shadow <- mu shadow + (1 - mu) theta, so after k steps it is
# mu^k theta_0 + sum_j (1 - mu) mu^(k-j) theta_j.
def build_ema(net: nn.Module, ema_rate: float) -> AveragedModel:
    """torch's AveragedModel with the exponential rule, seeded with ``net``'s current weights.

    AveragedModel copies the weights at its first ``update_parameters``; calling it once
    here, before any optimizer step, makes that copy theta_0, as the reference's shadow.
    """
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_rate), use_buffers=True)
    ema.update_parameters(net)
    return ema


def plain_ema_state(state: dict) -> dict:
    """The EMA weights under the network's own keys. Checkpoints keep them so; older ones
    (version 1) kept AveragedModel's ``module.``-prefixed keys and its counter."""
    if "n_averaged" not in state:
        return state
    return {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}


def learning_rate(step: int, optim_cfg, n_steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to zero."""
    lr = optim_cfg.lr
    if optim_cfg.warmup > 0 and step < optim_cfg.warmup:
        return lr * (step + 1) / optim_cfg.warmup
    if optim_cfg.schedule == "cosine":
        progress = (step - optim_cfg.warmup) / max(1, n_steps - optim_cfg.warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if optim_cfg.schedule != "constant":
        raise registry.ConfigError(f"optim.schedule must be 'constant' or 'cosine', "
                                   f"got {optim_cfg.schedule!r}")
    return lr


# ----------------------------------------------------------------------------- one step
@dataclass
class StepStats:
    """One step's numbers, left on the training device (reading them would wait for it)."""

    loss: Tensor                 # () the batch mean
    per_sample: Tensor           # (B,)
    labels: Tensor | None        # (B,) the noise level of each sample; None: not annealed
    grad_norm: Tensor            # () before clipping
    lr: float


@torch.no_grad()
def update_ema(run: Run) -> None:
    """shadow <- mu shadow + (1 - mu) theta for every weight and buffer, as one
    ``torch._foreach_lerp_`` (the operation of torch's get_ema_multi_avg_fn, without
    AveragedModel's per-step regrouping and its host-side read of ``n_averaged``)."""
    shadow = [*run.ema.module.parameters(), *run.ema.module.buffers()]
    current = [*run.net.parameters(), *run.net.buffers()]
    torch._foreach_lerp_(shadow, current, 1.0 - run.cfg.trainer.ema_rate)
    run.ema.n_averaged += 1


def _grad_norm(run: Run) -> Tensor:
    """The total gradient norm, clipped to optim.grad_clip when set; stays on the device."""
    params = [p for p in run.net.parameters() if p.grad is not None]
    if run.cfg.optim.grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, run.cfg.optim.grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def _autocast(run: Run):
    dtype = run.speed.amp_dtype
    return torch.autocast(run.device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_step(run: Run, x: Tensor, rows: slice | None = None,
               global_batch: int | None = None) -> StepStats:
    """One optimisation step on batch ``x`` (B, ...), rows ``rows`` (default: all) of a global
    batch of ``global_batch`` (default: ``len(x)``) when the other rows are other processes':
    loss (under autocast for bf16/fp16), backward (scaled for fp16) in trainer.accumulate
    micro-batches, clip, Adam, EMA.

    Nothing here waits for the device: the loss, the per-level losses, the gradient norm and
    the finiteness check accumulate in ``run.monitor``, read every ``log_every`` steps and
    before every checkpoint (:func:`check_finite`), so a non-finite loss never reaches one.
    """
    lr = learning_rate(run.step, run.cfg.optim, run.cfg.trainer.n_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.speed.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    run.optimizer.zero_grad(set_to_none=True)
    if run.dropout is not None:
        run.dropout.start_step(run.step)
    per_sample, labels = _backward(run, x, rows or slice(0, len(x)), global_batch or len(x))
    loss = per_sample.mean()
    scaler = run.speed.scaler
    scaler.unscale_(run.optimizer)
    grad_norm = _grad_norm(run)
    scaler.step(run.optimizer)            # fp16: skips a step with infinite gradients
    scaler.update()
    if run.ema is not None:
        update_ema(run)
    run.step += 1
    stats = StepStats(loss.detach(), per_sample, labels, grad_norm.detach(), lr)
    run.monitor.record(run.step, stats, check_grad=not scaler.is_enabled())
    return stats


def _backward(run: Run, x: Tensor, rows: slice, global_batch: int) -> tuple[Tensor, Tensor | None]:
    """Gradients of the mean loss over ``x`` in trainer.accumulate micro-batches; returns the
    per-sample losses (B,) and noise levels (B,) or None.

    Each micro-batch draws its rows of the objective's draws for the global batch
    (``ncsn.losses.batch_shard``), from the random state the step began with (set back
    before each), and adds sum / len(x) of its losses to the gradients: the step equals one
    pass over the whole batch. Under DDP, the gradients are averaged over the processes
    once, with the last micro-batch (``no_sync`` before it).
    """
    k = run.cfg.trainer.accumulate
    size = len(x) // k
    start_state = _rng_state(run.device) if k > 1 else None
    parts, part_labels = [], []
    for m in range(k):
        if m > 0:
            _set_rng_state(run.device, start_state)
        part = slice(m * size, (m + 1) * size)
        part_rows = slice(rows.start + part.start, rows.start + part.stop)
        last = m == k - 1
        sync = nullcontext() if last or not isinstance(run.net, DistributedDataParallel) \
            else run.net.no_sync()
        with sync:
            with losses.batch_shard(part_rows, global_batch), _autocast(run):
                per_sample, labels = run.objective(run.net, x[part])
            per_sample = per_sample.float()
            run.speed.scaler.scale(per_sample.sum() / len(x)).backward()
        parts.append(per_sample.detach())
        part_labels.append(labels)
    labels = torch.cat(part_labels) if part_labels[0] is not None else None
    return torch.cat(parts), labels


def _generator_state(device: torch.device) -> Tensor:
    """The state of torch's default generator for ``device`` (the CPU's or the GPU's)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_generator_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """torch's global random state: the CPU generator's, and the device's on CUDA."""
    return (torch.get_rng_state(),
            _generator_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        _set_generator_state(device, state[1])


def check_finite(run: Run) -> None:
    """Raise :class:`NonFiniteLossError` (step, sigma, last good checkpoint) if a step's loss
    or gradient norm was not finite; called before every checkpoint and log read."""
    run.monitor.check(run)


# ----------------------------------------------------------------------------- checkpoints
def state_dict(run: Run) -> dict:
    """The run as a checkpoint: tensors, numbers, strings and the config as a plain dict."""
    rng = {"torch": torch.get_rng_state(), "data": run.data_generator.get_state()}
    if run.device.type == "cuda":
        # The training GPU's generator (each rank's own, equal on all ranks).
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {"step": run.step, "config": to_plain(run.cfg), "sigmas": run.sigmas.cpu(),
            "data_shape": list(run.data.shape), "model": run.module.state_dict(),
            "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "optimizer": run.optimizer.state_dict(), "rng": rng,
            "scaler": run.speed.scaler.state_dict() if run.speed.scaler.is_enabled() else None}


def load_state(run: Run, ckpt: dict) -> None:
    run.module.load_state_dict(ckpt["model"])
    if run.ema is not None and ckpt.get("ema") is not None:
        run.ema.module.load_state_dict(plain_ema_state(ckpt["ema"]))
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and run.speed.scaler.is_enabled():
        run.speed.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    run.data_generator.set_state(ckpt["rng"]["data"])
    cuda_rng = ckpt["rng"].get("cuda")
    if cuda_rng is not None and run.device.type == "cuda":
        # Older checkpoints kept every visible GPU's state; the first was the training GPU's.
        torch.cuda.set_rng_state(cuda_rng[0] if isinstance(cuda_rng, list) else cuda_rng,
                                 run.device)
    run.step = ckpt["step"]


def save(run: Run) -> Path:
    """Write the step's checkpoint and ``last.pt`` (rank 0 only; every rank checks the loss
    first, so all of them stop alike on a non-finite one). Returns the file written."""
    check_finite(run)
    ckpt_dir = run.run_dir / "checkpoints"
    if not distributed.is_main():
        return ckpt_dir / "last.pt"
    path = save_checkpoint(state_dict(run), ckpt_dir, run.cfg.trainer.keep_last)
    log.info("step %d: checkpoint %s", run.step, path)
    return path


def resume_mode(value) -> str:
    """trainer.resume as "auto" (resume when the run directory holds last.pt, else start
    fresh), "true" (resume, fail without last.pt) or "false" (start fresh)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value not in ("auto", "true", "false"):
        raise registry.ConfigError(f"trainer.resume must be auto, true or false, got {value!r}")
    return value


def _resume_checkpoint(cfg: DictConfig, path: Path, found: bool) -> dict | None:
    """The checkpoint to resume from (None: start fresh); ``found``: whether ``path``,
    the run's last.pt, exists (rank 0's answer, the same on every rank)."""
    mode = resume_mode(cfg.trainer.resume)
    if mode == "false" or (mode == "auto" and not found):
        return None
    if not found:
        raise CheckpointError(f"trainer.resume=true but there is no {path}; pass "
                              f"hydra.run.dir=<the run to resume>")
    ckpt = load_checkpoint(path)
    for group in ("dataset", "model", "noise", "loss"):
        if ckpt["config"].get(group) != to_plain(cfg[group]):
            raise registry.ConfigError(
                f"cannot resume {path}: its {group} config {ckpt['config'].get(group)} differs "
                f"from this run's {to_plain(cfg[group])}; resume with the same {group} settings")
    return ckpt


def _why_fresh(cfg: DictConfig, path: Path) -> str:
    """Why a run starts at step 0 (its log says so), ``path`` its last.pt."""
    if resume_mode(cfg.trainer.resume) == "false":
        return "trainer.resume=false"
    return f"no checkpoint {path} to resume (trainer.resume=auto)"


# ----------------------------------------------------------------------------- logging
class TrainLogger:
    """TensorBoard scalars every ``log_every`` steps: loss, loss per noise level, gradient
    norm, learning rate, steps per second, read from ``run.monitor`` (the only reads of the
    device in the loop, with the finiteness check before them)."""

    MAX_LEVEL_CURVES = 16

    def __init__(self, run: Run):
        self.run, self.every = run, max(1, run.cfg.trainer.log_every)
        self.writer = run.writer
        n = len(run.sigmas)
        self.levels = sorted({round(i * (n - 1) / max(1, min(n, self.MAX_LEVEL_CURVES) - 1))
                              for i in range(min(n, self.MAX_LEVEL_CURVES))})
        self.last_loss = math.nan            # the mean loss of the last read, for the bar
        # Without a bar (stderr a file: SLURM, nohup, | tee) each read is also a log line.
        self.lines = False
        self.unit = loss_unit(run)
        self.t0 = time.perf_counter()

    def update(self, stats: StepStats) -> None:
        if self.run.step % self.every == 0:
            self.flush(stats)

    def flush(self, stats: StepStats) -> None:
        check_finite(self.run)
        step, w, monitor = self.run.step, self.writer, self.run.monitor
        count = max(1, monitor.count)
        self.last_loss = float(monitor.loss_sum) / count
        w.add_scalar("train/loss", self.last_loss, step)
        w.add_scalar("train/grad_norm", float(monitor.grad_norm), step)
        w.add_scalar("train/lr", stats.lr, step)
        steps_per_sec = count / (time.perf_counter() - self.t0)
        w.add_scalar("train/steps_per_sec", steps_per_sec, step)
        if self.lines:
            self.log_line(stats.lr, steps_per_sec)
        level_sum, level_count = monitor.level_sum.cpu(), monitor.level_count.cpu()
        for i in self.levels:
            if level_count[i] > 0:
                w.add_scalar(f"loss_per_sigma/{i:04d}_sigma_{float(self.run.sigmas[i]):.3g}",
                             level_sum[i] / level_count[i], step)
        monitor.reset()
        self.t0 = time.perf_counter()

    def log_line(self, lr: float, steps_per_sec: float) -> None:
        """One line of progress, what the bar would show: the step, the mean loss since the
        last line, the speed (steps/s and images/s over the global batch), lr, time left."""
        t = self.run.cfg.trainer
        left = (t.n_steps - self.run.step) / max(steps_per_sec, 1e-9)
        log.info("step %d/%d: loss %.5g%s, %.3g steps/s, %.0f img/s, lr %.3g, %s left",
                 self.run.step, t.n_steps, self.last_loss, self.unit, steps_per_sec,
                 steps_per_sec * t.batch_size, lr, _duration(left))


def nll_unit(dataset_cfg) -> str:
    """The unit of a flow's negative log-likelihood (see registry's loss=nll): bits/dim of
    dequantized images, nats for points."""
    return " bits/dim" if dataset_cfg.name in registry.IMAGE_DATASETS else " nats"


def loss_unit(run: Run) -> str:
    """The training loss's unit for the log: a likelihood's (loss=nll), else none (score
    matching's losses are squared score errors with no common unit)."""
    return nll_unit(run.cfg.dataset) if run.cfg.loss.name == "nll" else ""


# ----------------------------------------------------------------------------- evaluation
def test_loss(run: Run, max_batches: int = 10) -> float | None:
    """Mean objective on the held-out split with the sampling (EMA) weights (the objective's
    ``held_out`` one when it has one: a flow's negative log-likelihood), in evaluation mode
    (a batch-normalised flow scores with its running averages, not the test batch's)."""
    if run.data.test is None or len(run.data.test) == 0:
        return None
    loader = torch.utils.data.DataLoader(run.data.test, batch_size=run.cfg.trainer.batch_size)
    total, count = 0.0, 0
    with evaluating(run.sampling_net) as net:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x = first_tensor(batch).to(run.device)
            # Sliced and exact score matching differentiate with respect to x: keep grad on.
            with torch.enable_grad():
                per_sample, _ = getattr(run.objective, "held_out", run.objective)(net, x)
            total, count = total + per_sample.detach().sum().item(), count + len(x)
    return total / count


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
        with _autocast(run):
            return net(y, sigma).to(y.dtype)
    with evaluating(net), per_sample_noise(seed, indices, run.device):
        x = registry.initial_samples(run.cfg.sampler, len(indices), run.data.shape,
                                     run.sigmas, run.device)
        return run.sampler(score, x, return_trajectory=return_trajectory, progress=progress)


def rank_share(n: int) -> range:
    """This rank's contiguous part of ``n`` samples: the first ``n mod N`` of N ranks draw
    one more than the others; all of them in one process."""
    size, extra = divmod(n, distributed.world_size())
    k = distributed.rank()
    start = k * size + min(k, extra)
    return range(start, start + size + (k < extra))


def draw_shared(run: Run, n: int, return_trajectory: bool = False, progress: bool = False):
    """:func:`draw_samples` of ``n`` split over the ranks (:func:`rank_share`); rank 0
    gathers every rank's share and returns one process's result on the CPU, the other
    ranks return None."""
    mine = rank_share(n)
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


def network_evaluations(sampler_cfg, n_levels: int) -> int | None:
    """Network evaluations (NFE) of one chain (:func:`ncsn.registry.planned_nfe`; None for
    the ODE sampler, whose solver picks its steps)."""
    return registry.planned_nfe(sampler_cfg, n_levels)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def seconds_per_evaluation(run: Run, n: int) -> float:
    """Wall time of one evaluation of the sampling network on a batch of ``n`` (the second of
    two: the first pays for warm-up)."""
    x = torch.zeros(n, *run.data.shape, device=run.device)
    sigma = run.sigmas[-1:].to(run.device).expand(n) if registry.is_conditional(
        run.cfg.model) else None
    with evaluating(run.sampling_net) as net:
        for _ in range(2):
            _synchronize(run.device)
            start = time.perf_counter()
            with _autocast(run):
                net(x, sigma)
            _synchronize(run.device)
    return time.perf_counter() - start


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
             _duration(nfe * seconds))
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
    share = len(rank_share(n))
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
                    "NCSN_DIST_TIMEOUT_MIN", run.step, n, _duration(seconds), world,
                    _duration(2 * limit), fitted)
    return fitted


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2g} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@contextmanager
def evaluating(net: nn.Module):
    """``net`` in evaluation mode inside the block, back in training mode after: batch
    statistics (a batch-normalised flow) and dropout are training's alone."""
    net.eval()
    try:
        yield net
    finally:
        net.train()


@contextmanager
def _isolated_rng(device: torch.device):
    """Evaluation and pictures draw random numbers without disturbing training's stream,
    so a run's weights do not depend on how often it draws pictures."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def report(run: Run) -> None:
    """Held-out loss (``best.pt`` kept when it is the lowest, with trainer.keep_best) and
    pictures (2-D: score field, samples over data, trajectories; images: a grid of
    samples), saved under ``pictures/`` and to TensorBoard. Every rank calls it: rank 0
    scores the held-out loss, every rank draws its share of the pictures' samples
    (:func:`draw_shared`), rank 0 gathers them and draws the pictures."""
    if distributed.is_main():
        with _isolated_rng(run.device):
            loss = test_loss(run)
        if loss is not None:
            split = held_out_name(run.cfg.dataset)
            run.writer.add_scalar(f"{split}/loss", loss, run.step)
            unit = nll_unit(run.cfg.dataset) if registry.is_flow(run.cfg.model) else ""
            log.info("step %d: %s loss %.5g%s", run.step, split, loss, unit)
            keep_if_best(run, loss)
    with _isolated_rng(run.device):
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
            _report_points(run, samples, trajectory)
        elif run.data.kind == "images":
            grid = enlarge(samples[:64])
            viz.save_grid(grid, run.run_dir / "pictures" / f"samples_{run.step:08d}.png", nrow=8)
            run.writer.add_image("samples", viz.image_grid(grid, nrow=8), run.step)


def held_out_name(dataset_cfg) -> str:
    """What the held-out loss is scored on: "validation" when the dataset holds out a
    validation split (``dataset.validation_fraction``), else "test"."""
    return "validation" if dataset_cfg.get("validation_fraction", 0.0) > 0 else "test"


def keep_if_best(run: Run, loss: float) -> None:
    """trainer.keep_best: write checkpoints/best.pt when ``loss`` is the lowest held-out loss
    of the run so far (model selection on held-out data, as the sliced score matching code
    keeps its NICE)."""
    if not run.cfg.trainer.keep_best or not math.isfinite(loss):
        return
    if run.best_loss is None or loss < run.best_loss:
        run.best_loss = loss
        path = save_best(state_dict(run), run.run_dir / "checkpoints", loss)
        log.info("step %d: best %s loss so far, kept in %s", run.step,
                 held_out_name(run.cfg.dataset), path)


def _report_points(run: Run, samples: Tensor, trajectory: Tensor) -> None:
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


# ----------------------------------------------------------------------------- the loop
# SIGTERM: a preemption (SLURM, Kubernetes, torchrun stopping its workers); SIGUSR1 / SIGUSR2:
# the warning SLURM sends before the time limit (sbatch --signal; submitit asks for USR2).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextmanager
def _stop_on_signals(run: Run):
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


def _stop(run: Run, signum: int, previous_handler) -> TrainingInterrupted:
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


class _NoWriter:
    """What ranks other than 0 hold instead of a SummaryWriter: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


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
    main = distributed.is_main()
    if not main:
        logging.getLogger("ncsn").setLevel(logging.WARNING)     # one log for the whole run
    last = run_dir / "checkpoints" / "last.pt"
    found = distributed.broadcast_object(last.is_file())        # rank 0's run directory decides
    with distributed.all_or_none():
        ckpt = _resume_checkpoint(cfg, last, found)
    if ckpt is not None and ckpt["step"] >= cfg.trainer.n_steps:
        # Started again after it finished (resume=auto, a requeued job): say so rather than
        # save and report its end a second time.
        log.info("%s is at step %d of trainer.n_steps=%d: the run is complete, nothing to "
                 "train (raise trainer.n_steps to train on)", last, ckpt["step"],
                 cfg.trainer.n_steps)
        return last
    run = build_run(cfg, run_dir, sigmas=ckpt["sigmas"] if ckpt else None)
    if ckpt is not None:
        load_state(run, ckpt)
        log.info("resumed %s at step %d", last, run.step)
        if cfg.trainer.keep_best and main:
            run.best_loss = best_held_out_loss(run_dir / "checkpoints")
    else:
        log.info("started fresh at step 0: %s", _why_fresh(cfg, last))
    restarted = distributed.restarts()
    if restarted:
        log.info("%s", restarted)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    noise = ("a normalizing flow: no noise levels" if registry.is_flow(cfg.model) else
             f"{len(run.sigmas)} noise levels, sigma {float(run.sigmas[0]):.4g} -> "
             f"{float(run.sigmas[-1]):.4g}")
    log.info("model %s: %s parameters; %s; device %s%s", cfg.model.name,
             f"{_count_parameters(run.module):,}", noise, run.device,
             f"; {distributed.world_size()} processes" if distributed.is_distributed() else "")
    run.writer = SummaryWriter(str(run_dir / "tb")) if main else _NoWriter()
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
    with _stop_on_signals(run) as previous_handlers, bar, redirect:
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
                raise _stop(run, signum, previous_handlers.get(signum))
            if run.step % t.ckpt_every == 0 or run.step == t.n_steps:
                path = save(run)
            if t.sample_every > 0 and run.step % t.sample_every == 0 and run.step != t.n_steps:
                report(run)
    vote.close()
    path = path or save(run)
    report(run)
    log.info("done: %d steps; final checkpoint %s", run.step, path.parent / "last.pt")
    return path.parent / "last.pt"

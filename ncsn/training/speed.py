"""How fast a step runs: precision (autocast), CPU threads, channels-last, fused Adam,
torch.compile; see docs/PERFORMANCE.md for what each is worth."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

from ncsn import registry
from ncsn.training.context import evaluating

if TYPE_CHECKING:
    from ncsn.training.run import Run


@dataclass
class Speed:
    """How a step runs (set by :func:`apply_speed_options` from the trainer config): the
    autocast dtype (None: fp32), torch's gradient scaler (active for fp16 only), inputs in
    channels-last layout, a compiled network."""

    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    compiled: bool = False


PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# trainer.num_threads=auto: a step of fewer FLOPs than this runs on one CPU thread. Measured
# by scripts/bench_train.py --threads (docs/PERFORMANCE.md): below it a second thread gains
# little on an idle CPU and loses several times over on a busy one.
ONE_THREAD_FLOPS = 2e9


# trainer.precision=auto on the CPU: bf16 autocast for networks of at least this many forward
# FLOPs per sample, on CPUs that multiply bf16 in hardware (AMX tiles, or AVX-512 BF16's
# dot products). Measured by scripts/bench_train.py (docs/PERFORMANCE.md): NCSN and NCSNv2 on
# CIFAR-10 (20 GFLOP) train 2.1-2.7x faster in bf16 on this project's CPU (AMX), the digits'
# small U-Net (0.03 GFLOP) slower; a user's AMD EPYC with avx512_bf16 and no AMX trained
# NCSNv2 (CIFAR-10, batch 16) 1.8x faster in bf16 (2.69 against 1.49 img/s).
CPU_BF16_FLOPS = 1e9


def _cpu_multiplies_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively: AMX tiles or AVX-512 BF16 (torch's oneDNN
    uses either for bf16 matmuls and convolutions; torch exposes the checks privately)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(name: str, device: torch.device, sample_flops: float = 0.0) -> str:
    """trainer.precision -> fp32 | tf32 | bf16 | fp16. auto: bf16 on a CUDA device that has
    it (tf32 on older ones); on the CPU, bf16 for a network of ``sample_flops`` (forward,
    one sample) >= CPU_BF16_FLOPS on a CPU that multiplies bf16 natively (AMX or AVX-512
    BF16), fp32 otherwise."""
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

"""Benchmark: training speed of every network at its paper size, each speed option on and off.

    python scripts/bench_train.py [--device cpu|cuda] [--batch N] [--steps N]
                                  [--networks ...] [--options ...] [--json FILE]
    python scripts/bench_train.py --threads        # the basis of trainer.num_threads=auto
    python scripts/bench_train.py --contention     # the quick start beside two busy processes

Each (network, option set) runs in its own process (its own threads, compile caches and
peak memory): a few warm-up steps, then ``--steps`` timed ones of ``ncsn.training.train_step``
on random data of the dataset's shape (a step's cost does not depend on the pixels). It
reports images per second, peak memory (CUDA: max allocated; CPU: the process's peak
resident set), FLOPs per image of a whole step (forward and backward) counted with
torch.utils.flop_counter, and the model FLOPs utilisation: achieved FLOP/s over the
device's peak, measured in the same process by a large matmul in the step's dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from ncsn import registry
from ncsn import training
from ncsn.config import config_dir, register_configs
from ncsn.data import Data

# name -> (experiment, overrides): the papers' networks at their sizes, and the quick starts.
NETWORKS = {
    "swissroll_cond_mlp": ("swissroll", []),
    "digits_unet_small": ("digits", []),
    "ncsn_cifar10": ("ncsn_cifar10", []),
    "ncsnv2_cifar10": ("ncsnv2_cifar10", []),
    "ncsnv2_celeba64": ("ncsnv2_celeba", []),
}
PLAIN = ["trainer.precision=fp32", "trainer.channels_last=false", "trainer.fused_adam=false",
         "trainer.compile=false"]
OPTIONS = {
    "fp32_eager": PLAIN,
    "default": [],
    "bf16": PLAIN + ["trainer.precision=bf16"],
    "fp16": PLAIN + ["trainer.precision=fp16"],
    "tf32": PLAIN + ["trainer.precision=tf32"],
    "channels_last": PLAIN + ["trainer.channels_last=true"],
    "fused_adam": PLAIN + ["trainer.fused_adam=true"],
    "compile": PLAIN + ["trainer.compile=true"],
    "bf16_cl_compile": PLAIN + ["trainer.precision=bf16", "trainer.channels_last=true",
                                "trainer.compile=true", "trainer.fused_adam=true"],
}
REPEATS = 3
CPU_OPTIONS = ["fp32_eager", "default", "bf16", "fp16", "channels_last", "fused_adam", "compile"]
CUDA_OPTIONS = ["fp32_eager", "default", "tf32", "bf16", "fp16", "channels_last", "fused_adam",
                "compile", "bf16_cl_compile"]


def compose_cfg(network: str, overrides: list[str]):
    experiment, extra = NETWORKS[network]
    register_configs()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *extra,
                                           "trainer.progress=false", *overrides])


def synthetic_data(cfg) -> Data:
    """Random data of the configured dataset's shape (2-D points or images in [0, 1])."""
    g = torch.Generator().manual_seed(0)
    if cfg.dataset.name in registry.IMAGE_DATASETS:
        channels = 1 if cfg.dataset.name in ("mnist", "fashion_mnist", "digits") else 3
        shape = (channels, cfg.dataset.image_size, cfg.dataset.image_size)
        images = torch.rand(2048, *shape, generator=g)
        return Data(TensorDataset(images), None, shape=shape, kind="images")
    return Data(TensorDataset(torch.randn(4096, 2, generator=g)), None, shape=(2,))


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype``: the device's practical peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    repeats = 20 if device.type == "cuda" else 3
    training.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    training.synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def step_flops(run, x) -> float:
    """FLOPs of one whole training step (forward and backward) on the batch ``x``."""
    with FlopCounterMode(display=False) as counter:
        per_sample, _ = run.objective(run.net, x)
        per_sample.mean().backward()
    run.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10   # KiB on Linux


def measure_one(network: str, option: str, device: str, batch: int | None, steps: int,
                warmup: int, threads: int | None) -> dict:
    """Time ``steps`` training steps of ``network`` with the option set ``option``."""
    overrides = [*OPTIONS[option], f"trainer.device={device}"]
    if batch is not None:
        overrides.append(f"trainer.batch_size={batch}")
    if threads is not None:
        overrides.append(f"trainer.num_threads={threads}")
    cfg = compose_cfg(network, overrides)
    registry.build_data = lambda _cfg: synthetic_data(cfg)          # no dataset files needed
    run = training.build_run(cfg, tempfile.mkdtemp(prefix="bench_train_"))
    n = cfg.trainer.batch_size
    x = run.data.train.tensors[0][:n].to(run.device)
    flops = step_flops(run, x) / n
    start = time.perf_counter()
    for _ in range(warmup):
        training.train_step(run, x)
    training.synchronize(run.device)
    warmup_s = time.perf_counter() - start
    windows = []
    for _ in range(REPEATS):                 # the best of a few windows: the CPU is shared
        start = time.perf_counter()
        for _ in range(steps):
            training.train_step(run, x)
        training.check_finite(run)                                 # reads the device: syncs
        training.synchronize(run.device)
        windows.append((time.perf_counter() - start) / steps)
    seconds = min(windows)
    peak = matmul_peak(run.device, run.speed.amp_dtype or torch.float32)
    images_per_s = n / seconds
    return {"network": network, "option": option, "device": str(run.device),
            "batch": n, "threads": torch.get_num_threads(), "steps": steps,
            "seconds_per_step": seconds, "warmup_seconds": warmup_s,
            "images_per_s": images_per_s, "flops_per_image": flops,
            "peak_flops": peak, "mfu": flops * images_per_s / peak,
            "peak_memory_mb": peak_memory_mb(run.device),
            "parameters": sum(p.numel() for p in run.net.parameters())}


def in_subprocess(args: list[str], timeout: float, script: str = __file__) -> dict | None:
    """Run ``script`` (this one by default) with ``--one`` in a fresh process; its JSON
    line, or None."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {' '.join(args)}: over {timeout:.0f} s, skipped", file=sys.stderr)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {' '.join(args)}: failed: {tail}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def machine() -> dict:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.machine()) \
        if Path("/proc/cpuinfo").is_file() else platform.machine()
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": name if torch.cuda.is_available() else None,
            "torch": torch.__version__, "load_average": os.getloadavg()}


def print_table(rows: list[dict]) -> None:
    print(f"{'network':22} {'option':16} {'batch':>5} {'thr':>3} {'img/s':>9} {'x plain':>7} "
          f"{'GFLOP/img':>9} {'MFU':>6} {'peak MB':>8}")
    base = {r["network"]: r["images_per_s"] for r in rows if r["option"] == "fp32_eager"}
    for r in rows:
        speedup = r["images_per_s"] / base[r["network"]] if r["network"] in base else float("nan")
        print(f"{r['network']:22} {r['option']:16} {r['batch']:5d} {r['threads']:3d} "
              f"{r['images_per_s']:9.1f} {speedup:7.2f} {r['flops_per_image'] / 1e9:9.3f} "
              f"{r['mfu']:6.1%} {r['peak_memory_mb']:8.0f}")


# ----------------------------------------------------------------------------- threads
def threads_table(args) -> list[dict]:
    """Step time at 1 thread and at torch's default, for each network: where a second thread
    starts to pay is the threshold of trainer.num_threads=auto."""
    rows = []
    for network in args.networks:
        for threads in (1, os.cpu_count()):
            one = ["--one", network, "fp32_eager", "--device", "cpu", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads-one", str(threads)]
            if args.batch:
                one += ["--batch", str(args.batch)]
            row = in_subprocess(one, args.timeout)
            if row:
                row["step_flops"] = row["flops_per_image"] * row["batch"]
                rows.append(row)
                print(f"{network:22} threads {threads}: {row['seconds_per_step'] * 1e3:9.1f} ms "
                      f"a step, {row['step_flops'] / 1e9:8.3f} GFLOP a step", flush=True)
    return rows


# ----------------------------------------------------------------------------- contention
def busy() -> subprocess.Popen:
    """A process that keeps one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def quick_start_seconds(n_steps: int, threads: str) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of ``ncsn-train experiment=swissroll`` for
    ``n_steps`` steps, start-up included (the command a user types). The CPU time tells
    a smaller share of the cores (wall up, CPU time the same) from threads that waste
    their time waiting for each other (CPU time up too)."""
    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).parent / "ncsn-train"), "experiment=swissroll",
                   f"trainer.n_steps={n_steps}", "trainer.n_plot_samples=0",
                   f"trainer.num_threads={threads}", f"hydra.run.dir={out}"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def contention_table(args) -> dict:
    """The quick start alone and beside two busy processes, with num_threads auto and null."""
    results = {"n_steps": args.quick_steps}
    for threads in args.contention_threads:
        results[f"load_before_{threads}"] = os.getloadavg()[0]
        results[f"idle_{threads}"], results[f"idle_cpu_{threads}"] = quick_start_seconds(
            args.quick_steps, threads)
        hogs = [busy(), busy()]
        try:
            results[f"busy_{threads}"], results[f"busy_cpu_{threads}"] = quick_start_seconds(
                args.quick_steps, threads)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        print(f"num_threads={threads}: alone {results[f'idle_{threads}']:.1f} s wall "
              f"({results[f'idle_cpu_{threads}']:.1f} s CPU), beside two busy processes "
              f"{results[f'busy_{threads}']:.1f} s wall ({results[f'busy_cpu_{threads}']:.1f} s "
              f"CPU); load average before: {results[f'load_before_{threads}']:.1f}", flush=True)
    for threads in args.contention_threads:
        results[f"ratio_{threads}"] = results[f"busy_{threads}"] / results[f"idle_{threads}"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--options", nargs="*", choices=list(OPTIONS),
                        help="option sets (default: all that exist on the device)")
    parser.add_argument("--batch", type=int, help="batch size (default: the paper's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--threads", action="store_true", help="1 thread against the default")
    parser.add_argument("--contention", action="store_true",
                        help="the quick start alone and beside two busy processes")
    parser.add_argument("--quick-steps", type=int, default=1500)
    parser.add_argument("--contention-threads", nargs="*", default=["auto"],
                        help="trainer.num_threads values to compare (auto, null, 1, 2, ...)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--one", nargs=2, metavar=("NETWORK", "OPTION"), help=argparse.SUPPRESS)
    parser.add_argument("--threads-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure_one(*args.one, args.device, args.batch, args.steps,
                                     args.warmup, args.threads_one)))
        return
    results = {"machine": machine(), "device": args.device}
    if args.contention:
        results["contention"] = contention_table(args)
    elif args.threads:
        results["threads"] = threads_table(args)
    else:
        options = args.options or (CUDA_OPTIONS if args.device.startswith("cuda") else CPU_OPTIONS)
        rows = []
        for network in args.networks:
            for option in options:
                one = ["--one", network, option, "--device", args.device,
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
                if args.batch:
                    one += ["--batch", str(args.batch)]
                row = in_subprocess(one, args.timeout)
                if row:
                    rows.append(row)
                    print(f"{network:22} {option:16} {row['images_per_s']:9.1f} img/s", flush=True)
        print_table(rows)
        results["train"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

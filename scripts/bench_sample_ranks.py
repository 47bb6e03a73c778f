"""Benchmark: per-sample seeds' cost, and ncsn-sample over 1 and 2 ranks on the CPU.

    python scripts/bench_sample_ranks.py [--seeds] [--ranks] [--batch N] [--steps S]
                                         [--n-samples N] [--json FILE]

``--seeds``: the chain noise of annealed Langevin drawn three ways, on a batch of ``--batch``
chains for ``--steps`` steps: torch's global generator (``torch.randn_like``, the library
outside ``per_sample_noise``), one generator per sample called at every step (the naive
StackedRandomGenerator of EDM's generate.py), and one generator per sample drawing
``steps_ahead`` steps at a time (what ``ncsn.sampling.SampleNoise`` does). Timed for the
noise alone and for whole chains of the 2-D toy MLP and of the digits' small U-Net (random
weights: the speed does not depend on them).

``--ranks``: ``ncsn-sample`` of ``--n-samples`` digits (a checkpoint trained for 2 steps,
n_steps_each=2: 43 network evaluations a chain) in one process with 1 and 2 threads and under
``torchrun --nproc_per_node=2`` (one thread a rank, gloo); the sampling time is read from the
log (first to last line), the wall time includes starting Python; the shards are compared
byte for byte. The load average is printed beside each row: the machine may be shared.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ncsn import sampling
from ncsn import training
from ncsn.config import config_dir, register_configs

register_configs()
REPO = Path(__file__).resolve().parents[1]
TOY = ["trainer.device=cpu", "trainer.progress=false", "trainer.n_plot_samples=0"]
DIGITS = ["experiment=digits", *TOY]


def compose_train(overrides):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def load() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- --seeds
NOISE = {
    "global": lambda n, device: nullcontext(),
    "per-sample, every step": lambda n, device: _naive(n, device),
    "per-sample, drawn ahead": lambda n, device: sampling.per_sample_noise(0, range(n), device),
}


class _naive:
    """per_sample_noise with one generator call per sample and step (steps_ahead = 1)."""

    def __init__(self, n, device):
        self.inner = sampling.per_sample_noise(0, range(n), device)

    def __enter__(self):
        self.saved = sampling.NOISE_FLOATS_PER_SAMPLE
        sampling.NOISE_FLOATS_PER_SAMPLE = 1
        return self.inner.__enter__()

    def __exit__(self, *exc):
        sampling.NOISE_FLOATS_PER_SAMPLE = self.saved
        return self.inner.__exit__(*exc)


def time_noise(shape, batch: int, steps: int, how: str) -> float:
    """Seconds per step of drawing the chain noise alone."""
    x = torch.zeros(batch, *shape)
    with NOISE[how](batch, "cpu"):
        start = time.perf_counter()
        for _ in range(steps):
            sampling.randn_like(x)
        return (time.perf_counter() - start) / steps


def time_chain(overrides, batch: int, steps: int, how: str) -> tuple[float, tuple]:
    """Seconds per step of annealed Langevin (one level, ``steps`` steps) on ``batch``."""
    cfg = compose_train([*overrides, f"sampler.n_steps_each={steps}", "sampler.denoise=false"])
    run = training.build_run(cfg, tempfile.mkdtemp(prefix="bench_seeds_"))
    sampler = sampling.annealed_langevin
    x = torch.rand(batch, *run.data.shape)
    net = run.sampling_net.eval()
    with torch.no_grad():
        net(x, run.sigmas[:1].expand(batch))                       # warm-up
    with NOISE[how](batch, "cpu"):
        start = time.perf_counter()
        sampler(net, x, run.sigmas[:1], cfg.sampler.step_lr, steps)
        return (time.perf_counter() - start) / steps, run.data.shape


def bench_seeds(batch: int, steps: int) -> list[dict]:
    rows = []
    for name, overrides in (("2-D toy MLP", TOY), ("digits U-Net", DIGITS)):
        chain_steps = steps if name == "2-D toy MLP" else max(2, steps // 10)
        for how in NOISE:
            chain, shape = time_chain(overrides, batch, chain_steps, how)
            noise = time_noise(shape, batch, steps, how)
            rows.append({"net": name, "shape": list(shape), "noise": how, "batch": batch,
                         "steps_ahead": sampling.steps_ahead(int(torch.Size(shape).numel())),
                         "noise_ms": noise * 1e3, "chain_ms": chain * 1e3,
                         "chain_steps": chain_steps, "load": load()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_seeds(rows: list[dict]) -> None:
    print(f"\n| chains | sample | noise drawn from | ahead | noise ms/step | chain ms/step | "
          f"chain × global | load |\n|---|---|---|---|---|---|---|---|")
    base = {r["net"]: r["chain_ms"] for r in rows if r["noise"] == "global"}
    for r in rows:
        ahead = r["steps_ahead"] if r["noise"] == "per-sample, drawn ahead" else \
            (1 if r["noise"].startswith("per-sample") else "-")
        print(f"| {r['batch']} {r['net']} | {tuple(r['shape'])} | {r['noise']} | {ahead} | "
              f"{r['noise_ms']:.3f} | {r['chain_ms']:.3f} | {r['chain_ms'] / base[r['net']]:.2f} "
              f"| {r['load']:.1f} |")


# ----------------------------------------------------------------------------- --ranks
def log_seconds(log: Path) -> float:
    """First to last timestamp of a Hydra job log ([YYYY-mm-dd HH:MM:SS,mmm])."""
    stamps = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
              for line in log.read_text().splitlines() if line.startswith("[")]
    return (stamps[-1] - stamps[0]).total_seconds()


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted((folder / "shards").iterdir()):
        h.update(shard.read_bytes())
    return h.hexdigest()[:12]


def sample_once(ckpt: Path, out: Path, n: int, batch: int, ranks: int, threads: int) -> dict:
    args = ["-m", "ncsn.cli.sample", f"ckpt={ckpt}", f"n_samples={n}", f"batch_size={batch}",
            "device=cpu", "save_as=npz", f"hydra.run.dir={out}"]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    before = load()
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - start
    return {"ranks": ranks, "threads": threads, "n": n, "batch": batch, "wall_s": wall,
            "sampling_s": log_seconds(out / "sample.log"), "shards": digest(out),
            "load": before}


def bench_ranks(n: int, batch: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="bench_ranks_"))
    cfg = compose_train([*DIGITS, "trainer.n_steps=2", "trainer.batch_size=8",
                         "sampler.n_steps_each=2"])
    ckpt = training.train(cfg, root / "run")
    rows = []
    for ranks, threads in ((1, 1), (1, 2), (2, 1)):
        rows.append(sample_once(ckpt, root / f"r{ranks}t{threads}", n, batch, ranks, threads))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_ranks(rows: list[dict]) -> None:
    print(f"\n| ranks × threads | samples | batch | sampling s | wall s | × 1 rank, 1 thread | "
          f"shards (sha256) | load |\n|---|---|---|---|---|---|---|---|")
    base = rows[0]["sampling_s"]
    for r in rows:
        print(f"| {r['ranks']} × {r['threads']} | {r['n']} | {r['batch']} | "
              f"{r['sampling_s']:.1f} | {r['wall_s']:.1f} | {base / r['sampling_s']:.2f} | "
              f"{r['shards']} | {r['load']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", action="store_true", help="per-sample noise's cost")
    parser.add_argument("--ranks", action="store_true", help="ncsn-sample over 1 and 2 ranks")
    parser.add_argument("--batch", type=int, default=1000, help="chains (--seeds)")
    parser.add_argument("--steps", type=int, default=200, help="chain steps (--seeds)")
    parser.add_argument("--n-samples", type=int, default=400, help="samples (--ranks)")
    parser.add_argument("--sample-batch", type=int, default=50, help="batch_size (--ranks)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    both = not (args.seeds or args.ranks)
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    if args.seeds or both:
        results["seeds"] = bench_seeds(args.batch, args.steps)
        print_seeds(results["seeds"])
    if args.ranks or both:
        results["ranks"] = bench_ranks(args.n_samples, args.sample_batch)
        print_ranks(results["ranks"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

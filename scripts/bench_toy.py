"""Benchmark: train experiment=swissroll with its default budget, sample 5,000 points and
measure the sliced Wasserstein distance (256 directions) to 5,000 fresh Swiss-roll points.

    python scripts/bench_toy.py [--overrides key=value ...] [--json results.json]

Prints a table: training time, sampling time, the distance to several fresh draws, and the
floor (the distance between two independent fresh draws of the roll, for scale).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ncsn.checkpoint import load_checkpoint
from ncsn.config import config_dir, register_configs
from ncsn.data.toy import swiss_roll
from ncsn.generate import sample
from ncsn.metrics.toy import sliced_wasserstein
from ncsn.training import train

N_POINTS, N_DRAWS, N_SEEDS = 5000, 5, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--run-dir", type=Path, help="keep the run here (default: a temp dir)")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=swissroll", "trainer.progress=false",
                                          "trainer.n_plot_samples=0", *args.overrides])
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="bench_toy_"))
    t0 = time.perf_counter()
    ckpt_path = train(cfg, run_dir)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples = [sample(ckpt_path, N_POINTS, seed=seed) for seed in range(N_SEEDS)]
    sample_s = (time.perf_counter() - t0) / N_SEEDS

    # The distance between two 5,000-point sets varies by about +-0.005 from draw to draw,
    # so it is averaged over several sample seeds and fresh draws.
    fresh = [swiss_roll(N_POINTS, seed=10_000 + i, noise=cfg.dataset.noise) for i in range(N_DRAWS)]
    other = [swiss_roll(N_POINTS, seed=20_000 + i, noise=cfg.dataset.noise) for i in range(N_DRAWS)]
    distance = torch.tensor([sliced_wasserstein(s, f) for s in samples for f in fresh])
    floor = torch.tensor([sliced_wasserstein(o, f) for o in other for f in fresh])
    results = {
        "steps": load_checkpoint(ckpt_path)["step"], "train_seconds": round(train_s, 1),
        "sample_seconds": round(sample_s, 1), "threads": torch.get_num_threads(),
        "swd_mean": round(distance.mean().item(), 4), "swd_std": round(distance.std().item(), 4),
        "floor_mean": round(floor.mean().item(), 4), "floor_std": round(floor.std().item(), 4),
        "overrides": args.overrides,
    }
    rows = [("training steps", results["steps"]),
            ("training time (s)", results["train_seconds"]),
            (f"sampling {N_POINTS} points (s)", results["sample_seconds"]),
            ("torch threads", results["threads"]),
            (f"SWD to fresh roll (mean ± std, {N_SEEDS} seeds x {N_DRAWS} draws)",
             f"{results['swd_mean']:.4f} ± {results['swd_std']:.4f}"),
            ("floor: SWD between independent fresh draws",
             f"{results['floor_mean']:.4f} ± {results['floor_std']:.4f}")]
    width = max(len(r[0]) for r in rows)
    print(f"{'bench_toy: experiment=swissroll':<{width}} | value")
    print("-" * width + "-+-" + "-" * 16)
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

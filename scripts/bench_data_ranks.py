"""Benchmark: the data-loading work of each rank, with 1 and 2 ranks.

    python scripts/bench_data_ranks.py [--images 256] [--size 64] [--batch 32] [--steps 8]
                                       [--ranks 1 2] [--json FILE]

Writes a folder of ``--images`` PNG files (class subfolders, ``--size`` px), then, for each
world size N, starts N processes that each draw their rows of the same global batches through
``ncsn.data.training_batches`` (dataset=image_folder at 32 px, random flips and uniform
dequantization: decode, resize, flip, dequantize) for ``--steps`` steps, as the ranks of a
training run do. It prints a table: images opened (decoded) per rank and step, seconds per
step for each rank's loader, and whether the ranks' rows put together are the one-process
batches, bit for bit. The processes run at once on one thread each, so the CPU's load is
part of what the table shows.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image

from ncsn.data import training_batches
from ncsn.data.images import build_image_data


def write_folder(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        folder = root / f"class{k % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k:05d}.png")


def one_rank(rank: int, world: int, root: str, batch: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    opened, real_open = [], Image.open

    def counting(fp, *args, **kwargs):
        opened.append(str(getattr(fp, "name", fp)))
        return real_open(fp, *args, **kwargs)
    Image.open = counting
    data = build_image_data({"name": "image_folder", "root": root, "image_size": 32,
                             "random_flip": True, "uniform_dequantization": True,
                             "num_workers": 0, "load_test": False, "test_fraction": 0.0})
    size = batch // world
    rows = slice(rank * size, (rank + 1) * size)      # distributed.shard for this world size
    batches = training_batches(data, batch, torch.Generator(), seed=0, rows=rows)
    start, drawn = time.perf_counter(), []
    for _ in range(steps):
        drawn.append(next(batches))
    seconds = (time.perf_counter() - start) / steps
    torch.save({"opened": len(opened), "seconds": seconds, "batches": torch.stack(drawn)},
               Path(out) / f"rank{rank}.pt")


def measure(world: int, root: Path, batch: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(one_rank, args=(world, str(root), batch, steps, out), nprocs=world,
                           start_method="spawn")
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
    return {"world": world, "opened_per_rank_step": [r["opened"] / steps for r in ranks],
            "seconds_per_step": [r["seconds"] for r in ranks],
            "batches": torch.cat([r["batches"] for r in ranks], dim=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.images, args.size)
        results = [measure(n, Path(tmp), args.batch, args.steps) for n in args.ranks]
    reference = results[0]["batches"]
    print(f"image folder: {args.images} PNGs of {args.size} px -> 32 px, global batch "
          f"{args.batch}, {args.steps} steps; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'ranks':>5}  {'images decoded per rank and step':>34}  "
          f"{'s per step per rank':>22}  same rows as {args.ranks[0]} rank(s)")
    rows = []
    for r in results:
        same = torch.equal(r["batches"], reference)
        opened = ", ".join(f"{v:g}" for v in r["opened_per_rank_step"])
        seconds = ", ".join(f"{v:.3f}" for v in r["seconds_per_step"])
        print(f"{r['world']:>5}  {opened:>34}  {seconds:>22}  {'yes' if same else 'NO'}")
        rows.append({k: v for k, v in r.items() if k != "batches"} | {"same_rows": same})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

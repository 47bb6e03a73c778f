"""Throughput of the FID Inception network, and the cost of one 2048-d Frechet distance.

Uses randomly initialised weights (speed does not depend on them), so it runs offline:

    python scripts/bench_eval.py                       # CPU, batch sizes 16 and 50
    python scripts/bench_eval.py --device cuda --batch-sizes 50 200 --json bench_eval.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from ncsn.metrics import fid_inception_v3, frechet_distance


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def images_per_second(model: torch.nn.Module, batch: int, size: int, iters: int,
                      device: torch.device) -> float:
    """Images per second of model(x) on (batch, 3, size, size) inputs, after one warm-up."""
    x = torch.rand(batch, 3, size, size, device=device)
    model(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def frechet_seconds(dim: int = 2048, n: int = 4096, seed: int = 0) -> float:
    """Wall time of frechet_distance on two full-rank (dim, dim) covariances."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, dim)), rng.standard_normal((n, dim)) + 0.1
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    start = time.perf_counter()
    frechet_distance(mu1, s1, mu2, s2)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 50])
    parser.add_argument("--size", type=int, default=32, help="input side (resized to 299)")
    parser.add_argument("--iters", type=int, default=3, help="timed batches per batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = fid_inception_v3(random_init=True, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"FID Inception-v3 on {device} ({where}), {args.size}px inputs resized to 299")
    print(f"{'batch':>6} {'images/s':>10} {'s/batch':>9}")
    rows = []
    for batch in args.batch_sizes:
        ips = images_per_second(model, batch, args.size, args.iters, device)
        rows.append({"batch": batch, "images_per_s": ips, "s_per_batch": batch / ips})
        print(f"{batch:>6} {ips:>10.1f} {batch / ips:>9.2f}")
    fd = frechet_seconds()
    print(f"frechet_distance, 2048-d full-rank covariances: {fd:.2f} s")
    if args.json:
        result = {"device": str(device), "device_name": where, "size": args.size,
                  "iters": args.iters, "torch": torch.__version__, "rows": rows,
                  "frechet_2048_s": fd}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

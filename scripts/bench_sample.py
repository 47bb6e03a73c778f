"""Benchmark: sampling speed, network evaluations per second, each speed option on and off.

    python scripts/bench_sample.py [--device cpu|cuda] [--batch N] [--levels K]
                                   [--networks ...] [--options ...] [--json FILE]

Each (network, option set) runs in its own process: annealed Langevin over the first
``--levels`` noise levels of the network's paper setup (its n_steps_each steps each, then
the denoising step when the setup has it), on a batch of ``--batch`` chains, through
``ncsn.training.draw_samples`` (the picture sampling of a training run: EMA weights, the run's
autocast). It reports network evaluations per second (one evaluation = the network on the
whole batch), images-evaluations per second, FLOPs per image and evaluation
(torch.utils.flop_counter), the model FLOPs utilisation against a large matmul measured in
the same process, and peak memory. The options are those of scripts/bench_train.py; with
``compile`` the sampling network itself is compiled.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (NETWORKS, OPTIONS, compose_cfg, in_subprocess, machine,  # noqa: E402
                         matmul_peak, peak_memory_mb, synthetic_data)

from ncsn import registry  # noqa: E402
from ncsn import training  # noqa: E402

CPU_OPTIONS = ["fp32_eager", "default", "bf16", "channels_last", "compile"]
CUDA_OPTIONS = ["fp32_eager", "default", "tf32", "bf16", "channels_last", "compile",
                "bf16_cl_compile"]


def measure_one(network: str, option: str, device: str, batch: int, levels: int) -> dict:
    cfg = compose_cfg(network, [*OPTIONS[option], f"trainer.device={device}"])
    registry.build_data = lambda _cfg: synthetic_data(cfg)
    run = training.build_run(cfg, tempfile.mkdtemp(prefix="bench_sample_"))
    net = run.sampling_net
    if run.speed.compiled and net is not run.net:
        net.compile()
    sigmas = run.sigmas[:levels] if cfg.sampler.name == "annealed_langevin" else run.sigmas
    run.sampler = registry.build_sampler(cfg.sampler, sigmas)
    nfe = training.network_evaluations(cfg.sampler, len(sigmas))
    x = torch.zeros(batch, *run.data.shape, device=run.device)
    sigma = run.sigmas[:1].to(run.device).expand(batch) if registry.is_conditional(
        cfg.model) else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, sigma)
    flops = counter.get_total_flops() / batch
    start = time.perf_counter()
    training.seconds_per_evaluation(run, batch)                      # warm-up (and compile)
    warmup_s = time.perf_counter() - start
    estimate = training.seconds_per_evaluation(run, batch)
    training.synchronize(run.device)
    start = time.perf_counter()
    samples = training.draw_samples(run, batch)
    training.synchronize(run.device)
    seconds = time.perf_counter() - start
    peak = matmul_peak(run.device, run.speed.amp_dtype or torch.float32)
    evaluations_per_s = nfe / seconds
    return {"network": network, "option": option, "device": str(run.device), "batch": batch,
            "threads": torch.get_num_threads(), "levels": len(sigmas), "nfe": nfe,
            "seconds": seconds, "warmup_seconds": warmup_s,
            "evaluations_per_s": evaluations_per_s,
            "image_evaluations_per_s": evaluations_per_s * batch,
            "estimate_seconds": estimate * nfe, "flops_per_image_evaluation": flops,
            "peak_flops": peak, "mfu": flops * batch * evaluations_per_s / peak,
            "peak_memory_mb": peak_memory_mb(run.device),
            "finite": bool(torch.isfinite(samples).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--options", nargs="*", choices=list(OPTIONS))
    parser.add_argument("--batch", type=int, default=8, help="chains sampled together")
    parser.add_argument("--levels", type=int, default=2, help="noise levels run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--one", nargs=2, metavar=("NETWORK", "OPTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure_one(*args.one, args.device, args.batch, args.levels)))
        return
    options = args.options or (CUDA_OPTIONS if args.device.startswith("cuda") else CPU_OPTIONS)
    rows = []
    for network in args.networks:
        for option in options:
            row = in_subprocess(["--one", network, option, "--device", args.device,
                                 "--batch", str(args.batch), "--levels", str(args.levels)],
                                args.timeout, script=__file__)
            if row:
                rows.append(row)
                print(f"{network:22} {option:16} {row['evaluations_per_s']:9.2f} NFE/s",
                      flush=True)
    print(f"{'network':22} {'option':16} {'batch':>5} {'NFE':>5} {'NFE/s':>9} {'x plain':>7} "
          f"{'GFLOP/img':>9} {'MFU':>6} {'estimate/real':>13}")
    base = {r["network"]: r["evaluations_per_s"] for r in rows if r["option"] == "fp32_eager"}
    for r in rows:
        speedup = r["evaluations_per_s"] / base[r["network"]] if r["network"] in base \
            else float("nan")
        print(f"{r['network']:22} {r['option']:16} {r['batch']:5d} {r['nfe']:5d} "
              f"{r['evaluations_per_s']:9.2f} {speedup:7.2f} "
              f"{r['flops_per_image_evaluation'] / 1e9:9.3f} {r['mfu']:6.1%} "
              f"{r['estimate_seconds'] / r['seconds']:13.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "device": args.device,
                                         "sample": rows}, indent=1))


if __name__ == "__main__":
    main()

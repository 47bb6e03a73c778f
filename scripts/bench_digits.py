"""Benchmark: train experiment=digits with its default budget (or take a checkpoint), sample
digits and judge them with a small classifier trained on the real digits.

    python scripts/bench_digits.py [--ckpt RUN/checkpoints/last.pt] [--n-samples 500]
                                   [--overrides key=value ...] [--grid docs/digits_samples.png]
                                   [--json results.json]

Prints a table: training time, sampling time, the classifier's mean max-softmax confidence
on the samples (and on real held-out digits, for scale), how many of the ten classes the
samples cover and how evenly, and the Frechet distance in the classifier's feature space.
The classifier is ncsn.metrics.digits' CNN, trained on the digits' training split and cached.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir

from ncsn.checkpoint import load_checkpoint
from ncsn.config import config_dir, register_configs
from ncsn.generate import sample_batches, sampler_config
from ncsn.image_io import save_picture
from ncsn.metrics.digits import digits_metrics, digits_split, load_digits_classifier
from ncsn.training import train


def train_digits(overrides: list[str], run_dir: Path) -> tuple[Path, float, int]:
    """Train experiment=digits into ``run_dir``: (checkpoint, seconds, steps)."""
    register_configs()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits", "trainer.progress=false",
                                          *overrides])
    start = time.perf_counter()
    ckpt = train(cfg, run_dir)
    return ckpt, time.perf_counter() - start, cfg.trainer.n_steps


def judge(samples: torch.Tensor) -> dict:
    """Confidence, class histogram and classifier-feature FID of (N, 1, 8, 8) digits in
    [0, 1], with the same numbers for real digits."""
    classifier = load_digits_classifier()           # trained once (seconds), then cached
    train_split, _, heldout, _ = digits_split()
    real = digits_metrics(heldout, classifier)
    # The distance between two real sets gives the scale: training digits vs held-out ones.
    real["fid"] = digits_metrics(train_split[:len(heldout)], classifier)["fid"]
    return {"samples": digits_metrics(samples, classifier), "real": real,
            "classifier": "ncsn.metrics.digits CNN"}


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="judge this checkpoint instead of training")
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--sampler", nargs="*", default=[],
                        help="sampler keys for sampling, e.g. n_steps_each=10 step_lr=2e-5")
    parser.add_argument("--run-dir", type=Path, help="keep the run here (default: a temp dir)")
    parser.add_argument("--grid", type=Path, help="save a grid of the first 64 samples here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path = args.ckpt
        if ckpt_path is None:
            ckpt_path, seconds, steps = train_digits(args.overrides, args.run_dir or Path(tmp))
            results.update(train_seconds=seconds, train_steps=steps)
        ckpt = load_checkpoint(ckpt_path)
        start = time.perf_counter()
        keys = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.sampler)}
        sampler = sampler_config(ckpt["config"]["sampler"], keys)
        samples = torch.cat(list(sample_batches(ckpt, args.n_samples, args.batch_size,
                                                seed=args.seed, sampler_cfg=sampler,
                                                device="cpu")))
        results["sample_seconds"] = time.perf_counter() - start
    results.update(n_samples=len(samples), noise_levels=len(ckpt["sigmas"]),
                   sigma_begin=float(ckpt["sigmas"][0]), steps_per_level=sampler["n_steps_each"],
                   step_lr=sampler["step_lr"], **judge(samples))
    if args.grid:
        save_picture(samples[:64], args.grid)

    s, real = results["samples"], results["real"]
    hist = s["histogram"]
    rows = []
    if "train_seconds" in results:
        rows.append(("training",
                     f"{results['train_seconds']:.0f} s, {results['train_steps']} steps"))
    rows += [
        ("sampling", f"{results['sample_seconds']:.0f} s for {len(samples)} digits "
                     f"({results['noise_levels']} levels x {results['steps_per_level']} steps)"),
        ("mean confidence",
         f"{s['confidence']:.3f} (real held-out digits: {real['confidence']:.3f})"),
        ("classes present", f"{sum(h > 0 for h in hist)} of 10"),
        ("class histogram", " ".join(map(str, hist)) + f" (min {min(hist)}, max {max(hist)})"),
    ]
    if "fid" in s:
        rows.append(("Frechet distance",
                     f"{s['fid']:.2f} (real training vs held-out digits: {real['fid']:.2f})"))
    rows.append(("classifier", results["classifier"]))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

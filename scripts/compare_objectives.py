"""Benchmark: one flow, several training objectives, judged by the exact test likelihood.

NICE on scikit-learn's 8x8 digits (experiment=nice_digits) is trained by maximum likelihood
and by score matching on its own score (exact SM, SSM, SSM-VR, DSM at a small sigma), as the
sliced score matching paper (Song et al. 2019, Sec. 5) did with NICE on MNIST; every run uses
ncsn-train's trainer. Each is judged by its exact test bits/dim (the test split uniformly
dequantized once, seed 0), beside a factorised Gaussian and a per-pixel histogram fitted to
the training split; RealNVP and Glow by maximum likelihood with --flows.

    python scripts/compare_objectives.py [--steps 2000] [--hidden 1000] [--n-hidden 5] [--lr 1e-3]
        [--exact-sm-steps N] [--objectives nll,exact_sm,ssm,ssm_vr,dsm] [--dsm-sigma 0.05]
        [--logit LAMBDA] [--flows]
        [--out docs] [--json results.json]

Writes OUT/OBJECTIVES.md (the table and the run's settings) and OUT/objectives_samples.png
(64 exact samples per objective).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import matplotlib
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ncsn.config import config_dir, register_configs
from ncsn.data import first_tensor
from ncsn.evaluate.nll import held_out_split
from ncsn.flows import negative_log_likelihood
from ncsn.generate import model_from_checkpoint
from ncsn.registry import build_data, data_space_map
from ncsn.train import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OBJECTIVES = {
    "nll": ("maximum likelihood", ["loss=nll"]),
    "exact_sm": ("exact score matching", ["loss=exact_sm", "loss.max_dim=64"]),
    "ssm": ("sliced score matching", ["loss=ssm"]),
    "ssm_vr": ("SSM with variance reduction", ["loss=ssm_vr"]),
    "dsm": ("denoising score matching", ["loss=dsm"]),
}


def compose_cfg(experiment: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", "trainer.progress=false",
                                           "trainer.sample_every=0", *overrides])


@torch.no_grad()
def test_bits_per_dim(ckpt_path: Path) -> tuple[float, torch.Tensor]:
    """Exact test bits/dim of a flow checkpoint (one dequantization draw, seed 0), and 64
    exact samples in data space."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    flow = model_from_checkpoint(ckpt)
    split = held_out_split(ckpt["config"]["dataset"])
    torch.manual_seed(0)
    total, n = 0.0, 0
    for batch in DataLoader(split.dataset, batch_size=256):
        x = first_tensor(batch)
        nll = negative_log_likelihood(flow.log_prob(x), x, split.space, split.levels)
        total += nll.sum().item()
        n += len(x)
    samples = flow.sample(64, generator=torch.Generator().manual_seed(0))
    to_data = data_space_map(OmegaConf.create(ckpt["config"]["dataset"]))
    return total / n, to_data(samples)


def baselines() -> dict[str, float]:
    """Test bits/dim of a factorised Gaussian on the dequantized pixels and of a per-pixel
    histogram of the 17 levels (add-one smoothing), both fitted to the training split."""
    cfg = compose_cfg("nice_digits", [])
    data = build_data(cfg.dataset)
    torch.manual_seed(0)
    train_x = torch.stack([first_tensor(data.train[i]) for i in range(len(data.train))]).double()
    test_x = torch.stack([first_tensor(data.test[i]) for i in range(len(data.test))]).double()
    d, levels = train_x[0].numel(), 17
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-3)
    log_p = torch.distributions.Normal(mean, std).log_prob(test_x).flatten(1).sum(1)
    gaussian = (-(log_p - d * math.log(levels)) / (d * math.log(2))).mean().item()
    train_k, test_k = (train_x * levels).floor().long(), (test_x * levels).floor().long()
    counts = torch.stack([(train_k == k).sum(0) for k in range(levels)]).double() + 1.0
    probs = counts / counts.sum(0, keepdim=True)                      # (17, 1, 8, 8)
    log2_p = torch.log2(_gather(probs, test_k))
    histogram = -log2_p.flatten(1).sum(1).mean().item() / d
    return {"factorised Gaussian": gaussian, "per-pixel histogram": histogram}


def _gather(probs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """probs (L, C, H, W), k (N, C, H, W) level indices -> (N, C, H, W) probabilities."""
    expanded = probs.unsqueeze(0).expand(k.shape[0], *probs.shape)
    return expanded.gather(1, k.clamp(0, probs.shape[0] - 1).unsqueeze(1)).squeeze(1)


def run(name: str, experiment: str, overrides: list[str], workdir: Path) -> dict:
    cfg = compose_cfg(experiment, overrides)
    start = time.perf_counter()
    ckpt = train(cfg, workdir / name)
    seconds = time.perf_counter() - start
    bpd, samples = test_bits_per_dim(ckpt)
    print(f"{name}: {bpd:.3f} bits/dim, {seconds:.0f} s", flush=True)
    return {"name": name, "bpd": bpd, "seconds": seconds, "steps": cfg.trainer.n_steps,
            "samples": samples}


def picture(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(2.6 * len(results), 2.9))
    for ax, r in zip(axes if len(results) > 1 else [axes], results):
        grid = r["samples"][:64, 0].reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
        ax.imshow(grid.clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{r['label']}\n{r['bpd']:.2f} bits/dim", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--n-hidden", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: the experiment's")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--exact-sm-steps", type=int, default=None,
                        help="steps for exact SM (64 backward passes each); default --steps")
    parser.add_argument("--dsm-sigma", type=float, default=0.05)
    parser.add_argument("--logit", type=float, default=None, metavar="LAMBDA",
                        help="train NICE in logit space, logit(LAMBDA + (1 - 2 LAMBDA) x), as "
                             "the sliced score matching code did (its clamp: 1e-3); default: "
                             "pixels in [0, 1]")
    parser.add_argument("--flows", action="store_true", help="also RealNVP and Glow by ML")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    budget = lambda steps: [f"trainer.n_steps={steps}", f"trainer.ckpt_every={steps}"]
    common = [*budget(args.steps), f"trainer.batch_size={args.batch_size}",
              "trainer.n_plot_samples=0"]
    nice = [f"model.hidden={args.hidden}", f"model.n_hidden={args.n_hidden}",
            *([f"optim.lr={args.lr}"] if args.lr else []),
            *(["dataset.logit_transform=true", f"dataset.logit_lambda={args.logit}"]
              if args.logit else [])]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in filter(None, args.objectives.split(",")):
            label, overrides = OBJECTIVES[key]
            if key == "dsm":
                overrides = [*overrides, f"loss.sigma={args.dsm_sigma}"]
                label = f"{label} (sigma {args.dsm_sigma:g})"
            if key == "exact_sm" and args.exact_sm_steps:
                overrides = [*overrides, *budget(args.exact_sm_steps)]
            r = run(key, "nice_digits", [*common, *nice, *overrides], Path(tmp))
            results.append({**r, "label": f"NICE, {label}"})
        if args.flows:
            for flow in ("realnvp", "glow"):
                r = run(flow, f"{flow}_digits", common, Path(tmp))
                results.append({**r, "label": f"{'RealNVP' if flow == 'realnvp' else 'Glow'}, "
                                              f"maximum likelihood"})
    base = baselines()
    out = Path(args.out)
    picture(results, out / "objectives_samples.png")
    rows = [(r["label"], r["bpd"], r["steps"], r["seconds"] / r["steps"], r["seconds"])
            for r in results]
    write_report(out / "OBJECTIVES.md", rows, base, args)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"runs": [{k: v for k, v in r.items() if k != "samples"} for r in results],
             "baselines": base, "args": vars(args)}, indent=2))


def write_report(path: Path, rows, base: dict, args) -> None:
    lines = ["| model, objective | test bits/dim | steps | s / step | total s |",
             "|---|---|---|---|---|"]
    lines += [f"| {label} | {bpd:.3f} | {steps} | {per:.3f} | {total:.0f} |"
              for label, bpd, steps, per, total in rows]
    lines += [f"| {name} (fitted, no steps) | {bpd:.3f} | | | |" for name, bpd in base.items()]
    table = "\n".join(lines)
    exact_sm = f"--exact-sm-steps {args.exact_sm_steps} " if args.exact_sm_steps else ""
    settings = (f"`python scripts/compare_objectives.py --steps {args.steps} "
                f"--hidden {args.hidden} --n-hidden {args.n_hidden} "
                f"--batch-size {args.batch_size} {f'--lr {args.lr:g} ' if args.lr else ''}"
                f"{exact_sm}--objectives {args.objectives} "
                f"--dsm-sigma {args.dsm_sigma:g}"
                f"{f' --logit {args.logit:g}' if args.logit else ''}"
                f"{' --flows' if args.flows else ''}`")
    path.write_text(REPORT.format(table=table, settings=settings))


REPORT = """# Training objectives compared on one flow

{settings}

{table}

Written by the command above (scripts/compare_objectives.py); pictures: objectives_samples.png.
"""


if __name__ == "__main__":
    main()

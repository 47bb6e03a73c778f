"""Benchmark: one flow, several training objectives, judged by the exact test likelihood.

NICE on scikit-learn's 8x8 digits (experiment=nice_digits in logit space, at the sliced
score matching code's NICE: 4 couplings of 4 x 1000 softplus units, Gaussian prior) is
trained by maximum likelihood and by score matching on its own score (exact SM, SSM, SSM-VR,
DSM), as the sliced score matching paper (Song et al. 2019, Sec. 5.1) did with NICE on
MNIST, and with its code's protocol (runners/nice_runner.py, configs/nice/*.yml): Adam at lr
1e-4 (DSM 1e-3), batch 128 (exact SM 24), a validation split held out of the training data
and the weights with the best validation likelihood kept (trainer.keep_best), every run
through ncsn-train's trainer. Each is judged by its exact test bits/dim (the test split
uniformly dequantized once, seed 0) at its best validation step and at its last step, beside
a factorised Gaussian and a per-pixel histogram fitted to the training split; RealNVP and
Glow by maximum likelihood with --flows.

    python scripts/compare_objectives.py [--steps 2000] [--objectives nll,ssm,ssm_vr,dsm,exact_sm]
        [--lr OBJ=LR,...] [--exact-sm-steps N] [--exact-sm-batch 24] [--dsm-sigma 0.1]
        [--hidden 1000] [--n-hidden 4] [--activation softplus] [--prior gaussian]
        [--logit 1e-3 | --no-logit] [--flows] [--set KEY=VALUE ...] [--workdir DIR]
        [--json results.json]
    python scripts/compare_objectives.py --report a.json b.json [--out docs]

A run writes its results as JSON (``--json``; samples beside it as .pt) and keeps its runs
under ``--workdir`` when given (a second call with the same one resumes them); ``--report`` merges
such files (runs split over several processes) into the table between the markers in
OUT/OBJECTIVES.md, leaving the text around it, and draws OUT/objectives_samples.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
from ncsn.training import train
from ncsn.viz import image_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OBJECTIVES = {
    "nll": ("maximum likelihood", ["loss=nll"]),
    "exact_sm": ("exact score matching", ["loss=exact_sm", "loss.max_dim=64"]),
    # Rademacher projections, as configs/nice/nice_ssm*.yml
    "ssm": ("sliced score matching", ["loss=ssm", "loss.projection=rademacher"]),
    "ssm_vr": ("SSM with variance reduction", ["loss=ssm_vr", "loss.projection=rademacher"]),
    "dsm": ("denoising score matching", ["loss=dsm"]),
}
# The sliced score matching code's learning rates (configs/nice/nice_*.yml).
AUTHORS_LR = {"nll": 1e-4, "exact_sm": 1e-4, "ssm": 1e-4, "ssm_vr": 1e-4, "dsm": 1e-3}
TABLE_START, TABLE_END = "<!-- compare_objectives: table -->", "<!-- /compare_objectives -->"
FLOWS_START, FLOWS_END = "<!-- compare_objectives: flows -->", "<!-- /compare_objectives: flows -->"


def compose_cfg(experiment: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", "trainer.progress=false",
                                           *overrides])


@torch.no_grad()
def test_bits_per_dim(ckpt_path: Path) -> tuple[float, int, torch.Tensor]:
    """Exact test bits/dim of a flow checkpoint (one dequantization draw, seed 0), its step,
    and 64 exact samples in data space."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    flow = model_from_checkpoint(ckpt)
    split = held_out_split(ckpt["config"]["dataset"])          # the test split, always
    torch.manual_seed(0)
    total, n = 0.0, 0
    for batch in DataLoader(split.dataset, batch_size=256):
        x = first_tensor(batch)
        nll = negative_log_likelihood(flow.log_prob(x), x, split.space, split.levels)
        total += nll.sum().item()
        n += len(x)
    samples = flow.sample(64, generator=torch.Generator().manual_seed(0))
    to_data = data_space_map(OmegaConf.create(ckpt["config"]["dataset"]))
    return total / n, ckpt["step"], to_data(samples)


def baselines() -> dict[str, float]:
    """Test bits/dim of a factorised Gaussian on the dequantized pixels and of a per-pixel
    histogram of the 17 levels (add-one smoothing), both fitted to the training split."""
    cfg = compose_cfg("nice_digits", ["dataset.logit_transform=false"])
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


def run(key: str, label: str, experiment: str, overrides: list[str], workdir: Path,
        curve: bool = False) -> dict:
    """Train one setting; score its best-on-validation and last checkpoints on the test split
    (``curve``: also every step checkpoint the run kept, as ``[[step, bits/dim], ...]``)."""
    cfg = compose_cfg(experiment, overrides)
    start = time.perf_counter()
    last = train(cfg, workdir / key)
    seconds = time.perf_counter() - start
    best = last.parent / "best.pt"
    bpd_last, steps, _ = test_bits_per_dim(last)
    bpd_best, best_step, samples = test_bits_per_dim(best if best.is_file() else last)
    print(f"{key}: {bpd_best:.3f} bits/dim at its best validation step {best_step}, "
          f"{bpd_last:.3f} at step {steps}, {seconds:.0f} s", flush=True)
    result = {"key": key, "label": label, "bpd_best": bpd_best, "best_step": best_step,
              "bpd_last": bpd_last, "steps": steps, "seconds": seconds,
              "batch_size": cfg.trainer.batch_size, "lr": cfg.optim.lr, "samples": samples,
              "parameters": sum(p.numel() for p in model_from_checkpoint(
                  torch.load(last, map_location="cpu", weights_only=True)).parameters())}
    if curve:
        result["curve"] = [[step, bpd] for bpd, step, _ in sorted(
            (test_bits_per_dim(path) for path in last.parent.glob("step_*.pt")),
            key=lambda scored: scored[1])]
    return result


def learning_rates(spec: str | None) -> dict[str, float]:
    rates = dict(AUTHORS_LR)
    for item in filter(None, (spec or "").split(",")):
        key, _, value = item.partition("=")
        if key not in OBJECTIVES or not value:
            raise SystemExit(f"--lr takes OBJ=LR pairs with OBJ in {sorted(OBJECTIVES)}, "
                             f"got {item!r}")
        rates[key] = float(value)
    return rates


def nice_runs(args, workdir: Path) -> list[dict]:
    rates = learning_rates(args.lr)
    selection = [f"dataset.validation_fraction={args.validation_fraction}",
                 "trainer.keep_best=true", f"trainer.sample_every={args.validate_every}",
                 "trainer.n_plot_samples=0"]
    nice = [f"model.hidden={args.hidden}", f"model.n_hidden={args.n_hidden}",
            f"model.activation={args.activation}", f"model.prior={args.prior}",
            "optim.betas=[0.9,0.999]", "optim.eps=1e-8",          # Adam's defaults, as theirs
            *(["dataset.logit_transform=false"] if args.no_logit else
              ["dataset.logit_transform=true", f"dataset.logit_lambda={args.logit}"])]
    results = []
    for key in filter(None, args.objectives.split(",")):
        label, overrides = OBJECTIVES[key]
        steps, batch = args.steps, args.batch_size
        if key == "dsm":
            overrides = [*overrides, f"loss.sigma={args.dsm_sigma}"]
            label = f"{label} (sigma {args.dsm_sigma:g})"
        if key == "exact_sm":
            steps, batch = args.exact_sm_steps or steps, args.exact_sm_batch
        budget = [f"trainer.n_steps={steps}", f"trainer.ckpt_every={steps}",
                  f"trainer.batch_size={batch}", f"optim.lr={rates[key]}"]
        results.append(run(key, f"NICE, {label}", "nice_digits",
                           [*budget, *selection, *nice, *overrides, *args.set], workdir))
        save_results(results, args, Path(args.json))          # so far, run by run
    return results


def flow_runs(args, workdir: Path) -> list[dict]:
    """RealNVP and Glow by maximum likelihood at ``--flow-steps``, a checkpoint every
    ``--validate-every`` steps kept and scored (the test bits/dim against steps and seconds:
    ``--report`` compares architectures at equal steps and at equal wall time).
    ``--flow-variant`` names the code's version in the labels and keys."""
    results, every = [], args.validate_every
    suffix = f" [{args.flow_variant}]" if args.flow_variant else ""
    for flow, name in (("realnvp", "RealNVP"), ("glow", "Glow")):
        overrides = [f"trainer.n_steps={args.flow_steps}", f"trainer.ckpt_every={every}",
                     f"trainer.keep_last={args.flow_steps // every + 1}",
                     "trainer.n_plot_samples=0", f"dataset.validation_fraction="
                     f"{args.validation_fraction}", "trainer.keep_best=true",
                     f"trainer.sample_every={every}"]
        key = f"{flow}_{args.flow_variant}" if args.flow_variant else flow
        results.append(run(key, f"{name} (experiment={flow}_digits{suffix}), maximum "
                                f"likelihood", f"{flow}_digits", [*overrides, *args.set],
                           workdir, curve=True))
    return results


def save_results(results: list[dict], args, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({r["key"]: r["samples"] for r in results}, path.with_suffix(".pt"))
    path.write_text(json.dumps({"runs": [{k: v for k, v in r.items() if k != "samples"}
                                         for r in results],
                                "args": vars(args), "threads": torch.get_num_threads(),
                                "load": os.getloadavg()[0]}, indent=2))


def load_results(paths: list[str]) -> list[dict]:
    results = []
    for path in map(Path, paths):
        runs = json.loads(path.read_text())["runs"]
        samples = torch.load(path.with_suffix(".pt"), weights_only=True)
        results += [{**r, "samples": samples[r["key"]]} for r in runs]
    return results


def picture(results: list[dict], path: Path) -> None:
    columns = min(4, len(results))
    rows = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        grid = image_grid(r["samples"][:64], nrow=8)[0]        # white borders: black in gray_r
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
        title = r["label"].split(" (")[0].replace("NICE, ", "NICE,\n")
        ax.set_title(f"{title}\n{r['bpd_best']:.2f} bits/dim", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict], base: dict) -> str:
    lines = ["| model, objective | lr | batch | test bits/dim, best on validation (step) "
             "| test bits/dim, last step | steps | s / step | total s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['lr']:g} | {r['batch_size']} | {r['bpd_best']:.3f} "
              f"({r['best_step']}) | {r['bpd_last']:.3f} | {r['steps']} | "
              f"{r['seconds'] / r['steps']:.3f} | {r['seconds']:.0f} |" for r in results]
    lines += [f"| {name}, fitted to the training split | | | {bpd:.3f} | | | | |"
              for name, bpd in base.items()]
    return "\n".join(lines)


def at_seconds(result: dict, seconds: float) -> tuple[int, float] | None:
    """The last scored checkpoint a run reached within ``seconds`` of training (its steps at
    its mean seconds per step): ``(step, test bits/dim)``, or None before the first."""
    per_step = result["seconds"] / result["steps"]
    reached = [(step, bpd) for step, bpd in result.get("curve", []) if step * per_step
               <= seconds * (1 + 1e-9)]
    return reached[-1] if reached else None


def flows_table(results: list[dict], base: dict) -> str:
    """Each flow's versions side by side: test bits/dim at equal steps (each run's last) and
    at equal wall time (the fastest version's total seconds for that flow)."""
    lines = ["| model (code version) | parameters | s / step | test bits/dim at step "
             "(equal steps) | equal wall time: seconds, step reached, test bits/dim | "
             "best on validation (step) |", "|---|---:|---:|---|---|---|"]
    for name in ("RealNVP", "Glow"):
        runs = [r for r in results if r["label"].startswith(name) and "curve" in r]
        if not runs:
            continue
        budget = min(r["seconds"] for r in runs)
        for r in runs:
            reached = at_seconds(r, budget)
            equal_time = (f"{budget:.0f} s: step {reached[0]}, {reached[1]:.3f}" if reached
                          else f"{budget:.0f} s: before the first checkpoint")
            lines.append(f"| {r['label'].split(', maximum')[0]} | {r.get('parameters', 0):,} "
                         f"| {r['seconds'] / r['steps']:.3f} | {r['bpd_last']:.3f} at "
                         f"{r['steps']} | {equal_time} | {r['bpd_best']:.3f} "
                         f"({r['best_step']}) |")
    lines += [f"| {name}, fitted to the training split | | | {bpd:.3f} | | |"
              for name, bpd in base.items()]
    return "\n".join(lines)


def flows_only(results: list[dict]) -> bool:
    """Only --flows runs (with their curves): the report leaves the objectives' table and
    its picture as they are."""
    return all("curve" in r for r in results)


def _replace_between(text: str, start: str, end: str, block: str) -> str:
    head, rest = text.split(start, 1)
    return head + block + rest.split(end, 1)[1]


def write_report(path: Path, results: list[dict]) -> None:
    """Put the tables between their markers in ``path`` (a new file holds only the tables):
    the objectives' table, and with runs from --flows the flows' comparison."""
    base = baselines()
    block = f"{TABLE_START}\n{table(results, base)}\n{TABLE_END}"
    text = path.read_text() if path.is_file() else f"# Training objectives compared\n\n{block}\n"
    if TABLE_START in text and TABLE_END in text and not flows_only(results):
        text = _replace_between(text, TABLE_START, TABLE_END, block)
    if any("curve" in r for r in results):
        flows = f"{FLOWS_START}\n{flows_table(results, base)}\n{FLOWS_END}"
        text = (_replace_between(text, FLOWS_START, FLOWS_END, flows)
                if FLOWS_START in text and FLOWS_END in text else f"{text}\n{flows}\n")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--objectives", default="nll,ssm,ssm_vr,dsm,exact_sm")
    parser.add_argument("--lr", default=None, metavar="OBJ=LR,...",
                        help="learning rates; default the sliced score matching code's: "
                             "1e-4, DSM 1e-3")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--exact-sm-steps", type=int, default=None,
                        help="steps for exact SM (64 backward passes each); default --steps")
    parser.add_argument("--exact-sm-batch", type=int, default=24, help="as nice_exact.yml")
    parser.add_argument("--dsm-sigma", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--n-hidden", type=int, default=4,
                        help="hidden layers per coupling (NICE's paper: 5)")
    parser.add_argument("--activation", default="softplus", help="NICE's paper: relu")
    parser.add_argument("--prior", default="gaussian", help="NICE's paper: logistic")
    parser.add_argument("--logit", type=float, default=1e-3, metavar="LAMBDA",
                        help="logit(LAMBDA + (1 - 2 LAMBDA) x); the code's clamp is 1e-3")
    parser.add_argument("--no-logit", action="store_true", help="pixels in [0, 1]")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--flows", action="store_true", help="also RealNVP and Glow by ML")
    parser.add_argument("--flow-steps", type=int, default=800)
    parser.add_argument("--flow-variant", default="",
                        help="a name for this code version in the flows' labels and keys")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides for every run, e.g. trainer.num_threads=1")
    parser.add_argument("--workdir", default=None,
                        help="keep the runs here (resumable); default a temporary folder")
    parser.add_argument("--json", default="objectives.json")
    parser.add_argument("--report", nargs="+", metavar="JSON", default=None,
                        help="merge these results into OUT/OBJECTIVES.md instead of training")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    if args.report:
        results = load_results(args.report)
        out = Path(args.out)
        write_report(out / "OBJECTIVES.md", results)
        if not flows_only(results):
            picture(results, out / "objectives_samples.png")
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        results = nice_runs(args, workdir)
        if args.flows:
            results += flow_runs(args, workdir)
    save_results(results, args, Path(args.json))


if __name__ == "__main__":
    main()

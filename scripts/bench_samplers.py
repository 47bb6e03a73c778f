"""Benchmark: sample quality against network evaluations (NFE) for every sampler, from the
same trained checkpoints, on the Swiss roll and the 8x8 digits; writes docs/SAMPLERS.md and
docs/samplers.png.

    python scripts/bench_samplers.py [--swiss-ckpt RUN/checkpoints/last.pt]
                                     [--digits-ckpt RUN/checkpoints/last.pt]
                                     [--n-swiss 2000] [--n-digits 300] [--swiss-seeds 3]
                                     [--digits-seeds 3] [--only LABEL ...]
                                     [--json docs/samplers.json] [--render-only]

Without a checkpoint the script trains one with the setup's experiment file
(``experiment=swissroll``, ``experiment=digits``). Each sampler runs on one batch of
``n`` samples per seed, on one CPU thread: annealed Langevin with the checkpoint's own
settings (the setup's budget), the few-step solvers (euler, euler_ancestral, dpmpp_2m, ipndm)
at 5, 10, 20 and 35 NFE, EDM's Heun sampler (deterministic, and stochastic settings), score
SDE's predictor-corrector and the probability-flow ODE at several budgets. The digits run
``--digits-seeds`` batches per setting (mean and std over them), and the page judges issue
16's target: a solver at 10 NFE within the seeds' noise of annealed Langevin, at 20 better.
Quality: the sliced Wasserstein distance to fresh Swiss-roll points (lower is better; its
noise floor is the distance between two fresh sets of the same size) and, on the digits, the
Frechet distance in the digits classifier's feature space to the 360 held-out digits and the
classifier's mean confidence (ncsn.metrics.digits). Results are saved to the JSON file after
every row; ``--render-only`` rewrites the page and the plot from it.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ncsn import registry
from ncsn.checkpoint import load_checkpoint
from ncsn.config import config_dir, register_configs
from ncsn.evaluate.scoring import toy_reference
from ncsn.generate import model_from_checkpoint, sampler_config
from ncsn.metrics import sliced_wasserstein
from ncsn.metrics.digits import digits_metrics, digits_split, load_digits_classifier
from ncsn.sampling import CountingNet
from ncsn.training import train

REPO = Path(__file__).resolve().parents[1]
COMMAND = "OMP_NUM_THREADS=1 python scripts/bench_samplers.py"

# (label, sampler config replacing the checkpoint's; None: the checkpoint's own sampler)
SOLVERS = ("euler", "euler_ancestral", "dpmpp_2m", "ipndm")     # NFE = num_steps
SOLVER_NFE = (5, 10, 20, 35)
SETTINGS = (
    [("annealed_langevin", None)]
    + [(f"{name} N={n}", {"name": name, "num_steps": n, "schedule": "karras"})
       for name in SOLVERS for n in SOLVER_NFE]
    + [(f"dpmpp_2m N={n} log_uniform", {"name": "dpmpp_2m", "num_steps": n,
                                        "schedule": "log_uniform"}) for n in (10, 20)]
    # the table's own levels: a network trained on the table alone is accurate there only
    + [(f"{name} N={n} table", {"name": name, "num_steps": n, "schedule": "table"})
       for name in SOLVERS for n in (10, 20)]
    + [(f"heun N={n}", {"name": "heun", "num_steps": n}) for n in (3, 4, 6, 10, 18, 30)]
    + [("heun N=18 S_churn=10", {"name": "heun", "num_steps": 18, "S_churn": 10.0})]
    # EDM's stochastic settings at <= 42 NFE: gamma_i = min(S_churn / N, sqrt(2) - 1), so
    # S_churn >= 7.5 at N = 18 is the largest churn; S_tmin, S_tmax, S_noise: EDM's Table 5 (VE)
    + [("heun N=18 S_churn=5", {"name": "heun", "num_steps": 18, "S_churn": 5.0})]
    + [("heun N=21 S_churn=10", {"name": "heun", "num_steps": 21, "S_churn": 10.0})]
    + [("heun N=18 S_churn=10 S_noise=1.007",
        {"name": "heun", "num_steps": 18, "S_churn": 10.0, "S_noise": 1.007})]
    + [("heun N=18 S_churn=80 S_tmin=0.05 S_tmax=1 S_noise=1.007",
        {"name": "heun", "num_steps": 18, "S_churn": 80.0, "S_tmin": 0.05, "S_tmax": 1.0,
         "S_noise": 1.007})]
    + [("heun table", {"name": "heun", "num_steps": None})]        # the trained levels only
    + [(f"pc N={n}", {"name": "pc", "num_steps": n}) for n in (5, 10, 20, 21, 50, 100)]
    + [("pc table", {"name": "pc", "num_steps": None})]
    + [(f"ode rtol={tol:g}", {"name": "ode", "rtol": tol, "atol": tol})
       for tol in (1e-1, 1e-2, 1e-3, 1e-5)]
)


# ----------------------------------------------------------------------------- checkpoints
REAL_SUBSETS = 5                    # random sets of real digits that measure the FID's noise

# setup -> the training overrides of its checkpoint
SETUPS = {"swiss": ["experiment=swissroll"], "digits": ["experiment=digits"],
          "digits_continuous": ["experiment=digits", "noise.continuous=true"],
          "digits_edm": ["experiment=digits", "loss=edm", "model.precond=edm",
                         "model.scale_by_sigma=false"]}


def train_experiment(overrides: list[str], run_dir: Path) -> Path:
    register_configs()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "trainer.progress=false",
                                          "trainer.num_threads=1"])
    return train(cfg, run_dir)


def describe(ckpt: dict) -> str:
    cfg, sigmas = ckpt["config"], ckpt["sigmas"]
    return (f"model={cfg['model']['name']}, {int(ckpt['step'])} steps, {len(sigmas)} noise "
            f"levels from {float(sigmas[0]):.4g} to {float(sigmas[-1]):.4g}")


# ----------------------------------------------------------------------------- sampling
def draw(ckpt: dict, net, replace: dict | None, n: int,
         seed: int) -> tuple[torch.Tensor, int, float]:
    """(samples in data space, NFE, seconds) of one batch of ``n``."""
    cfg = ckpt["config"]
    sampler_cfg = sampler_config(cfg["sampler"], replace=replace)
    sampler = registry.build_sampler(sampler_cfg, ckpt["sigmas"], OmegaConf.create(cfg["model"]))
    generator = torch.Generator().manual_seed(seed)
    x = registry.initial_samples(sampler_cfg, n, tuple(ckpt["data_shape"]), ckpt["sigmas"],
                                 "cpu", generator)
    torch.manual_seed(seed)
    counted = CountingNet(net)
    start = time.perf_counter()
    x = sampler(counted, x)
    seconds = time.perf_counter() - start
    samples = registry.data_space_map(OmegaConf.create(cfg["dataset"]))(x)
    return samples, counted.nfe, seconds


def settings(only: list[str] | None) -> list[tuple[str, dict | None]]:
    """The settings to run: all, or those whose labels are in ``only``."""
    chosen = [s for s in SETTINGS if only is None or s[0] in only]
    unknown = set(only or ()) - {label for label, _ in SETTINGS}
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}; choose from "
                         f"{[label for label, _ in SETTINGS]}")
    return chosen


def add_row(result: dict, row: dict) -> None:
    """Add (or replace) a row, keeping the order of SETTINGS (annealed Langevin first)."""
    order = [label for label, _ in SETTINGS]
    rows = [r for r in result.get("rows", []) if r["sampler"] != row["sampler"]] + [row]
    result["rows"] = sorted(rows, key=lambda r: order.index(r["sampler"]))


def swiss_rows(ckpt: dict, n: int, seeds: int, result: dict, save,
               only: list[str] | None = None) -> None:
    """Every setting, ``seeds`` batches each, into ``result``: SWD to fresh points (mean,
    std over seeds); ``save()`` after every row."""
    net = model_from_checkpoint(ckpt)
    fresh = [toy_reference(ckpt["config"]["dataset"], seed) for seed in range(seeds)]
    floor = [sliced_wasserstein(fresh[s](n), toy_reference(ckpt["config"]["dataset"],
                                                            seeds + s)(n), seed=s)
             for s in range(seeds)]
    result.update(checkpoint=describe(ckpt), n=n, seeds=seeds, floor=_mean_std(floor))
    save()
    for label, replace in settings(only):
        runs = [draw(ckpt, net, replace, n, seed) for seed in range(seeds)]
        swd = [sliced_wasserstein(x.double(), fresh[s](n), seed=s)
               for s, (x, _, _) in enumerate(runs)]
        row = {"sampler": label, "nfe": _mean([r[1] for r in runs]), "swd": _mean_std(swd),
               "seconds": _mean([r[2] for r in runs])}
        add_row(result, row)
        _print_row("swiss", row)
        save()


def digits_rows(ckpt: dict, n: int, result: dict, save,
                only: list[str] | None = None, seed: int = 0, seeds: int = 1) -> None:
    """Every setting, one batch per seed (seeds ``seed`` ... ``seed + seeds - 1``), into
    ``result``: classifier-feature FID to the held-out digits and confidence, mean and std
    over the seeds; ``save()`` after every row."""
    net = model_from_checkpoint(ckpt)
    classifier = load_digits_classifier()
    train_split, _, heldout, _ = digits_split()
    # the FID's own noise at this n: n real training digits against the held-out ones
    subsets = [torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))[:n]
               for seed in range(REAL_SUBSETS)]
    real = [digits_metrics(train_split[index], classifier) for index in subsets]
    result.update(checkpoint=describe(ckpt), n=n, seed=seed, seeds=seeds,
                  real={"fid": _mean_std([r["fid"] for r in real]),
                        "confidence": _mean([r["confidence"] for r in real])},
                  between_levels=between_levels(net, ckpt["sigmas"], train_split[subsets[0]]))
    save()
    for label, replace in settings(only):
        runs = [draw(ckpt, net, replace, n, s) for s in range(seed, seed + seeds)]
        scores = [digits_metrics(x.float(), classifier) for x, _, _ in runs]
        row = {"sampler": label, "nfe": _mean([r[1] for r in runs]),
               "fid": _mean_std([s["fid"] for s in scores]),
               "confidence": _mean_std([s["confidence"] for s in scores]),
               "seconds": _mean([r[2] for r in runs]),
               "classes": min(int((torch.tensor(s["histogram"]) > 0).sum()) for s in scores)}
        add_row(result, row)
        _print_row("digits", row)
        save()


def _ms(value) -> tuple[float, float]:
    """(mean, std) of a row's value: [mean, std] over seeds, or one batch's number (std 0)."""
    return (value[0], value[1]) if isinstance(value, list) else (value, 0.0)


@torch.no_grad()
def between_levels(net, sigmas: torch.Tensor, x: torch.Tensor, seed: int = 0) -> list[dict]:
    """The denoising error E|sigma s(x + sigma z, sigma) + z|^2 (DSM's loss times 2 sigma^2)
    of real points ``x`` at every other table level and at the geometric midpoint to the next
    level: a network that conditions on sigma's value should be as good between its training
    levels as on them."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(0, len(sigmas) - 1, 2):
        pair = [float(sigmas[i]), math.sqrt(float(sigmas[i]) * float(sigmas[i + 1]))]
        errors = []
        for sigma in pair:
            z = torch.randn(x.shape, generator=generator)
            score = net(x + sigma * z, torch.full((len(x),), sigma))
            errors.append(float((sigma * score + z).flatten(1).pow(2).sum(1).mean()))
        rows.append({"level": i, "sigma": pair[0], "on": errors[0], "midpoint": pair[1],
                     "between": errors[1]})
    return rows


def _mean(values) -> float:
    return sum(values) / len(values)


def _mean_std(values) -> list[float]:
    mean = _mean(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return [mean, math.sqrt(var)]


def _real_fid(result: dict) -> str:
    mean, std = result["real"]["fid"]
    return f"{mean:.2f} +- {std:.2f}"


def _print_row(setup: str, row: dict) -> None:
    print(setup, json.dumps(row), flush=True)


# ----------------------------------------------------------------------------- verdicts
def family(label: str) -> str:
    return label.split()[0]


def within_budget(result: dict) -> tuple[dict, float, list[dict]]:
    """Annealed Langevin's row (the first), the budget of one tenth of its NFE, and the
    other rows within that budget."""
    langevin = result["rows"][0]
    budget = langevin["nfe"] / 10
    return langevin, budget, [r for r in result["rows"][1:] if r["nfe"] <= budget]


def swiss_verdict(result: dict) -> str:
    langevin, budget, cheap = within_budget(result)
    if not cheap:
        return f"no sampler setting ran at <= {budget:g} NFE"
    best = min(cheap, key=lambda r: r["swd"][0])
    # the noise of a difference of two means over the seeds
    noise = math.sqrt(langevin["swd"][1] ** 2 + best["swd"][1] ** 2) / math.sqrt(result["seeds"])
    gap = best["swd"][0] - langevin["swd"][0]
    met = gap <= 2 * noise
    judged = "lower" if gap <= 0 else f"{'within' if met else 'outside'} twice the noise"
    return (f"**{'met' if met else 'not met'}**: {best['sampler']} at {best['nfe']:.0f} NFE "
            f"(<= {budget:g}, one tenth of annealed Langevin's {langevin['nfe']:.0f}) reaches "
            f"SWD {best['swd'][0]:.4f} against annealed Langevin's {langevin['swd'][0]:.4f}: "
            f"a difference of {gap:+.4f} ({judged}; the standard error of the difference of "
            f"the means over {result['seeds']} seeds is {noise:.4f}); two fresh data sets of "
            f"this size are {result['floor'][0]:.4f} apart")


def digits_verdict(result: dict) -> str:
    langevin, budget, cheap = within_budget(result)
    if not cheap:
        return f"no sampler setting ran at <= {budget:g} NFE"
    best = min(cheap, key=lambda r: _ms(r["fid"])[0])
    met = _ms(best["fid"])[0] <= _ms(langevin["fid"])[0] and \
        _ms(best["confidence"])[0] >= _ms(langevin["confidence"])[0]
    return (f"**{'met' if met else 'not met'}** (means over {result.get('seeds', 1)} seed(s)): "
            f"{best['sampler']} at {best['nfe']:.0f} NFE "
            f"(<= {budget:g}, one tenth of annealed Langevin's {langevin['nfe']:.0f}) has "
            f"feature FID {_ms(best['fid'])[0]:.2f} and confidence "
            f"{_ms(best['confidence'])[0]:.3f} against annealed Langevin's "
            f"{_ms(langevin['fid'])[0]:.2f} and {_ms(langevin['confidence'])[0]:.3f} "
            f"(real training digits: {_real_fid(result)} and "
            f"{result['real']['confidence']:.3f} on the same number of images)")


def solver_noise(result: dict, a: dict, b: dict) -> float:
    """The standard error of the difference of two rows' mean FIDs over the seeds."""
    seeds = result.get("seeds", 1)
    return math.sqrt(_ms(a["fid"])[1] ** 2 + _ms(b["fid"])[1] ** 2) / math.sqrt(seeds)


def solver_verdict(result: dict) -> list[str]:
    """Issue 16's target: a solver (euler, euler_ancestral, dpmpp_2m, ipndm) at 10 NFE within
    the noise of annealed Langevin at its own budget, and at 20 NFE clearly better (lower FID
    by more than twice the standard error of the difference)."""
    langevin = result["rows"][0]
    lines = []
    for nfe, want in ((10, "as good"), (20, "clearly better")):
        rows = [r for r in result["rows"][1:] if family(r["sampler"]) in SOLVERS
                and round(r["nfe"]) == nfe]
        if not rows:
            lines.append(f"- {nfe} NFE: no solver row")
            continue
        best = min(rows, key=lambda r: _ms(r["fid"])[0])
        noise = solver_noise(result, langevin, best)
        gap = _ms(best["fid"])[0] - _ms(langevin["fid"])[0]
        met = gap <= 2 * noise if want == "as good" else gap < -2 * noise
        lines.append(
            f"- {nfe} NFE, {want}: **{'met' if met else 'not met'}**: the best solver, "
            f"{best['sampler']}, has feature FID {_ms(best['fid'])[0]:.2f} +- "
            f"{_ms(best['fid'])[1]:.2f} (confidence {_ms(best['confidence'])[0]:.3f}) against "
            f"annealed Langevin's {_ms(langevin['fid'])[0]:.2f} +- "
            f"{_ms(langevin['fid'])[1]:.2f} ({_ms(langevin['confidence'])[0]:.3f}) at "
            f"{langevin['nfe']:.0f} NFE: a difference of {gap:+.2f}, the standard error of the "
            f"difference of the means over {result.get('seeds', 1)} seeds {noise:.2f} "
            f"(criterion: {'<= +2' if want == 'as good' else '< -2'} standard errors)")
    return lines


# ----------------------------------------------------------------------------- report
# The page's text after this line is written by hand and kept when the script rewrites it.
MARKER = "<!-- the text below is not written by scripts/bench_samplers.py -->"


def render(results: dict, page: Path, plot: Path) -> None:
    order = [label for label, _ in SETTINGS]
    for setup in SETUPS:
        if setup in results:
            results[setup]["rows"].sort(key=lambda r: order.index(r["sampler"]))
    plot_results(results, plot)
    lines = [
        "# Samplers: quality against network evaluations",
        "",
        "Written by `scripts/bench_samplers.py` (the numbers below are its output; rerun with",
        f"`{COMMAND}`). Every sampler draws from the **same checkpoint** per setup, on one CPU",
        f"thread ({results['machine']}); NFE counts network evaluations per chain",
        "(`ncsn.sampling.CountingNet`); wall time is for one batch of the given size, on a",
        "machine shared with other jobs (compare the times with each other, not absolutely).",
        "Annealed Langevin runs at the setup's own settings (the checkpoint's sampler).",
        "Heun: EDM's Algorithm 1 (2N - 1 NFE; `S_churn > 0`: Algorithm 2); pc: score SDE's",
        "predictor-corrector, reverse-diffusion predictor and one Langevin corrector step",
        "(snr 0.16; 2N NFE); ode: the probability-flow ODE by scipy's RK45, rtol = atol",
        "(adaptive NFE, +1 for the denoising step). euler, euler_ancestral, dpmpp_2m, ipndm:",
        "k-diffusion's Euler, Euler ancestral (eta 1) and DPM-Solver++(2M) and diff-sampler's",
        "iPNDM (order up to 4), N = NFE levels on EDM's rho = 7 schedule (`karras`; dpmpp_2m",
        "also on the geometric one, `log_uniform`) between the table's ends. Settings missing",
        "from a table were not run in this round (see the notes under it).",
        "",
        f"![quality against NFE]({plot.name})",
        "",
    ]
    if "swiss" in results:
        lines += swiss_section(results["swiss"])
    for setup, title in DIGITS_TITLES.items():
        if setup in results:
            lines += digits_section(results[setup], title)
    kept = page.read_text().split(MARKER, 1)[1] if page.is_file() and \
        MARKER in page.read_text() else "\n"
    page.write_text("\n".join(lines) + "\n" + MARKER + kept)


def swiss_section(result: dict) -> list[str]:
    lines = ["## Swiss roll (`experiment=swissroll`)", "",
             f"Checkpoint: {result['checkpoint']}. Quality: sliced Wasserstein distance (SW1, "
             f"256 directions) of {result['n']} samples to {result['n']} fresh points, mean "
             f"and standard deviation over {result['seeds']} seeds; two fresh data sets are "
             f"{result['floor'][0]:.4f} +- {result['floor'][1]:.4f} apart (the floor).", "",
             "| sampler | NFE | SWD (mean +- std) | wall time (s) |",
             "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['sampler']} | {r['nfe']:.0f} | {r['swd'][0]:.4f} +- "
                     f"{r['swd'][1]:.4f} | {r['seconds']:.2f} |")
    return lines + ["", f"Target (one tenth of annealed Langevin's NFE, the same SWD within "
                        f"the noise): {swiss_verdict(result)}.", ""]


DIGITS_TITLES = {"digits": "Digits (`experiment=digits`)",
                 "digits_continuous": "Digits, continuous σ training "
                                      "(`experiment=digits noise.continuous=true`)",
                 "digits_edm": "Digits, EDM's preconditioning and loss (`experiment=digits "
                               "model.precond=edm loss=edm model.scale_by_sigma=false`)"}


def digits_section(result: dict, title: str) -> list[str]:
    lines = [f"## {title}", "",
             f"Checkpoint: {result['checkpoint']}. Quality: the Frechet distance in the digits "
             f"classifier's feature space between {result['n']} samples and the 360 held-out "
             f"digits (lower is better), the classifier's mean confidence (higher is better) "
             f"and the classes it sees (the fewest over the seeds); mean +- standard "
             f"deviation over {result.get('seeds', 1)} batches (seeds {result.get('seed', 0)} "
             f"to {result.get('seed', 0) + result.get('seeds', 1) - 1}). For scale and noise, "
             f"{result['n']} real training digits ({REAL_SUBSETS} random sets): FID "
             f"{_real_fid(result)}, confidence {result['real']['confidence']:.3f}.", "",
             "| sampler | NFE | feature FID | confidence | classes | wall time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fid, conf = _ms(r["fid"]), _ms(r["confidence"])
        lines.append(f"| {r['sampler']} | {r['nfe']:.0f} | {fid[0]:.2f} +- {fid[1]:.2f} | "
                     f"{conf[0]:.3f} +- {conf[1]:.3f} | {r['classes']} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", f"Target (one tenth of annealed Langevin's NFE, at least its quality): "
                  f"{digits_verdict(result)}.", ""]
    lines += ["Issue 16's target for the solvers (the best of euler, euler_ancestral, "
              "dpmpp_2m, ipndm at that NFE):", "", *solver_verdict(result), ""]
    lines += other_seeds_section(result)
    if "between_levels" in result:
        lines += ["Between the table's levels: the denoising error E|sigma s(x + sigma z, "
                  f"sigma) + z|^2 of {result['n']} real digits (d = 64) at table levels and at "
                  "the geometric midpoint to the next level.", "",
                  "| level | sigma | error | midpoint sigma | error there |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['level']} | {r['sigma']:.4g} | {r['on']:.2f} | {r['midpoint']:.4g} | "
                  f"{r['between']:.2f} |" for r in result["between_levels"]]
        lines.append("")
    return lines


def other_seeds_section(result: dict) -> list[str]:
    """The settings also run at other seeds (``--merge-seeds``): FID per seed, mean, std."""
    others = result.get("other_seeds", {})
    if not others or isinstance(result["rows"][0]["fid"], list):
        return []
    seeds = [result.get("seed", 0), *sorted(others, key=int)]
    by_seed = {str(result.get("seed", 0)): result["rows"], **others}
    labels = [r["sampler"] for r in result["rows"]
              if all(any(o["sampler"] == r["sampler"] for o in rows) for rows in others.values())]
    lines = ["The same checkpoint at other sampling seeds (feature FID; confidence averaged):", "",
             "| sampler | NFE | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean +- std | confidence |", "|---|---:|" + "---:|" * (len(seeds) + 2)]
    for label in labels:
        rows = [next(r for r in by_seed[str(s)] if r["sampler"] == label) for s in seeds]
        fid = _mean_std([r["fid"] for r in rows])
        lines.append(f"| {label} | {_mean([r['nfe'] for r in rows]):.0f} | "
                     + " | ".join(f"{r['fid']:.2f}" for r in rows)
                     + f" | {fid[0]:.2f} +- {fid[1]:.2f} | "
                     f"{_mean([r['confidence'] for r in rows]):.3f} |")
    return lines + [""]


def plot_results(results: dict, path: Path) -> None:
    from ncsn import viz

    plt = viz.plt
    panels = [(setup, key, title) for setup, key, title in (
        ("swiss", "swd", "Swiss roll: SWD"), ("digits", "fid", "digits: feature FID"),
        ("digits_continuous", "fid", "digits, continuous sigma: feature FID"),
        ("digits_edm", "fid", "digits, EDM precond + loss: feature FID"))
        if setup in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (setup, key, title) in zip(axes[0], panels):
        rows = results[setup]["rows"]
        value = lambda r: r[key][0] if isinstance(r[key], list) else r[key]    # noqa: E731
        for name in dict.fromkeys(family(r["sampler"]) for r in rows[1:]):
            chosen = [r for r in rows[1:] if family(r["sampler"]) == name
                      and "S_churn" not in r["sampler"] and not r["sampler"].endswith("table")
                      and "log_uniform" not in r["sampler"]]
            if chosen:
                ax.plot([r["nfe"] for r in chosen], [value(r) for r in chosen], "o-",
                        label=name)
        table = [r for r in rows if r["sampler"].endswith("table")]
        if table:
            ax.plot([r["nfe"] for r in table], [value(r) for r in table], "^",
                    label="heun / pc on the table's levels")
        churn = [r for r in rows if "S_churn" in r["sampler"]]
        if churn:
            ax.plot([r["nfe"] for r in churn], [value(r) for r in churn], "s",
                    label="heun with churn (S_churn > 0)")
        langevin = rows[0]
        ax.plot([langevin["nfe"]], [value(langevin)], "k*", markersize=12,
                label="annealed Langevin")
        ax.axhline(value(langevin), color="k", linestyle="--", linewidth=0.8)
        ax.axvline(langevin["nfe"] / 10, color="grey", linestyle=":", linewidth=0.8)
        if setup == "swiss":
            ax.axhline(results["swiss"]["floor"][0], color="green", linestyle=":",
                       linewidth=0.8, label="fresh data vs fresh data")
        else:
            ax.axhline(results[setup]["real"]["fid"][0], color="green", linestyle=":",
                       linewidth=0.8, label="real training digits")
        ax.set_xscale("log")
        if key == "fid":
            ax.set_yscale("log")
        ax.set_xlabel("NFE (dotted: one tenth of annealed Langevin's)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    viz.save_figure(fig, path)


# ----------------------------------------------------------------------------- main
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swiss-ckpt", type=Path)
    parser.add_argument("--digits-ckpt", type=Path)
    parser.add_argument("--digits-continuous-ckpt", type=Path,
                        help="a digits run trained with noise.continuous=true")
    parser.add_argument("--digits-edm-ckpt", type=Path,
                        help="a digits run trained with model.precond=edm loss=edm")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--only", nargs="*", help="run these settings only (labels), keeping "
                        "the other rows of --json")
    parser.add_argument("--n-swiss", type=int, default=2000)
    parser.add_argument("--swiss-seeds", type=int, default=3)
    parser.add_argument("--n-digits", type=int, default=300)
    parser.add_argument("--digits-seed", type=int, default=0,
                        help="the digits' sampling seed (another seed: another --json)")
    parser.add_argument("--digits-seeds", type=int, default=3,
                        help="batches per setting on the digits (seeds --digits-seed on)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "samplers.json")
    parser.add_argument("--page", type=Path, default=REPO / "docs" / "SAMPLERS.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "samplers.png")
    parser.add_argument("--merge-seeds", nargs="*", type=Path, default=[],
                        help="JSON files of --digits-seed runs: tabulated per seed")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the page and the plot from --json")
    args = parser.parse_args()

    if args.render_only:
        results = json.loads(args.json.read_text())
        for other in map(lambda p: json.loads(p.read_text()), args.merge_seeds):
            for setup in DIGITS_TITLES:
                if setup in other and setup in results:
                    results[setup].setdefault("other_seeds", {})[str(other[setup]["seed"])] = \
                        other[setup]["rows"]
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        render(results, args.page, args.plot)
        return
    torch.set_num_threads(1)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results["machine"] = f"{cpu_name()}, torch {torch.__version__}"

    def save() -> None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")

    given = {"swiss": args.swiss_ckpt, "digits": args.digits_ckpt,
             "digits_continuous": args.digits_continuous_ckpt,
             "digits_edm": args.digits_edm_ckpt}
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups:
            path = given[setup] or train_experiment(SETUPS[setup], Path(tmp) / setup)
            result = results.setdefault(setup, {})
            if setup == "swiss":
                swiss_rows(load_checkpoint(path), args.n_swiss, args.swiss_seeds, result, save,
                           args.only)
            else:
                digits_rows(load_checkpoint(path), args.n_digits, result, save, args.only,
                            args.digits_seed, args.digits_seeds)
    render(results, args.page, args.plot)
    print(f"wrote {args.page}, {args.plot}, {args.json}")


if __name__ == "__main__":
    main()

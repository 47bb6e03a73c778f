"""Check the few-step solvers against the reference code: k-diffusion's ``sample_euler``,
``sample_euler_ancestral`` and ``sample_dpmpp_2m`` (crowsonkb/k-diffusion,
k_diffusion/sampling.py) and diff-sampler's ``ipndm_sampler`` (zju-pi/diff-sampler,
diff-solvers-main/solvers.py, with ``denoise_to_zero``), run on the same denoiser
D(x; sigma) = x + sigma^2 s(x, sigma), from the same start and with the same noise, as
``sampler=euler``, ``euler_ancestral``, ``dpmpp_2m`` and ``ipndm``. Prints a table of the
largest absolute difference of the samples and of each side's network evaluations.

Two comparisons per row. "same grid": both solvers are given ncsn's grid (the reference's
with k-diffusion's appended zero), so the difference is the solvers' arithmetic alone.
"own schedule": the reference runs on its own schedule function (k-diffusion's
``get_sigmas_karras`` / ``get_sigmas_exponential``, diff-sampler's ``get_schedule``
'polynomial' / 'logsnr'), ncsn through ``ncsn.registry.build_sampler`` from the config
``sampler=NAME sampler.num_steps=N sampler.schedule=S`` over a sigma table's ends.

The reference code is read at run time from checkouts given on the command line (export
the public repositories, e.g. ``git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/kdiff``);
nothing of it is kept here. Only k_diffusion/sampling.py and its utils.py are loaded (not
the package's __init__, which imports its models and trainers); the modules they import at
the top that these samplers never call (torchdiffeq, torchsde, safetensors) are replaced
by stubs when they are not installed.

    python scripts/check_solvers.py --k-diffusion /tmp/kdiff --diff-sampler /tmp/diffsampler
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ncsn import GaussianMixture, registry
from ncsn.generate import sampler_config
from ncsn.nets.mlp import ConditionalMLP
from ncsn.noise import geometric_sigmas
from ncsn.sampling import (CountingNet, dpmpp_2m, edm_sigmas, euler, euler_ancestral,
                           ipndm)

SIGMA_MAX, SIGMA_MIN = 20.0, 0.01
SOLVERS = {"euler": euler, "euler_ancestral": euler_ancestral, "dpmpp_2m": dpmpp_2m,
           "ipndm": ipndm}


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def missing(attribute):
        def call(*args, **kwargs):
            raise RuntimeError(f"{name}.{attribute} is a stub of scripts/check_solvers.py")
        return call
    module.__getattr__ = missing
    return module


def load_k_diffusion(root: Path):
    """k_diffusion.sampling from a checkout, without the package's __init__."""
    for name in ("torchdiffeq", "torchsde", "safetensors"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _stub(name)
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root / "k_diffusion")]
    sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling")


def load_diff_sampler(root: Path):
    """diff-sampler's solvers.py (it imports its solver_utils.py by a top-level name)."""
    sys.path.insert(0, str(root / "diff-solvers-main"))
    return importlib.import_module("solvers")


class Counted:
    """A reference-side model that counts its calls."""

    def __init__(self, fn):
        self.fn, self.nfe = fn, 0

    def __call__(self, *args, **kwargs):
        self.nfe += 1
        return self.fn(*args, **kwargs)


def models(dtype: torch.dtype):
    """(label, score network ``s(x, sigma)``, batch start z ~ N(0, I)): the exact score of a
    2-D Gaussian mixture, and an untrained cond_mlp on 8-D points (log-sigma embedding,
    output divided by sigma)."""
    g = torch.Generator().manual_seed(0)
    mixture = GaussianMixture.create([[-5.0, -5.0], [5.0, 5.0]], [0.2, 0.8], 1.0)
    torch.manual_seed(0)
    net = ConditionalMLP(8, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 10), hidden=64, n_layers=2,
                         embedding="log_sigma", scale_by_sigma=True).eval()

    def network(x, sigma):               # the network in float32, its score in x's dtype
        return net(x.float(), sigma.float()).to(x.dtype)
    return [("2-D mixture, exact score", mixture.score,
             torch.randn(512, 2, generator=g, dtype=dtype)),
            ("cond_mlp (untrained, d = 8)", network,
             torch.randn(256, 8, generator=g, dtype=dtype))]


def reference_run(k, ds, name, score, z, sigmas):
    """The reference solver from z sigmas[0] on ``sigmas`` ``(N,)`` (largest first);
    returns (samples, its model calls)."""
    def denoiser(x, sigma):              # k-diffusion's model(x, sigma), sigma (B,)
        return x + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2 * score(x, sigma)

    def edm_net(x, t, class_labels=None):   # diff-sampler's net(x, t), t a 0-d tensor
        return x + t ** 2 * score(x, t.expand(x.shape[0]))

    if name == "ipndm":
        model = Counted(edm_net)
        out = ds.ipndm_sampler(model, z, num_steps=len(sigmas), t_steps=sigmas,
                               denoise_to_zero=True, max_order=4)
        return out, model.nfe
    model = Counted(denoiser)
    sample = {"euler": k.sample_euler, "euler_ancestral": k.sample_euler_ancestral,
              "dpmpp_2m": k.sample_dpmpp_2m}[name]
    return sample(model, z * sigmas[0], k.append_zero(sigmas), disable=True), model.nfe


def reference_schedule(k, ds, name, schedule, n, dtype):
    """The reference's own grid of n levels, in ``dtype`` (their functions compute in the
    default dtype)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if name == "ipndm":
            kind = "polynomial" if schedule == "karras" else "logsnr"
            return ds.get_schedule(n, SIGMA_MIN, SIGMA_MAX, schedule_type=kind, schedule_rho=7.0)
        if schedule == "karras":
            return k.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0)[:-1]
        return k.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX)[:-1]
    finally:
        torch.set_default_dtype(default)


def ncsn_grid(schedule: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    if schedule == "karras":
        return edm_sigmas(SIGMA_MAX, SIGMA_MIN, n, 7.0, dtype)
    return geometric_sigmas(SIGMA_MAX, SIGMA_MIN, n, dtype)


def compare(k, ds, steps, dtype, seed):
    rows = []
    table = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 10, dtype)
    model_cfg = OmegaConf.create({"name": "cond_mlp", "embedding": "log_sigma"})
    for label, score, z in models(dtype):
        for schedule in ("karras", "log_uniform"):
            for n in steps:
                for name, solver in SOLVERS.items():
                    grid = ncsn_grid(schedule, n, dtype)
                    torch.manual_seed(seed)
                    ref, ref_nfe = reference_run(k, ds, name, score, z, grid)
                    counted = CountingNet(score)
                    torch.manual_seed(seed)
                    ours = solver(counted, z * grid[0], grid)
                    cfg = sampler_config({"name": name}, {"num_steps": n, "schedule": schedule})
                    sampler = registry.build_sampler(cfg, table, model_cfg)
                    own = reference_schedule(k, ds, name, schedule, n, dtype)
                    torch.manual_seed(seed)
                    ref_own, _ = reference_run(k, ds, name, score, z, own)
                    torch.manual_seed(seed)
                    ours_cfg = sampler(score, z * table[0])
                    rows.append((label, schedule, n, name, ref_nfe, counted.nfe,
                                 registry.planned_nfe(cfg, len(table)),
                                 (ours - ref).abs().max().item(),
                                 (ours_cfg - ref_own).abs().max().item(),
                                 ref.abs().max().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k-diffusion", type=Path, required=True,
                        help="a checkout of crowsonkb/k-diffusion (holding k_diffusion/)")
    parser.add_argument("--diff-sampler", type=Path, required=True,
                        help="a checkout of zju-pi/diff-sampler (holding diff-solvers-main/)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 3, 10, 25])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    k = load_k_diffusion(args.k_diffusion.resolve())
    ds = load_diff_sampler(args.diff_sampler.resolve())
    with torch.no_grad():
        rows = compare(k, ds, args.steps, getattr(torch, args.dtype), args.seed)
    print(f"{args.dtype}, N = {', '.join(map(str, args.steps))} levels (the largest "
          f"difference over the N):\n")
    print("| model | schedule | sampler | NFE: reference / ncsn / planned | max abs diff, "
          "same grid | max abs diff, own schedule | max abs sample |")
    print("|---|---|---|---|---:|---:|---:|")
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault(row[:2] + row[3:4], []).append(row)
    for (label, schedule, name), group in groups.items():
        nfe = " / ".join(",".join(str(r[i]) for r in group) for i in (4, 5, 6))
        print(f"| {label} | {schedule} | {name} | {nfe} | {max(r[7] for r in group):.1e} | "
              f"{max(r[8] for r in group):.1e} | {max(r[9] for r in group):.2f} |")
    worst = max(max(r[7], r[8]) / max(r[9], 1.0) for r in rows)
    counts = all(r[4] == r[5] == r[6] == r[2] for r in rows)
    print(f"\nlargest difference relative to the samples' scale: {worst:.1e}; "
          f"NFE = N on every row, for all three: {counts}")

if __name__ == "__main__":
    main()

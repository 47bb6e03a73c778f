"""Check ``sampler=pc`` and ``sampler=ode`` against score SDE's code: score_sde_pytorch's
``get_pc_sampler`` (``ReverseDiffusionPredictor`` or ``EulerMaruyamaPredictor`` with the
``LangevinCorrector``, snr 0.16, one corrector step, continuous-time VE) and
``get_ode_sampler`` (RK45, rtol = atol = 1e-5), run on the same score function, from the
same start x_T and with the same noise, beside ncsn's ``predictor_corrector`` and
``probability_flow``. Prints a table of the largest absolute difference of the samples and
of each side's network evaluations (NFE).

The reference's model is called as score SDE calls a continuous-time VE model
(models/utils.py ``get_score_fn``: ``model(x, labels)`` with ``labels = sigma(t)``), and
ncsn's as ``net(x, sigma)``: both are the same function. Both sides draw every normal from
torch's global generator in the same order (x_T = sigma_max z, then one draw per corrector
step and one per predictor step), seeded alike, so the noise is the same draw for draw.

Two comparisons per row. "same levels": ncsn's function is given the reference's levels as
the reference computes them (its ``marginal_prob`` of each step's batch of times, its
``discrete_sigmas`` table), so the difference is the samplers' arithmetic alone. "own
config": ncsn runs as ``ncsn-sample`` would, through ``ncsn.registry.build_sampler`` from
``sampler=pc`` / ``sampler=ode`` over a network's table ``geometric_sigmas(sigma_max,
sigma_min, N)`` (computed in float64 and cast, where score SDE's is float32's exp of a
float32 linspace).

The reference code is read at run time from a checkout given on the command line (export
the public repository: ``git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/score_sde``);
nothing of it is kept here. Only its sde_lib.py, sampling.py and models/utils.py are loaded;
none of these imports the ``op`` CUDA extension.

    python scripts/check_score_sde_samplers.py --score-sde-ref /tmp/score_sde
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ncsn import GaussianMixture, registry
from ncsn.generate import sampler_config
from ncsn.nets.mlp import ConditionalMLP
from ncsn.noise import geometric_sigmas
from ncsn.sampling import CountingNet, predictor_corrector, probability_flow

SIGMA_MAX, SIGMA_MIN, EPS = 50.0, 0.01, 1e-5     # score SDE's CIFAR-10 VE SDE, sampling_eps
SHAPE = (128, 2, 2, 2)                           # score SDE's samplers index G[:, None, None, None]
MODEL_CFG = OmegaConf.create({"name": "cond_mlp", "embedding": "log_sigma"})


def load_score_sde(root: Path):
    """(sde_lib, sampling) from a checkout; they import ``models.utils`` and ``sde_lib`` by
    top-level names."""
    sys.path.insert(0, str(root))
    return importlib.import_module("sde_lib"), importlib.import_module("sampling")


class Model(torch.nn.Module):
    """score SDE's view of a score function: ``model(x, labels)``, labels = sigma(t); counts
    its calls."""

    def __init__(self, score):
        super().__init__()
        self.score, self.nfe = score, 0

    def forward(self, x, labels):
        self.nfe += 1
        return self.score(x, labels)


def scores():
    """(label, score ``s(x, sigma)`` on ``(B, 2, 2, 2)``): the exact score of a Gaussian
    mixture in 8-D, and an untrained cond_mlp on the 8 values (log-sigma embedding, output
    divided by sigma)."""
    mixture = GaussianMixture.create([[-3.0] * 8, [3.0] * 8], [0.3, 0.7], 1.0)
    torch.manual_seed(0)
    net = ConditionalMLP(8, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 10), hidden=64, n_layers=2,
                         embedding="log_sigma", scale_by_sigma=True).eval()
    return [("8-D mixture, exact score", lambda x, s: mixture.score(x.flatten(1), s).view_as(x)),
            ("cond_mlp (untrained, d = 8)", lambda x, s: net(x.flatten(1), s).view_as(x))]


def reference_levels(sde, n):
    """What the reference's PC sampler computes at each step: the network's sigma (its
    ``marginal_prob`` of the batch's times, as ``get_score_fn`` does) and the table."""
    timesteps = torch.linspace(sde.T, EPS, n)
    sigmas = torch.stack([sde.marginal_prob(torch.zeros(SHAPE[0]),
                                            torch.ones(SHAPE[0]) * t)[1][0] for t in timesteps])
    return sigmas, sde.discrete_sigmas.flip(0)


def run_pc(sde_lib, sampling, score, n, predictor, denoise, seed):
    sde = sde_lib.VESDE(SIGMA_MIN, SIGMA_MAX, n)
    predictor_cls = {"reverse_diffusion": sampling.ReverseDiffusionPredictor,
                     "euler_maruyama": sampling.EulerMaruyamaPredictor}[predictor]
    pc = sampling.get_pc_sampler(sde, SHAPE, predictor_cls, sampling.LangevinCorrector,
                                 lambda x: x, snr=0.16, n_steps=1, continuous=True,
                                 denoise=denoise, eps=EPS, device="cpu")
    model = Model(score)
    torch.manual_seed(seed)
    ref, ref_nfe = pc(model)

    sigmas, table = reference_levels(sde, n)
    counted = CountingNet(score)
    torch.manual_seed(seed)
    x_T = torch.randn(*SHAPE) * SIGMA_MAX                       # sde.prior_sampling
    ours = predictor_corrector(counted, x_T, sigmas, 0.16, 1, predictor, denoise, table=table)

    cfg = sampler_config({"name": "pc"}, {"predictor": predictor, "denoise": denoise})
    sampler = registry.build_sampler(cfg, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, n), MODEL_CFG)
    torch.manual_seed(seed)
    x_T = torch.randn(*SHAPE) * SIGMA_MAX
    own = sampler(score, x_T)
    return (ref_nfe, model.nfe, counted.nfe, registry.planned_nfe(cfg, n),
            (ours - ref).abs().max().item(), (own - ref).abs().max().item(),
            ref.abs().max().item())


def run_ode(sde_lib, sampling, score, n, denoise, seed):
    sde = sde_lib.VESDE(SIGMA_MIN, SIGMA_MAX, n)
    ode = sampling.get_ode_sampler(sde, SHAPE, lambda x: x, denoise=denoise, rtol=1e-5,
                                   atol=1e-5, method="RK45", eps=EPS, device="cpu")
    torch.manual_seed(seed)
    x_T = torch.randn(*SHAPE) * SIGMA_MAX
    model = Model(score)
    ref, ref_nfe = ode(model, z=x_T)
    counted = CountingNet(score)
    ours = probability_flow(counted, x_T, SIGMA_MAX, SIGMA_MIN, 1e-5, 1e-5, "RK45", denoise,
                            eps=EPS)
    cfg = sampler_config({"name": "ode"}, {"denoise": denoise})
    sampler = registry.build_sampler(cfg, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, n), MODEL_CFG)
    own = sampler(score, x_T)
    return (ref_nfe, model.nfe, counted.nfe, registry.planned_nfe(cfg, n),
            (ours - ref).abs().max().item(), (own - ref).abs().max().item(),
            ref.abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--score-sde-ref", type=Path, required=True,
                        help="a checkout of yang-song/score_sde_pytorch (holding sampling.py)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sde_lib, sampling = load_score_sde(args.score_sde_ref.resolve())
    print(f"VE SDE sigma in [{SIGMA_MIN}, {SIGMA_MAX}], eps = {EPS}, float32, batch "
          f"{SHAPE}, N = {', '.join(map(str, args.steps))}\n")
    print("| score | sampler | denoise | N | NFE: reference reports / reference calls / ncsn "
          "counts / planned | max abs diff, same levels | max abs diff, own config | "
          "max abs sample |")
    print("|---|---|---|---|---|---:|---:|---:|")
    worst = 0.0
    with torch.no_grad():
        for label, score in scores():
            for denoise in (True, False):
                runs = [(f"pc ({p})", n, run_pc(sde_lib, sampling, score, n, p, denoise,
                                                args.seed))
                        for p in ("reverse_diffusion", "euler_maruyama") for n in args.steps]
                runs.append(("ode (RK45)", "—", run_ode(sde_lib, sampling, score,
                                                        args.steps[-1], denoise, args.seed)))
                for name, n, r in runs:
                    nfe = " / ".join("—" if v is None else str(v) for v in r[:4])
                    print(f"| {label} | {name} | {denoise} | {n} | {nfe} | {r[4]:.1e} | "
                          f"{r[5]:.1e} | {r[6]:.2f} |")
                    worst = max(worst, r[5] / max(r[6], 1.0))
    print(f"\nlargest difference relative to the samples' scale (own config): {worst:.1e}")


if __name__ == "__main__":
    main()

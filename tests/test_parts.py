"""Samplers and objectives are classes registered in tables: a new one is added from outside
the package (here, from a test) without touching ncsn.registry, and composes, checks, plans
its NFE, trains and samples like the built-in ones."""
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from ncsn import registry, training
from ncsn.noise import geometric_sigmas
from ncsn.parts import ConfigError
from ncsn.samplers import SAMPLERS, SamplerInitConfig, SamplerSpec, register_sampler
from conftest import TINY, compose_train

BASE = [o for o in TINY if not o.startswith("sampler.")]


class EulerFlow(SamplerSpec):
    """Euler steps along the probability-flow ODE of the VE SDE, dx = -1/2 d(sigma^2) s(x,
    sigma), over ``num_steps`` geometric levels from sigma_begin to sigma_end: NFE num_steps."""

    @dataclass
    class Config(SamplerInitConfig):
        name: str = "toy_euler"
        num_steps: int = 200

    annealed = True

    def sigma_grid(self, sigmas, network=None):
        return geometric_sigmas(float(sigmas[0]), float(sigmas[-1]), self.cfg.num_steps)

    def nfe(self, n_levels):
        return self.cfg.num_steps

    def build(self, sigmas, network=None):
        grid = self.sigma_grid(sigmas, network)

        @torch.no_grad()
        def run(net, x, return_trajectory=False, progress=False, **kw):
            levels = [*grid.tolist(), 0.0]
            for sigma, following in zip(levels[:-1], levels[1:]):
                score = net(x, torch.full((len(x),), sigma, dtype=x.dtype))
                x = x + 0.5 * (sigma ** 2 - following ** 2) * score
            return (x, x[None]) if return_trajectory else x
        return run


@pytest.fixture
def toy_sampler():
    register_sampler(EulerFlow)
    yield "toy_euler"
    SAMPLERS.pop("toy_euler")


def test_a_sampler_registered_from_outside_composes_checks_and_plans(toy_sampler):
    cfg = compose_train(BASE + [f"sampler={toy_sampler}", "sampler.num_steps=7"])
    assert cfg.sampler.name == "toy_euler" and cfg.sampler.num_steps == 7
    assert registry.planned_nfe(cfg.sampler, n_levels=10) == 7
    assert registry.part_problems(cfg) == []
    unconditional = compose_train(BASE + [f"sampler={toy_sampler}", "model=mlp", "loss=ssm"])
    assert registry.part_problems(unconditional) == [
        "sampler=toy_euler needs a noise-conditional network, but model=mlp is unconditional; "
        "use sampler=langevin"]
    with pytest.raises(ConfigError, match="unknown sampler 'toy_eule'"):
        registry.build_sampler(OmegaConf.merge(cfg.sampler, {"name": "toy_eule"}),
                               torch.ones(2))


def test_a_registered_sampler_draws_from_the_analytic_score(toy_sampler):
    # Data N(0, tau^2): the sigma-perturbed score is -x / (tau^2 + sigma^2), and the ODE carries
    # N(0, tau^2 + sigma_max^2) to N(0, tau^2).
    tau, sigmas = 0.5, geometric_sigmas(20.0, 0.01, 10)
    cfg = compose_train(BASE + [f"sampler={toy_sampler}", "sampler.num_steps=1000"]).sampler
    sampler = registry.build_sampler(cfg, sigmas, compose_train(BASE).model)
    torch.manual_seed(0)
    x = registry.initial_samples(cfg, 20_000, (2,), sigmas, "cpu")
    samples = sampler(lambda y, sigma: -y / (tau ** 2 + sigma[:, None] ** 2), x)
    assert samples.std().item() == pytest.approx(tau, rel=0.03)


def test_a_registered_sampler_trains_and_draws_the_pictures(toy_sampler, tmp_path):
    cfg = compose_train(BASE + [f"sampler={toy_sampler}", "sampler.num_steps=5",
                                "trainer.n_plot_samples=64"])
    training.train(cfg, tmp_path)
    assert (tmp_path / "pictures" / "samples.png").is_file()
    assert (tmp_path / "checkpoints" / "last.pt").is_file()

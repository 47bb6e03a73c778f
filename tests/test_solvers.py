"""The few-step solvers (issue 16): Euler, Euler ancestral, DPM-Solver++(2M) and iPNDM on the
denoiser D(x; sigma) = x + sigma^2 s(x, sigma), against analytic scores (a Gaussian
mixture, a Gaussian whose probability-flow ODE is linear); their exact network-evaluation
counts; their configs; their refusal of networks that look sigma up in a table. That they
equal k-diffusion's and diff-sampler's is scripts/check_solvers.py (docs/SAMPLERS.md)."""
import math

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ncsn import registry, training
from ncsn.checkpoint import load_checkpoint
from ncsn.cli import precheck
from ncsn.generate import load_sampler
from ncsn.noise import geometric_sigmas
from ncsn.registry import ConfigError
from ncsn.sampling import (CountingNet, KnownValues, ancestral_step, dpmpp_2m, edm_sigmas, euler,
                           euler_ancestral, ipndm, per_sample_noise)
from conftest import TINY, compose_train
from test_fast_samplers import (SIGMA_MAX, SIGMA_MIN, assert_recovers_the_mixture,
                                gaussian_score, mixture_score, sampler_cfg, start)

SOLVERS = {"euler": euler, "euler_ancestral": euler_ancestral, "dpmpp_2m": dpmpp_2m,
           "ipndm": ipndm}
BASE = [o for o in TINY if not o.startswith("sampler.")]


def karras(n):
    return edm_sigmas(SIGMA_MAX, SIGMA_MIN, n)


# Steps enough for each solver's discretization error to be well under the test's sampling
# error on 4000 points (first-order Euler and the ancestral chain need more than the
# second-order multistep solvers).
CHAINS = {
    "euler": lambda net, x: euler(net, x, karras(100)),
    "euler_ancestral": lambda net, x: euler_ancestral(net, x, karras(200)),
    "dpmpp_2m": lambda net, x: dpmpp_2m(net, x, karras(30)),
    "dpmpp_2m_log_uniform": lambda net, x: dpmpp_2m(
        net, x, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 30)),
    "ipndm": lambda net, x: ipndm(net, x, karras(30)),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_solvers_recover_the_mixtures_weights_means_and_covariances(name):
    torch.manual_seed(0)
    assert_recovers_the_mixture(CHAINS[name](mixture_score, start()))


def flow_error(solver, n: int, s0: float = 0.5) -> float:
    """The largest error, relative, of ``solver`` on n levels for N(0, s0^2) data, where
    the flow from sigma_max to sigma_min then D(x; sigma_min) is the linear map
    x sqrt((s0^2 + sigma_min^2) / (s0^2 + sigma_max^2)) s0^2 / (s0^2 + sigma_min^2)."""
    g = torch.Generator().manual_seed(0)
    x = math.sqrt(s0 ** 2 + SIGMA_MAX ** 2) * torch.randn(64, 3, dtype=torch.float64, generator=g)
    exact = x * math.sqrt((s0 ** 2 + SIGMA_MIN ** 2) / (s0 ** 2 + SIGMA_MAX ** 2)) \
        * s0 ** 2 / (s0 ** 2 + SIGMA_MIN ** 2)
    out = solver(gaussian_score(s0), x, edm_sigmas(SIGMA_MAX, SIGMA_MIN, n, dtype=torch.float64))
    return float((out - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("name, order", [("euler", 1), ("dpmpp_2m", 2), ("ipndm", 2)])
def test_deterministic_solvers_converge_to_the_flow_at_their_order(name, order):
    """Doubling the steps divides the error by 2^order (so the error goes to 0): Euler is
    first order, DPM-Solver++(2M) second (Lu et al. 2022); iPNDM's fourth-order
    Adams-Bashforth steps start with an Euler step, whose O(h^2) local error keeps it second
    order globally."""
    coarse, fine = flow_error(SOLVERS[name], 32), flow_error(SOLVERS[name], 64)
    assert 0.8 * 2 ** order < coarse / fine < 1.25 * 2 ** order


def test_the_ancestral_step_is_the_gaussian_posterior():
    """At eta = 1, x + (sigma_down - sigma)(x - D)/sigma + sigma_up z has the mean and the
    variance of q(x_next | x, x_0 = D): D + (sigma_next/sigma)^2 (x - D) and
    sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2; the two levels make up sigma_next."""
    sigma, sigma_next, x, D = torch.tensor([3.0, 1.2, 2.0, -0.5], dtype=torch.float64)
    down, up = ancestral_step(sigma, sigma_next, eta=1.0)
    torch.testing.assert_close(down ** 2 + up ** 2, sigma_next ** 2)
    torch.testing.assert_close(x + (down - sigma) * (x - D) / sigma,
                               D + (sigma_next / sigma) ** 2 * (x - D))
    torch.testing.assert_close(up ** 2,
                               sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    half_down, half_up = ancestral_step(sigma, sigma_next, eta=0.5)
    torch.testing.assert_close(half_up, up / 2)
    down, up = ancestral_step(sigma, sigma_next, eta=0.0)
    assert down == sigma_next and up == 0


def test_euler_ancestral_without_noise_is_euler():
    x = start(64)
    assert torch.equal(euler_ancestral(mixture_score, x, karras(8), eta=0.0),
                       euler(mixture_score, x, karras(8)))


def test_euler_ancestral_draws_each_samples_noise_from_its_own_generator():
    """Inside per_sample_noise sample i's chain does not depend on the batch it is in."""
    x = start(6)
    with per_sample_noise(seed=3, indices=range(6)):
        whole = euler_ancestral(mixture_score, x, karras(5))
    parts = []
    for rows in (range(0, 2), range(2, 6)):
        with per_sample_noise(seed=3, indices=rows):
            parts.append(euler_ancestral(mixture_score, x[rows.start:rows.stop], karras(5)))
    assert torch.equal(whole, torch.cat(parts))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_the_known_values_come_back_exactly(name):
    """``known(x, sigma)`` (inpainting's hook) is applied before every evaluation and to the
    result, as in heun."""
    y = torch.zeros(16, 2)
    y[:, 0] = torch.where(torch.arange(16) % 2 == 0, 5.0, -5.0)
    known = KnownValues(y, torch.tensor([True, False]))
    x = SOLVERS[name](mixture_score, SIGMA_MAX * torch.randn(16, 2), karras(5), known=known)
    assert torch.equal(x[:, 0], y[:, 0])


# ----------------------------------------------------------------------------- NFE and configs
@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("n", [2, 7])
def test_nfe_is_num_steps_and_is_planned(name, n):
    cfg = sampler_cfg(name, num_steps=n)
    sampler = registry.build_sampler(cfg, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 10))
    net = CountingNet(mixture_score)
    out, trajectory = sampler(net, start(8), return_trajectory=True)
    assert net.nfe == n == registry.planned_nfe(cfg, 10)
    assert trajectory.shape == (n + 1, 8, 2) and torch.equal(trajectory[-1], out)


@pytest.mark.parametrize("schedule, grid", [
    ("karras", lambda: edm_sigmas(2.0, 0.01, 6, rho=5.0)),
    ("log_uniform", lambda: geometric_sigmas(2.0, 0.01, 6)),
    # table: 6 of the 20 table levels, evenly spaced in index, the ends included
    ("table", lambda: geometric_sigmas(2.0, 0.01, 20)[[0, 4, 8, 11, 15, 19]])])
def test_a_composed_solver_steps_on_its_schedule_between_the_tables_ends(schedule, grid):
    cfg = compose_train(BASE + ["sampler=dpmpp_2m", "sampler.num_steps=6",
                                f"sampler.schedule={schedule}", "sampler.rho=5"])
    assert registry.part_problems(cfg) == []
    sigmas = geometric_sigmas(2.0, 0.01, 20)
    torch.testing.assert_close(registry.sigma_grid(cfg.sampler, sigmas), grid())
    seen = []

    def net(x, sigma):
        seen.append(float(sigma[0]))
        return mixture_score(x, sigma)
    registry.build_sampler(cfg.sampler, sigmas, cfg.model)(net, torch.randn(4, 2))
    assert seen == pytest.approx(grid().tolist(), rel=1e-6)


def test_solver_configs_compose_with_their_keys_and_refuse_bad_values():
    cfg = compose_train(BASE + ["sampler=euler_ancestral", "sampler.eta=0.5"])
    assert (cfg.sampler.eta, cfg.sampler.s_noise, cfg.sampler.num_steps) == (0.5, 1.0, 50)
    assert compose_train(BASE + ["sampler=ipndm"]).sampler.max_order == 4
    with pytest.raises(ConfigCompositionException, match="etaa"):
        compose_train(BASE + ["sampler=euler_ancestral", "sampler.etaa=0.5"])
    bad = compose_train(BASE + ["sampler=euler", "sampler.schedule=cosine"])
    assert registry.part_problems(bad) == [
        "sampler.schedule must be one of karras, log_uniform, table, got 'cosine'"]
    bad = compose_train(BASE + ["sampler=ipndm", "sampler.max_order=5"])
    assert registry.part_problems(bad) == ["sampler.max_order must be 1 to 4, got 5"]
    with pytest.raises(ConfigError, match="num_steps"):
        registry.build_sampler(sampler_cfg("euler", num_steps=1), geometric_sigmas(1, 0.01, 5))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_table_network_given_a_solver_is_refused_in_one_line(name):
    cfg = compose_train(BASE + [f"sampler={name}", "model.embedding=multiplicative"])
    problems = registry.part_problems(cfg)
    assert problems == [
        f"sampler={name} evaluates the network between its table's levels, but "
        f"model=cond_mlp (embedding=multiplicative) can only look sigma up in its table; use "
        f"sampler.schedule=table (it steps on the table's levels), sampler=heun or "
        f"sampler=pc, or model.embedding=log_sigma"]
    with pytest.raises(ConfigError) as err:
        precheck.check_train(cfg)
    assert "\n" not in str(err.value)
    # On the table's own levels the same network is served.
    assert registry.part_problems(compose_train(
        BASE + [f"sampler={name}", "model.embedding=multiplicative", "sampler.schedule=table",
                "sampler.num_steps=5"])) == []
    with pytest.raises(ConfigError, match="or model=ncsnv2 or model=unet$"):
        registry.check_sampler(sampler_cfg(name), OmegaConf.create({"name": "ncsn"}))


def test_a_checkpoint_sampled_by_a_solver_counts_num_steps(tmp_path):
    """The count ``ncsn-sample`` and ``ncsn-eval`` print (``NFE: 4 network evaluations per
    sample``, from ``CheckpointSampler.nfe_summary``; the line itself: test_fast_samplers)."""
    ckpt = load_checkpoint(training.train(compose_train([*TINY, "trainer.n_steps=2"]), tmp_path))
    for name in SOLVERS:
        sampler = load_sampler(ckpt, sampler_cfg(name, num_steps=4), device="cpu")
        assert [len(batch) for batch in sampler.batches(6, 4)] == [4, 2]
        assert sampler.nfe_summary() == "4 network evaluations"

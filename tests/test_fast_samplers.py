"""The faster samplers (score SDE's predictor-corrector and probability-flow ODE, EDM's Heun
sampler) against analytic scores: a sigma-perturbed Gaussian mixture and a Gaussian, whose
probability-flow ODE is linear; exact network-evaluation counts; inpainting."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.integrate import solve_ivp

from ncsn import GaussianMixture, registry
from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.generate import load_sampler, sampler_config
from ncsn.noise import geometric_sigmas
from ncsn.registry import ConfigError
from ncsn.sampling import (CountingNet, KnownValues, annealed_langevin, edm_sigmas, heun,
                           langevin_corrector_step_size, predictor_corrector, probability_flow,
                           score_sde_sigmas, score_sde_times, table_subset)
from conftest import TINY, compose_train, run_cli

SIGMA_MAX, SIGMA_MIN = 20.0, 0.01
MIXTURE = GaussianMixture.create([[-5.0, -5.0], [5.0, 5.0]], [0.2, 0.8], 1.0)
N = 4000


def mixture_score(x, sigma):
    return MIXTURE.score(x, sigma)


def start(n=N, seed=1):
    """Exact draws of the mixture perturbed to SIGMA_MAX, so that what is tested is the
    sampler, not how far N(0, SIGMA_MAX^2 I) is from that marginal."""
    g = torch.Generator().manual_seed(seed)
    return MIXTURE.sample(n, seed) + SIGMA_MAX * torch.randn(n, 2, generator=g)


SAMPLERS = {
    "pc": lambda net, x: predictor_corrector(net, x, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 500)),
    "pc_euler_maruyama": lambda net, x: predictor_corrector(
        net, x, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 500), predictor="euler_maruyama"),
    "ode": lambda net, x: probability_flow(net, x, SIGMA_MAX, SIGMA_MIN),
    "heun": lambda net, x: heun(net, x, edm_sigmas(SIGMA_MAX, SIGMA_MIN, 40)),
    "heun_churn": lambda net, x: heun(net, x, edm_sigmas(SIGMA_MAX, SIGMA_MIN, 60), S_churn=30,
                                      S_tmin=0.05, S_tmax=10.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_recover_the_mixtures_weights_means_and_covariances(name):
    torch.manual_seed(0)
    assert_recovers_the_mixture(SAMPLERS[name](mixture_score, start()))


def assert_recovers_the_mixture(x):
    """``x`` ``(N, 2)``: samples of MIXTURE, within a few standard errors."""
    x = x.double()
    upper = x.sum(1) > 0                                  # the component at (5, 5)
    weight = upper.double().mean()
    # four standard errors of a Bernoulli mean, of a component's mean and of its variance
    assert abs(weight - 0.8) < 4 * math.sqrt(0.8 * 0.2 / N)
    for part, mean in ((x[upper], 5.0), (x[~upper], -5.0)):
        n = len(part)
        assert (part.mean(0) - mean).abs().max() < 4 / math.sqrt(n)
        cov = torch.cov(part.T)
        assert (cov - torch.eye(2, dtype=cov.dtype)).abs().max() < 4 * math.sqrt(2 / n) + 0.02


def gaussian_score(s0):
    return lambda x, sigma: -x / (s0 ** 2 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


def test_probability_flow_maps_a_gaussian_to_the_gaussian_the_ode_predicts():
    """For N(0, s0^2) data the marginal at sigma is N(0, s0^2 + sigma^2), the ODE
    dx/dsigma = -sigma s = sigma x / (s0^2 + sigma^2) is linear and
    x(sigma_min) = x(sigma_max) sqrt((s0^2 + sigma_min^2) / (s0^2 + sigma_max^2))."""
    s0 = 0.5
    x = math.sqrt(s0 ** 2 + SIGMA_MAX ** 2) * torch.randn(2000, 3, dtype=torch.float64)
    out = probability_flow(gaussian_score(s0), x, SIGMA_MAX, SIGMA_MIN, rtol=1e-9, atol=1e-9,
                           denoise=False)
    end = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** 1e-5       # sigma(eps), where the code stops
    ratio = math.sqrt((s0 ** 2 + end ** 2) / (s0 ** 2 + SIGMA_MAX ** 2))
    torch.testing.assert_close(out, x * ratio, rtol=1e-6, atol=1e-8)
    variance = out.var().item()
    assert abs(variance / (s0 ** 2 + end ** 2) - 1) < 4 * math.sqrt(2 / out.numel())


def test_heun_converges_to_the_flow_with_second_order():
    """EDM's deterministic sampler integrates the same ODE, with an error of second order
    in the step."""
    s0 = 0.5
    x = math.sqrt(s0 ** 2 + SIGMA_MAX ** 2) * torch.randn(100, 3, dtype=torch.float64)
    # the flow to sigma_min, then the last (Euler) step to 0: Tweedie's x s0^2 / (s0^2 + sigma^2)
    exact = x * math.sqrt((s0 ** 2 + SIGMA_MIN ** 2) / (s0 ** 2 + SIGMA_MAX ** 2)) \
        * s0 ** 2 / (s0 ** 2 + SIGMA_MIN ** 2)
    errors = [(heun(gaussian_score(s0), x, edm_sigmas(SIGMA_MAX, SIGMA_MIN, n,
                                                      dtype=torch.float64)) - exact).abs().max()
              for n in (32, 64)]
    assert errors[1] < 3e-3 * exact.abs().max()
    assert errors[1] < errors[0] / 3                      # second order: about a quarter


def test_edm_schedule_is_linear_in_sigma_to_the_one_over_rho():
    sigmas = edm_sigmas(80.0, 0.002, 18, rho=7.0, dtype=torch.float64)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    step = (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17
    torch.testing.assert_close((sigmas ** (1 / 7)).diff(),
                               torch.full((17,), step, dtype=torch.float64))


def test_a_table_subset_is_evenly_spaced_in_index():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    assert torch.equal(table_subset(sigmas, 4), sigmas[[0, 3, 6, 9]])
    assert torch.equal(table_subset(sigmas, 10), sigmas)
    with pytest.raises(ValueError, match="2 to 10 steps"):
        table_subset(sigmas, 11)


# ----------------------------------------------------------------------------- score SDE's code
def test_the_grid_is_sigma_of_the_codes_times():
    """score SDE's PC sampler gives a continuous-time VE network sigma(t_i) = sigma_min
    (sigma_max / sigma_min)^t_i at t_i = 1 - i (1 - eps) / (N - 1): geometric from sigma_max
    to sigma(eps), not to sigma_min."""
    for n in (2, 10, 1000):
        t = 1 - torch.arange(n, dtype=torch.float64) * (1 - 1e-5) / (n - 1)
        exact = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
        torch.testing.assert_close(score_sde_sigmas(SIGMA_MAX, SIGMA_MIN, n).double(), exact,
                                   rtol=1e-6, atol=0)
    last = score_sde_sigmas(SIGMA_MAX, SIGMA_MIN, 10)[-1].item()
    assert last / SIGMA_MIN - 1 == pytest.approx(1e-5 * math.log(SIGMA_MAX / SIGMA_MIN), rel=1e-2)


@pytest.mark.parametrize("n", [2, 3, 10, 999, 1000, 2000])
def test_the_codes_discrete_index_is_the_step(n):
    """sde.discretize takes level (t_i (N - 1)).long() of its ascending table (float32, as
    the code computes it): N - 1 - i, so step i goes from our level i to level i + 1."""
    index = (score_sde_times(n) * (n - 1) / 1).long()
    assert torch.equal(index, n - 1 - torch.arange(n))


def test_corrector_step_size_is_the_snr_rule():
    """a = 2 (snr mean_j ||z_j|| / mean_j ||s_j||)^2: per-sample norms 3, 5 and 1, 3."""
    score = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0]])
    z = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 1.0]])
    a = langevin_corrector_step_size(score, z, snr=0.16)
    assert a.item() == pytest.approx(2 * (0.16 * 2 / 4) ** 2, rel=1e-6)


def test_a_pc_chain_is_corrector_then_predictor_with_the_tables_steps():
    """Two steps on a linear score, by hand: at step i the corrector x + a s + sqrt(2a) z
    then the predictor x + G_i^2 s + G_i z' (G_i^2 = table_i^2 - table_(i+1)^2, table_2 = 0),
    the network at sigmas[i]; denoise returns the last predictor mean."""
    s0, x0 = 0.5, torch.randn(6, 3, dtype=torch.float64)
    sigmas = torch.tensor([2.0, 0.3], dtype=torch.float64)
    table = torch.tensor([2.1, 0.25], dtype=torch.float64)
    score = gaussian_score(s0)
    torch.manual_seed(3)
    out = predictor_corrector(score, x0, sigmas, snr=0.2, table=table)
    torch.manual_seed(3)
    x, G2 = x0, [2.1 ** 2 - 0.25 ** 2, 0.25 ** 2]
    for i in range(2):
        s, z = score(x, sigmas[i].expand(6)), torch.randn_like(x)
        a = 2 * (0.2 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
        x = x + a * s + (2 * a).sqrt() * z
        x_mean = x + G2[i] * score(x, sigmas[i].expand(6))
        x = x_mean + math.sqrt(G2[i]) * torch.randn_like(x)
    torch.testing.assert_close(out, x_mean)


def test_pc_grid_option_is_checked():
    with pytest.raises(ConfigError, match="sampler.grid must be one of score_sde, table"):
        registry.check_sampler(sampler_cfg("pc", grid="edm"), OmegaConf.create(
            {"name": "cond_mlp", "embedding": "log_sigma"}))


# ----------------------------------------------------------------------------- NFE
@pytest.mark.parametrize("n_steps, n_corrector", [(7, 0), (7, 1), (5, 3)])
def test_pc_nfe_is_steps_times_corrector_steps_plus_one(n_steps, n_corrector):
    net = CountingNet(mixture_score)
    predictor_corrector(net, start(8), geometric_sigmas(SIGMA_MAX, SIGMA_MIN, n_steps),
                        n_corrector_steps=n_corrector)
    assert net.nfe == n_steps * (n_corrector + 1)


@pytest.mark.parametrize("n_steps, churn", [(2, 0.0), (18, 0.0), (18, 40.0)])
def test_heun_nfe_is_two_n_minus_one(n_steps, churn):
    net = CountingNet(mixture_score)
    heun(net, start(8), edm_sigmas(SIGMA_MAX, SIGMA_MIN, n_steps), S_churn=churn)
    assert net.nfe == 2 * n_steps - 1


@pytest.mark.parametrize("denoise", [False, True])
def test_ode_nfe_is_the_solvers_count(denoise):
    """The same linear ODE solved by solve_ivp directly counts the same evaluations."""
    s0 = 0.5
    x = math.sqrt(s0 ** 2 + SIGMA_MAX ** 2) * torch.randn(16, 2, dtype=torch.float64)
    net = CountingNet(gaussian_score(s0))
    probability_flow(net, x, SIGMA_MAX, SIGMA_MIN, rtol=1e-4, atol=1e-4, denoise=denoise)
    # score SDE's ODE in t: dx/dt = -sigma(t)^2 log(R) s = sigma^2 log(R) x / (s0^2 + sigma^2)
    log_r = math.log(SIGMA_MAX / SIGMA_MIN)

    def velocity(t, y):
        var = (SIGMA_MIN * math.exp(t * log_r)) ** 2
        return var * log_r * y / (s0 ** 2 + var)
    direct = solve_ivp(velocity, (1.0, 1e-5), x.numpy().ravel(), rtol=1e-4, atol=1e-4)
    assert net.nfe == direct.nfev + int(denoise)


def test_annealed_langevin_nfe_and_the_planned_counts():
    sigmas = geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 6)
    net = CountingNet(mixture_score)
    annealed_langevin(net, start(8), sigmas, step_lr=1e-5, n_steps_each=3, denoise=True)
    assert net.nfe == 6 * 3 + 1
    cfgs = {"pc": {"name": "pc", "num_steps": None, "n_corrector_steps": 2},
            "heun": {"name": "heun", "num_steps": 5},
            "annealed_langevin": {"name": "annealed_langevin", "n_steps_each": 3, "denoise": True}}
    assert {k: registry.planned_nfe(OmegaConf.create(c), 6) for k, c in cfgs.items()} == \
        {"pc": 6 * 3, "heun": 9, "annealed_langevin": 19}
    assert registry.planned_nfe(OmegaConf.create({"name": "ode"}), 6) is None


# ----------------------------------------------------------------------------- registry
def sampler_cfg(name, **keys):
    return sampler_config({"name": name}, keys)


def recording_net():
    seen = []

    def net(x, sigma):
        seen.append(float(sigma[0]))
        return -x / (1 + sigma[:, None] ** 2)
    return net, seen


def test_table_networks_step_on_table_levels():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    table = OmegaConf.create({"name": "cond_mlp", "embedding": "multiplicative"})
    for cfg in (sampler_cfg("heun", num_steps=4), sampler_cfg("pc", num_steps=4)):
        net, seen = recording_net()
        registry.build_sampler(cfg, sigmas, table)(net, torch.randn(5, 2))
        assert set(seen) == set(sigmas[[0, 3, 6, 9]].tolist())
    net, seen = recording_net()
    values = OmegaConf.create({"name": "cond_mlp", "embedding": "log_sigma"})
    registry.build_sampler(sampler_cfg("heun", num_steps=4), sigmas, values)(net, torch.randn(5, 2))
    assert seen[::2] == pytest.approx(edm_sigmas(1.0, 0.01, 4).tolist(), rel=1e-6)
    net, seen = recording_net()
    pc = registry.build_sampler(sampler_cfg("pc", num_steps=None, grid="table"), sigmas, values)
    pc(net, torch.randn(5, 2))
    assert sorted(set(seen), reverse=True) == pytest.approx(sigmas.tolist())
    net, seen = recording_net()
    registry.build_sampler(sampler_cfg("pc", num_steps=None), sigmas, values)(net, torch.randn(5, 2))
    assert seen[::2] == score_sde_sigmas(1.0, 0.01, 10).tolist()     # the code's sigma(t_i)


def test_samplers_that_leave_the_table_refuse_table_networks():
    ncsn = OmegaConf.create({"name": "ncsn"})
    with pytest.raises(ConfigError, match="sampler=ode .* model=ncsn can only look sigma up in "
                                          "its table; use sampler=heun or sampler=pc"):
        registry.check_sampler(sampler_cfg("ode"), ncsn)
    with pytest.raises(ConfigError, match="use sampler.S_churn=0"):
        registry.check_sampler(sampler_cfg("heun", S_churn=1.0), ncsn)
    registry.check_sampler(sampler_cfg("heun"), ncsn)
    with pytest.raises(ConfigError, match="2 to 10 steps"):
        registry.build_sampler(sampler_cfg("heun", num_steps=18), geometric_sigmas(1, 0.01, 10),
                               ncsn)
    with pytest.raises(ConfigError, match="needs a noise-conditional network"):
        registry.check_sampler(sampler_cfg("pc"), OmegaConf.create({"name": "mlp"}))


def test_unknown_predictor_is_refused():
    with pytest.raises(ValueError, match="reverse_diffusion, euler_maruyama"):
        predictor_corrector(mixture_score, start(4), geometric_sigmas(1, 0.01, 3), predictor="ddim")


# ----------------------------------------------------------------------------- inpainting
INPAINTERS = {
    "pc": lambda x, known: predictor_corrector(
        mixture_score, x, geometric_sigmas(SIGMA_MAX, SIGMA_MIN, 200), known=known),
    "ode": lambda x, known: probability_flow(mixture_score, x, SIGMA_MAX, SIGMA_MIN, known=known),
    "heun": lambda x, known: heun(mixture_score, x, edm_sigmas(SIGMA_MAX, SIGMA_MIN, 30),
                                  known=known),
    "heun_churn": lambda x, known: heun(mixture_score, x, edm_sigmas(SIGMA_MAX, SIGMA_MIN, 60),
                                        S_churn=30, S_tmin=0.05, S_tmax=10.0, known=known),
}


@pytest.mark.parametrize("name", sorted(INPAINTERS))
def test_inpainting_keeps_the_known_values_exactly(name):
    y = torch.zeros(400, 2)
    y[:, 0] = torch.where(torch.arange(400) % 2 == 0, 5.0, -5.0)
    known = KnownValues(y, torch.tensor([True, False]), fixed_noise=name == "ode")
    torch.manual_seed(0)
    x = INPAINTERS[name](SIGMA_MAX * torch.randn(400, 2), known)
    assert torch.equal(x[:, 0], y[:, 0])
    if name in ("pc", "heun_churn"):
        # Known: the first coordinate at +5 or -5; the second, filled in, lands in the same
        # component of the mixture. The deterministic samplers (ode, heun without churn) do
        # not correct what replacing the known values gets wrong, and condition loosely:
        # 72% to 93% of the points on this mixture, where these two reach 99% to 100%.
        agree = (torch.sign(x[:, 1]) == torch.sign(y[:, 0])).double()
        assert agree[::2].mean() > 0.95 and agree[1::2].mean() > 0.95


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A digits checkpoint of a tiny U-Net (takes any sigma) after two steps."""
    cfg = compose_train(["experiment=digits", "model.ch=8", "noise.num_scales=4",
                         "trainer.n_steps=2", "trainer.n_plot_samples=0", "trainer.batch_size=8",
                         "trainer.device=cpu", "trainer.progress=false"])
    return training.train(cfg, tmp_path_factory.mktemp("digits"))


@pytest.mark.parametrize("sampler, nfe", [(["sampler=heun", "sampler.num_steps=3"], "5"),
                                          (["sampler=pc", "sampler.num_steps=3"], "6"),
                                          (["sampler=dpmpp_2m", "sampler.num_steps=3"], "3")])
def test_cli_prints_nfe_and_inpaints(digits_ckpt, tmp_path, sampler, nfe):
    result = run_cli("ncsn-sample", f"ckpt={digits_ckpt}", f"out={tmp_path}", "n_samples=6",
                     "batch_size=4", *sampler)
    assert result.returncode == 0, result.stderr
    assert f"NFE: {nfe} network evaluations per sample" in result.stdout + result.stderr
    result = run_cli("ncsn-sample", f"ckpt={digits_ckpt}", f"out={tmp_path}/inpaint",
                     "mode=inpaint", "inpaint.n_images=2", "inpaint.n_completions=2", *sampler)
    assert result.returncode == 0, result.stderr
    saved = np.load(tmp_path / "inpaint" / "inpainting.npz")
    assert np.array_equal(saved["completions"][..., :4],
                          np.broadcast_to(saved["images"][:, None, ..., :4],
                                          saved["completions"][..., :4].shape))


def test_ode_nfe_per_batch_is_recorded(digits_ckpt):
    sampler = load_sampler(load_checkpoint(digits_ckpt), sampler_cfg("ode", rtol=1e-2, atol=1e-2),
                           device="cpu")
    list(sampler.batches(6, 3))
    assert len(sampler.nfe) == 2 and min(sampler.nfe) > 1


def test_ncsn_eval_prints_the_nfe_beside_the_scores(tmp_path):
    cfg = compose_train([*TINY, "trainer.n_steps=2"])
    ckpt = training.train(cfg, tmp_path / "run")
    result = run_cli("ncsn-eval", f"ckpt={ckpt}", "n_samples=64", "batch_size=32", "metric=swd",
                     "sampler=heun", "sampler.num_steps=4", f"hydra.run.dir={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr
    assert "note: NFE: 7 network evaluations per sample (sampler=heun)" in result.stdout


def test_ncsn_sample_refuses_the_ode_for_a_table_network_in_one_line(tmp_path):
    cfg = compose_train([*TINY, "trainer.n_steps=2", "model.embedding=multiplicative"])
    ckpt = training.train(cfg, tmp_path / "run")
    result = run_cli("ncsn-sample", f"ckpt={ckpt}", f"out={tmp_path / 'out'}", "sampler=ode")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "model=cond_mlp (embedding=multiplicative) can only look " \
        "sigma up in its table; use sampler=heun or sampler=pc" in message[0]

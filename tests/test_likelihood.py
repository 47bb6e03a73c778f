"""ncsn.likelihood and ncsn-eval metric=nll: log-likelihoods through the probability-flow ODE
against the analytic log-densities of sigma-perturbed Gaussians and mixtures, the
Hutchinson estimator against its own closed-form spread, and bits/dim by hand."""
import math

import pytest
import torch

from ncsn import evaluate as ev
from ncsn.checkpoint import load_checkpoint
from ncsn.data.images import ModelSpace, logit_transform
from ncsn.data.toy import GaussianMixture
from ncsn.likelihood import (bits_per_dim, draw_probes, log_likelihood,
                             model_space_log_det)
from ncsn.registry import ConfigError
from ncsn.training import train
from conftest import TINY, compose_train

SIGMA_MIN, SIGMA_MAX = 0.05, 1e4   # N(0, sigma_max^2 I) for p_sigma_max costs ~ |mean| / sigma_max


class PerturbedGaussian:
    """N(mu, Sigma) perturbed by N(0, sigma^2 I): N(mu, Sigma + sigma^2 I), with its score."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor):
        self.mu, self.cov = mu.double(), cov.double()

    def cov_at(self, sigma):
        return self.cov + sigma ** 2 * torch.eye(len(self.mu), dtype=torch.float64)

    def score(self, x, sigma):                    # -(Sigma + sigma^2 I)^-1 (x - mu), per sample
        precision = torch.linalg.inv(self.cov_at(float(sigma[0])))
        return -(x.double() - self.mu) @ precision.T

    def log_prob(self, x, sigma):
        dist = torch.distributions.MultivariateNormal(self.mu, self.cov_at(sigma))
        return dist.log_prob(x.double())

    def sample(self, n, seed=0):
        dist = torch.distributions.MultivariateNormal(self.mu, self.cov)
        torch.manual_seed(seed)
        return dist.sample((n,))


def correlated_gaussian(d=3):
    a = torch.tensor([[1.0, 0.3, -0.2], [0.0, 0.6, 0.4], [0.0, 0.0, 0.3]])[:d, :d]
    return PerturbedGaussian(torch.tensor([0.5, -1.0, 2.0])[:d], a @ a.T + 0.05 * torch.eye(d))


def test_exact_divergence_recovers_the_perturbed_gaussian_log_density():
    g = correlated_gaussian()
    x = g.sample(16)
    result = log_likelihood(g.score, x, SIGMA_MIN, SIGMA_MAX, exact_divergence=True)
    expected = g.log_prob(x, SIGMA_MIN)
    # what is left: the ODE's tolerance, and N(0, sigma_max^2 I) for N(mu, Sigma + sigma_max^2 I)
    torch.testing.assert_close(result.log_p, expected, atol=2e-3, rtol=0)
    assert result.nfe > 0


def test_the_exact_prior_leaves_only_the_solver_error():
    g = correlated_gaussian()
    x = g.sample(8, seed=1)
    result = log_likelihood(g.score, x, SIGMA_MIN, 5.0, exact_divergence=True,
                            rtol=1e-7, atol=1e-7, prior_log_prob=lambda y: g.log_prob(y, 5.0))
    torch.testing.assert_close(result.log_p, g.log_prob(x, SIGMA_MIN), atol=1e-4, rtol=0)


def test_rademacher_probes_are_exact_for_a_diagonal_jacobian():
    """For the isotropic Gaussian ds/dx = -I / (s0^2 + sigma^2): eps^T J eps = tr J whenever
    every eps_i^2 = 1, so one Rademacher probe gives the exact log-density."""
    g = PerturbedGaussian(torch.tensor([1.0, -2.0, 0.0, 3.0]), 0.49 * torch.eye(4))
    x = g.sample(16, seed=2)
    result = log_likelihood(g.score, x, SIGMA_MIN, SIGMA_MAX, n_probes=1, probe="rademacher",
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.log_p, g.log_prob(x, SIGMA_MIN), atol=2e-3, rtol=0)


def test_gaussian_probes_scatter_as_the_estimator_predicts():
    """A linear score has a constant Jacobian J_sigma = -(Sigma + sigma^2 I)^-1, so with the
    probes fixed along the path the estimate of int sigma div s dsigma is eps^T A eps / P with
    A = int sigma J_sigma dsigma = -1/2 log((Sigma + sigma_max^2 I)(Sigma + sigma_min^2 I)^-1):
    unbiased, variance 2 tr(A^2) / P for Gaussian probes."""
    g = correlated_gaussian()
    n, n_probes = 200, 2
    x = g.sample(n, seed=3)
    result = log_likelihood(g.score, x, SIGMA_MIN, SIGMA_MAX, n_probes=n_probes,
                            probe="gaussian", generator=torch.Generator().manual_seed(1),
                            rtol=1e-4, atol=1e-4)
    errors = result.log_p - g.log_prob(x, SIGMA_MIN)
    lam = torch.linalg.eigvalsh(g.cov)
    a = -0.5 * torch.log((lam + SIGMA_MAX ** 2) / (lam + SIGMA_MIN ** 2))    # A's eigenvalues
    std = math.sqrt(2 * float((a ** 2).sum()) / n_probes)
    assert abs(float(errors.mean())) < 4 * std / math.sqrt(n)
    assert 0.8 < float(errors.std()) / std < 1.2


def test_mixture_log_density_with_exact_and_estimated_divergence():
    mixture = GaussianMixture.create([[-2.0, -2.0], [2.0, 2.0]], [0.3, 0.7], std=0.5)
    score = lambda x, sigma: mixture.score(x, sigma)                   # noqa: E731
    x = mixture.sample(32, seed=4).double()
    expected = mixture.log_prob(x, SIGMA_MIN)
    exact = log_likelihood(score, x, SIGMA_MIN, SIGMA_MAX, exact_divergence=True)
    torch.testing.assert_close(exact.log_p, expected, atol=2e-3, rtol=0)

    # Rademacher probes err only through the off-diagonal of ds/dx: unbiased, and averaging
    # 16 probes shrinks the spread of one probe by about 4
    errors = {}
    for n_probes in (1, 16):
        estimate = log_likelihood(score, x, SIGMA_MIN, SIGMA_MAX, n_probes=n_probes,
                                  generator=torch.Generator().manual_seed(5), rtol=1e-4,
                                  atol=1e-4)
        errors[n_probes] = estimate.log_p - expected
    spread = float(errors[1].std())
    assert spread > 0.01
    assert abs(float(errors[16].mean())) < 4 * spread / math.sqrt(16 * len(x))
    assert float(errors[16].std()) < spread / 2


def test_probes_have_identity_second_moment_and_bad_arguments_are_refused():
    x = torch.zeros(2000, 3)
    for probe in ("rademacher", "gaussian"):
        eps = draw_probes(2, x, probe, torch.Generator().manual_seed(0))
        assert eps.shape == (2, 2000, 3)
        moment = torch.einsum("pbi,pbj->ij", eps, eps) / 4000
        torch.testing.assert_close(moment, torch.eye(3), atol=0.1, rtol=0)
    assert set(draw_probes(1, x).unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="probe must be one of"):
        draw_probes(1, x, "sphere")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(lambda y, s: -y, x[:2], 1.0, 0.5)


# ----------------------------------------------------------------------------- bits/dim
def test_bits_per_dim_of_a_uniform_density_is_log2_of_the_levels_in_every_space():
    """A density uniform on [0, 1]^d gives every dequantization cell the mass K^-d: exactly
    log2 K bits/dim, whatever map to the model's space is used. The model-space density of
    y ~ U[0, 1]^d is 1 / |dz/dy|, here differentiated by autograd, not by the accounting."""
    y = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = 16
    for levels in (17, 256):
        assert torch.allclose(bits_per_dim(torch.zeros(5), y, ModelSpace(), levels),
                              torch.full((5,), math.log2(levels), dtype=torch.float64))
        rescaled = bits_per_dim(torch.full((5,), -d * math.log(2)), 2 * y - 1,
                                ModelSpace(rescaled=True), levels)
        assert torch.allclose(rescaled, torch.full((5,), math.log2(levels), dtype=torch.float64))
        lam = 1e-3
        y_grad = y.clone().requires_grad_(True)
        z = logit_transform(y_grad, lam)
        (dz_dy,) = torch.autograd.grad(z.sum(), y_grad)         # elementwise map: the diagonal
        log_p_z = -dz_dy.log().flatten(1).sum(1)
        logit = bits_per_dim(log_p_z, z.detach(), ModelSpace(logit=True, lam=lam), levels)
        torch.testing.assert_close(logit, torch.full((5,), math.log2(levels),
                                                     dtype=torch.float64))


def test_bits_per_dim_by_hand():
    # d = 4 rescaled 8-bit pixels, log p(z) = -3 nats: 3 / (4 log 2) - 1 + 8 bits/dim
    z = torch.zeros(1, 4)
    assert bits_per_dim(torch.tensor([-3.0]), z, ModelSpace(rescaled=True), 256).item() == \
        pytest.approx(3 / (4 * math.log(2)) + 7)
    # continuous 2-D points: -log p / (d log 2), no offsets
    assert bits_per_dim(torch.tensor([-3.0]), torch.zeros(1, 2), levels=None).item() == \
        pytest.approx(3 / (2 * math.log(2)))
    # the logit map at z = 0 (p = 1/2): log((1 - 2 lam) / (1/4)) per pixel
    assert model_space_log_det(torch.zeros(1, 3), ModelSpace(logit=True, lam=0.1)).item() == \
        pytest.approx(3 * math.log(0.8 * 4))


# ----------------------------------------------------------------------------- ncsn-eval
def test_nll_metric_streams_the_test_split_and_states_its_offsets(tmp_path, capsys):
    train(compose_train(["dataset=digits", "trainer.n_steps=1", "trainer.batch_size=8",
                         "trainer.n_plot_samples=0", "trainer.device=cpu", "model.ch=8",
                         "noise.num_scales=3", "noise.sigma_begin=1.0", "noise.sigma_end=0.3"]),
          tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    tools = ev.Instruments(ev.EvalOptions(nll_rtol=1e-3, nll_atol=1e-3), torch.device("cpu"))
    draw = ev.Draw(n_samples=6, batch_size=4, device="cpu")
    metrics = ev.parse_metrics("nll", "images", "digits", has_net=True)
    scores = ev.score_checkpoint(ckpt, metrics, draw, tools)
    assert scores.details["nll_points"] == 6 and scores.n_samples == 0
    values = scores.values
    assert math.isfinite(values["nll"]) and values["nll_nfe"] > 0
    # no model-space map on the digits: bits/dim = nll / (64 log 2) + log2 17
    assert values["bpd"] == pytest.approx(values["nll"] / (64 * math.log(2)) + math.log2(17))
    table = ev.format_table(scores)
    assert "log2 17" in table and "RK45" in table and "the test split" in table
    with pytest.raises(ConfigError, match="give ckpt=PATH or run=RUN_DIR"):
        ev.parse_metrics("nll", "images", "digits", has_net=False)


def test_nll_metric_on_points_reports_nats_only(tmp_path):
    train(compose_train(TINY + ["dataset=gaussian_mixture", "trainer.n_steps=2"]), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    tools = ev.Instruments(ev.EvalOptions(nll_rtol=1e-3, nll_atol=1e-3), torch.device("cpu"))
    scores = ev.score_checkpoint(ckpt, ["nll"], ev.Draw(n_samples=5, batch_size=5,
                                                        device="cpu"), tools)
    assert scores.details["nll_points"] == 5 and "bpd" not in scores.values
    assert math.isfinite(scores.values["nll"])

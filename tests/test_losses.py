"""Objectives against closed forms: linear score functions on Gaussian data, and the
analytic score of sigma-perturbed Gaussian data."""
import pytest
import torch

from ncsn import losses

D = 3


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def linear_score(A, b):
    return lambda x: x @ A.T + b


def random_linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g)
    b = torch.randn(D, generator=g)
    return A, b


def gaussian_data(n, seed=1, mu=None, scale=None):
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([0.5, -1.0, 2.0]) if mu is None else mu
    L = torch.tensor([[1.0, 0, 0], [0.3, 0.8, 0], [-0.2, 0.1, 0.5]]) if scale is None else scale
    return mu + torch.randn(n, D, generator=g) @ L.T, mu, L @ L.T


def test_exact_score_matching_is_trace_plus_half_norm_per_sample():
    A, b = random_linear()
    x, _, _ = gaussian_data(64)
    per_sample = losses.score_matching(linear_score(A, b), x, reduction="none")
    expected = torch.trace(A) + 0.5 * (x @ A.T + b).pow(2).sum(1)
    torch.testing.assert_close(per_sample, expected)


def test_exact_score_matching_expectation_on_gaussian_data():
    # E[tr A + 1/2 ||A x + b||^2] = tr A + 1/2 (||A mu + b||^2 + tr(A Sigma A^T))
    A, b = random_linear()
    x, mu, cov = gaussian_data(200_000)
    expected = torch.trace(A) + 0.5 * ((A @ mu + b).pow(2).sum() + torch.trace(A @ cov @ A.T))
    value = losses.score_matching(linear_score(A, b), x)
    assert value.item() == pytest.approx(expected.item(), rel=0.01)


def test_exact_score_matching_refuses_high_dimensional_data():
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="3072 backward passes.*loss=ssm"):
        losses.score_matching(lambda y: y, x)


def test_sliced_score_matching_uses_the_drawn_projections_without_normalising():
    A, b = random_linear()
    x, _, _ = gaussian_data(16)
    torch.manual_seed(7)
    value = losses.sliced_score_matching(linear_score(A, b), x, reduction="none")
    torch.manual_seed(7)
    v = torch.randn(16, D)                                       # the same draw
    s = x @ A.T + b
    expected = ((v @ A) * v).sum(1) + 0.5 * (v * s).sum(1).pow(2)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("variance_reduction", [False, True])
@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_sliced_score_matching_agrees_with_exact_in_expectation(projection, variance_reduction):
    A, b = random_linear()
    x, _, _ = gaussian_data(8)
    torch.manual_seed(0)
    exact = losses.score_matching(linear_score(A, b), x, reduction="none")
    sliced = losses.sliced_score_matching(linear_score(A, b), x, n_projections=20_000,
                                          projection=projection,
                                          variance_reduction=variance_reduction,
                                          reduction="none")
    scale = exact.abs().max()
    assert (sliced - exact).abs().max() < 0.05 * scale


def test_ssm_vr_with_rademacher_projections_is_exact_for_diagonal_jacobians():
    # v^T A v = sum_i A_ii v_i^2 = tr A when v is +-1 and A diagonal: no variance left.
    A = torch.diag(torch.tensor([1.5, -0.5, 2.0]))
    b = torch.tensor([0.1, 0.2, -0.3])
    x, _, _ = gaussian_data(32)
    sliced = losses.sliced_score_matching(linear_score(A, b), x, projection="rademacher",
                                          variance_reduction=True, reduction="none")
    exact = losses.score_matching(linear_score(A, b), x, reduction="none")
    torch.testing.assert_close(sliced, exact)


def test_sliced_score_matching_is_differentiable_in_the_parameters():
    net = torch.nn.Linear(D, D)
    x, _, _ = gaussian_data(32)
    loss = losses.sliced_score_matching(net, x)
    loss.backward()
    # d/dW of v^T W v is v v^T: the Jacobian term reaches the weights, so grads are nonzero.
    assert net.weight.grad.abs().sum() > 0


def dsm_closed_form(A, b, mu, cov, sigma):
    # 1/2 E||A(x + sigma z) + b + z / sigma||^2, x ~ N(mu, cov), z ~ N(0, I)
    M = sigma * A + torch.eye(D) / sigma
    return 0.5 * ((A @ mu + b).pow(2).sum() + torch.trace(A @ cov @ A.T) + (M * M).sum())


def test_denoising_score_matching_closed_form_for_a_linear_score():
    torch.manual_seed(0)
    A, b = random_linear()
    x, mu, cov = gaussian_data(400_000)
    sigma = 0.7
    value = losses.denoising_score_matching(linear_score(A, b), x, sigma)
    assert value.item() == pytest.approx(dsm_closed_form(A, b, mu, cov, sigma).item(), rel=0.01)


def analytic_perturbed_score(mu, s, sigma):
    """Score of N(mu, s^2 I) convolved with N(0, sigma^2 I)."""
    return lambda y: -(y - mu) / (s ** 2 + sigma ** 2)


def test_denoising_score_matching_minimum_at_the_analytic_score():
    # At s* = grad log q_sigma the DSM loss is d/2 (1/sigma^2 - 1/(s^2 + sigma^2)); any other
    # score adds 1/2 E||s - s*||^2 (Vincent 2011), here in closed form for a mis-scaled s.
    torch.manual_seed(0)
    mu, s, sigma, wrong = torch.tensor([1.0, -2.0, 0.5]), 0.8, 0.3, 0.6
    x = mu + s * torch.randn(400_000, D)
    torch.manual_seed(1)
    best = losses.denoising_score_matching(analytic_perturbed_score(mu, s, sigma), x, sigma)
    torch.manual_seed(1)                                          # the same noise draw
    worse = losses.denoising_score_matching(analytic_perturbed_score(mu, s, wrong), x, sigma)
    v, v_wrong = s ** 2 + sigma ** 2, s ** 2 + wrong ** 2
    assert best.item() == pytest.approx(D / 2 * (1 / sigma ** 2 - 1 / v), rel=0.01)
    excess = 0.5 * D * v * (1 / v_wrong - 1 / v) ** 2
    assert (worse - best).item() == pytest.approx(excess, rel=0.03)


class AnalyticGaussianNet(torch.nn.Module):
    """net(x, sigma): the exact score of N(mu, s^2 I) perturbed at each sample's sigma."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, sigma):
        return -(x - self.mu) / (self.s ** 2 + sigma[:, None] ** 2)


def test_anneal_dsm_with_the_analytic_score_per_noise_level():
    # lambda(sigma_i) l*(sigma_i) = sigma_i^2 d/2 (1/sigma_i^2 - 1/(s^2+sigma_i^2))
    #                             = d/2 s^2 / (s^2 + sigma_i^2)
    torch.manual_seed(0)
    mu, s = torch.zeros(D), 0.5
    net = AnalyticGaussianNet(mu, s)
    sigmas = torch.tensor([2.0, 0.5, 0.1])
    x = mu + s * torch.randn(300_000, D)
    for i, sigma in enumerate(sigmas):
        labels = torch.full((len(x),), i)
        value = losses.anneal_dsm(net, x, sigmas, anneal_power=2.0, labels=labels)
        assert value.item() == pytest.approx(D / 2 * s ** 2 / (s ** 2 + sigma.item() ** 2), rel=0.01)
    mixed = losses.anneal_dsm(net, x, sigmas)                    # sigma drawn per sample
    expected = sum(D / 2 * s ** 2 / (s ** 2 + sg ** 2) for sg in sigmas.tolist()) / len(sigmas)
    assert mixed.item() == pytest.approx(expected, rel=0.02)


def test_anneal_power_weights_each_level():
    torch.manual_seed(0)
    net = AnalyticGaussianNet(torch.zeros(D), 0.5)
    sigmas = torch.tensor([2.0, 0.5])
    x = 0.5 * torch.randn(1000, D)
    labels = torch.zeros(1000, dtype=torch.long)
    torch.manual_seed(1)
    unweighted = losses.anneal_dsm(net, x, sigmas, anneal_power=0.0, labels=labels, reduction="none")
    torch.manual_seed(1)
    weighted = losses.anneal_dsm(net, x, sigmas, anneal_power=2.0, labels=labels, reduction="none")
    torch.testing.assert_close(weighted, unweighted * 4.0)


@pytest.mark.parametrize("objective,kwargs", [
    (losses.score_matching, {}),
    (losses.sliced_score_matching, {"n_projections": 1000, "variance_reduction": True}),
])
def test_annealed_score_matching_matches_the_perturbed_gaussian(objective, kwargs):
    # For q_sigma = N(0, (s^2 + sigma^2) I) and its exact score -y/v, v = s^2 + sigma^2:
    # E[tr(-I/v) + 1/2 ||y/v||^2] = -d/v + d/(2v) = -d/(2v); weighted by sigma^2.
    torch.manual_seed(0)
    s = 0.5
    net = AnalyticGaussianNet(torch.zeros(D), s)
    sigmas = torch.tensor([1.0, 0.2])
    x = s * torch.randn(20_000 if objective is losses.score_matching else 2000, D)
    for i, sigma in enumerate(sigmas.tolist()):
        labels = torch.full((len(x),), i)
        value = losses.annealed(objective, net, x, sigmas, 2.0, labels, **kwargs)
        v = s ** 2 + sigma ** 2
        assert value.item() == pytest.approx(sigma ** 2 * (-D / (2 * v)), rel=0.05)


def test_reduction_must_be_known():
    with pytest.raises(ValueError, match="reduction"):
        losses.denoising_score_matching(lambda y: y, torch.zeros(2, D), 0.1, reduction="sum")


def test_projection_must_be_known():
    with pytest.raises(ValueError, match="rademacher"):
        losses.sliced_score_matching(lambda y: y, torch.zeros(2, D), projection="sphere")

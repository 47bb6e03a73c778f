"""Samplers against analytic scores: Gaussians, and the NCSN paper's Figure 3 mixture."""
import math

import pytest
import torch

from ncsn.data.toy import GaussianMixture
from ncsn.sampling import annealed_langevin, annealed_step_sizes, langevin, langevin_step


def figure3_mixture():
    return GaussianMixture.create([[-5.0, -5.0], [5.0, 5.0]], [0.2, 0.8], std=1.0)


def fraction_in_first_mode(x):
    return (x.sum(dim=1) < 0).double().mean().item()


def test_langevin_noise_is_gaussian_with_variance_eps():
    torch.manual_seed(0)
    x = torch.zeros(200_000, 1)
    step = langevin_step(torch.zeros_like(x), x, 0.04)
    assert step.std().item() == pytest.approx(0.2, rel=0.01)
    kurtosis = (step.pow(4).mean() / step.pow(2).mean() ** 2).item()
    assert kurtosis == pytest.approx(3.0, abs=0.1)               # uniform noise would give 1.8


def test_langevin_samples_a_gaussian_from_its_score():
    torch.manual_seed(0)
    mu, s = torch.tensor([2.0, -1.0]), 0.5
    x = torch.randn(4000, 2) * 3
    out = langevin(lambda y: -(y - mu) / s ** 2, x, step_size=1e-3, n_steps=3000)
    torch.testing.assert_close(out.mean(0), mu, atol=0.03, rtol=0)
    # The discretised chain's stationary variance is s^2 / (1 - eps / (4 s^2)).
    expected_std = s / math.sqrt(1 - 1e-3 / (4 * s ** 2))
    assert out.std(0).max().item() == pytest.approx(expected_std, rel=0.04)


def test_annealed_langevin_recovers_mixture_weights_where_plain_langevin_fails():
    # NCSN paper, Figure 3: 1/5 N((-5,-5), I) + 4/5 N((5,5), I), chains started uniformly
    # in [-8, 8]^2. Plain Langevin keeps each chain in the mode of its starting half (about
    # half the chains in each); annealing through large sigmas first recovers 1/5 : 4/5.
    mixture = figure3_mixture()
    torch.manual_seed(0)
    x0 = torch.rand(2000, 2) * 16 - 8
    plain = langevin(lambda y: mixture.score(y, 0.0), x0.clone(), step_size=0.1, n_steps=1000)
    sigmas = torch.logspace(math.log10(20), 0, 10)               # 20 -> 1, as in the paper
    annealed = annealed_langevin(lambda y, sigma: mixture.score(y, sigma), x0.clone(),
                                 sigmas, step_lr=0.1, n_steps_each=100)
    assert abs(fraction_in_first_mode(annealed) - 0.2) < 0.04
    assert abs(fraction_in_first_mode(plain) - 0.5) < 0.06


def test_annealed_step_sizes_follow_algorithm_1():
    sigmas = torch.tensor([1.0, 0.1, 0.01])
    torch.testing.assert_close(annealed_step_sizes(sigmas, 2e-5), 2e-5 * torch.tensor([1e4, 1e2, 1.0]))


def test_final_denoising_step_is_tweedie():
    # With no Langevin steps, only x + sigma_L^2 s(x, sigma_L) remains.
    net = lambda y, sigma: -y / (1.0 + sigma[:, None] ** 2)
    x = torch.randn(16, 2)
    sigmas = torch.tensor([1.0, 0.5])
    out = annealed_langevin(net, x.clone(), sigmas, step_lr=0.1, n_steps_each=0, denoise=True)
    torch.testing.assert_close(out, x - 0.25 * x / 1.25)


def test_trajectories_have_one_snapshot_per_level():
    net = lambda y, sigma: -y
    sigmas = torch.tensor([1.0, 0.5, 0.25])
    x, traj = annealed_langevin(net, torch.randn(5, 2), sigmas, 0.01, 3, denoise=True,
                                return_trajectory=True)
    assert traj.shape == (1 + 3 + 1, 5, 2)                       # start, each level, denoised
    torch.testing.assert_close(traj[-1], x)
    x, traj = langevin(lambda y: -y, torch.randn(5, 2), 0.01, 100, return_trajectory=True,
                       snapshot_every=10)
    assert traj.shape == (11, 5, 2)
    torch.testing.assert_close(traj[-1], x)


def test_samplers_do_not_track_gradients():
    net = torch.nn.Linear(2, 2)
    out = annealed_langevin(lambda y, sigma: net(y), torch.randn(4, 2), torch.tensor([1.0, 0.1]), 0.01, 2)
    assert not out.requires_grad


def test_known_callback_is_applied_after_every_step():
    known_value = torch.tensor([3.0])

    def keep_first_coordinate(x, i):
        x[:, 0] = known_value
        return x
    out = annealed_langevin(lambda y, sigma: -y, torch.randn(8, 2), torch.tensor([1.0, 0.1]),
                            0.01, 5, denoise=True, known=keep_first_coordinate)
    assert (out[:, 0] == 3.0).all()


@pytest.mark.parametrize("sigma_begin,num_scales,n_steps_each,published", [
    (50, 232, 5, 6.2e-6),        # NCSNv2, CIFAR-10
    (90, 500, 5, 3.3e-6),        # CelebA 64
    (190, 1086, 3, 1.8e-6),      # LSUN bedroom and tower
])  # Church (140, 788, T=4, 4.9e-6) is left out: the rule's optimum there is 2.3e-6.
def test_ncsnv2_step_size_rule_reproduces_the_papers_choices(sigma_begin, num_scales,
                                                              n_steps_each, published):
    from ncsn.noise import geometric_sigmas
    from ncsn.sampling import ncsnv2_step_lr
    step_lr = ncsnv2_step_lr(geometric_sigmas(sigma_begin, 0.01, num_scales), n_steps_each)
    assert step_lr == pytest.approx(published, rel=0.1)

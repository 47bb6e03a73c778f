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


def test_langevin_noise_is_gaussian_with_variance_two_a():
    torch.manual_seed(0)
    x = torch.zeros(200_000, 1)
    step = langevin_step(torch.zeros_like(x), x, 0.02)           # sqrt(2 a) = 0.2
    assert step.std().item() == pytest.approx(0.2, rel=0.01)
    kurtosis = (step.pow(4).mean() / step.pow(2).mean() ** 2).item()
    assert kurtosis == pytest.approx(3.0, abs=0.1)               # uniform noise would give 1.8


def test_langevin_step_is_the_reference_codes_update():
    # x + a s + sqrt(2 a) z, z drawn after the score (the NCSN paper's eps is 2 a).
    x, score, a = torch.randn(64, 3), torch.randn(64, 3), 3e-3
    torch.manual_seed(1)
    out = langevin_step(score, x, a)
    torch.manual_seed(1)
    z = torch.randn_like(x)
    torch.testing.assert_close(out, x + a * score + math.sqrt(2 * a) * z)


def test_langevin_on_a_gaussian_has_the_discretised_chains_stationary_law():
    # Score of N(mu, s^2): -(x - mu) / s^2, so the chain is x' = r x + a mu / s^2 + sqrt(2a) z
    # with r = 1 - a / s^2: stationary mean mu and variance 2a / (1 - r^2), exactly.
    # a = 0.2, s = 1: variance 1.111 (the paper's eps/2 form with eps = a would give 1.053).
    mu, s, a, n = 2.0, 1.0, 0.2, 200_000
    r = 1 - a / s ** 2
    torch.manual_seed(0)
    x = torch.randn(n, 1, dtype=torch.float64) * 3
    out = langevin(lambda y: -(y - mu) / s ** 2, x, step_size=a, n_steps=300)[:, 0]
    variance = 2 * a / (1 - r ** 2)                              # r^600 of the start is left
    # Five standard errors: sd(mean) = sqrt(v / n), sd(sample variance) = v sqrt(2 / (n - 1)).
    assert abs(out.mean().item() - mu) < 5 * math.sqrt(variance / n)
    assert abs(out.var().item() - variance) < 5 * variance * math.sqrt(2 / (n - 1))


def test_langevin_samples_a_gaussian_from_its_score():
    torch.manual_seed(0)
    mu, s, a = torch.tensor([2.0, -1.0]), 0.5, 5e-4
    x = torch.randn(4000, 2) * 3
    out = langevin(lambda y: -(y - mu) / s ** 2, x, step_size=a, n_steps=3000)
    torch.testing.assert_close(out.mean(0), mu, atol=0.03, rtol=0)
    # The discretised chain's stationary variance 2a / (1 - (1 - a/s^2)^2)
    # = s^2 / (1 - a / (2 s^2)).
    expected_std = s / math.sqrt(1 - a / (2 * s ** 2))
    assert out.std(0).max().item() == pytest.approx(expected_std, rel=0.04)


def test_annealed_langevin_is_the_reference_loop_written_out():
    # The reference's anneal_Langevin_dynamics: for each level, a = step_lr (sigma / sigma_L)^2;
    # T times: grad = s(x, sigma), z ~ N(0, I) drawn after it, x = x + a grad + z sqrt(2 a);
    # then x + sigma_L^2 s(x, sigma_L). From the same seed the chains agree to the bit.
    net = lambda y, sigma: -y / (0.3 + sigma[:, None] ** 2)
    sigmas, step_lr, n_steps_each = torch.tensor([1.0, 0.4, 0.1]), 1e-3, 4
    x0 = torch.randn(32, 2)
    torch.manual_seed(7)
    out = annealed_langevin(net, x0.clone(), sigmas, step_lr, n_steps_each, denoise=True)
    torch.manual_seed(7)
    x = x0.clone()
    for sigma in sigmas:
        a = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            grad = net(x, sigma.expand(32))
            z = torch.randn_like(x)
            x = x + a * grad + z * (a * 2).sqrt()
    x = x + sigmas[-1] ** 2 * net(x, sigmas[-1].expand(32))
    assert torch.equal(out, x)


def test_annealed_langevin_recovers_mixture_weights_where_plain_langevin_fails():
    # NCSN paper, Figure 3: 1/5 N((-5,-5), I) + 4/5 N((5,5), I), chains started uniformly
    # in [-8, 8]^2. Plain Langevin keeps each chain in the mode of its starting half (about
    # half the chains in each); annealing through large sigmas first recovers 1/5 : 4/5.
    mixture = figure3_mixture()
    torch.manual_seed(0)
    x0 = torch.rand(2000, 2) * 16 - 8
    # Step sizes in the code's convention: the paper's eps = 0.1 is a = 0.05 here.
    plain = langevin(lambda y: mixture.score(y, 0.0), x0.clone(), step_size=0.05, n_steps=1000)
    sigmas = torch.logspace(math.log10(20), 0, 10)               # 20 -> 1, as in the paper
    annealed = annealed_langevin(lambda y, sigma: mixture.score(y, sigma), x0.clone(),
                                 sigmas, step_lr=0.05, n_steps_each=100)
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


def test_known_callback_is_applied_before_every_network_evaluation():
    seen, calls = [], []

    def net(y, sigma):
        seen.append(y[:, 0].clone())
        return -y

    def keep_first_coordinate(x, i):
        calls.append(i)
        x = x.clone()
        x[:, 0] = 3.0
        return x
    annealed_langevin(net, torch.randn(8, 2), torch.tensor([1.0, 0.1]), 0.01, 5, denoise=True,
                      known=keep_first_coordinate)
    assert calls == [0] * 5 + [1] * 5 + [1]                      # the steps, then the denoising
    assert len(seen) == 11 and all((y == 3.0).all() for y in seen)


@pytest.mark.parametrize("sigma_begin,num_scales,n_steps_each,published", [
    (50, 232, 5, 6.2e-6),        # NCSNv2, CIFAR-10
    (90, 500, 5, 3.3e-6),        # CelebA 64
    (190, 1086, 3, 1.8e-6),      # LSUN bedroom and tower
    (348, 2311, 3, 9e-7),        # FFHQ (the repository's configs/ffhq.yml)
])  # Church (140, 788, T=4, 4.9e-6) is left out: the rule's optimum there is 2.3e-6.
def test_ncsnv2_step_size_rule_reproduces_the_papers_choices(sigma_begin, num_scales,
                                                              n_steps_each, published):
    from ncsn.noise import geometric_sigmas
    from ncsn.sampling import ncsnv2_step_lr
    step_lr = ncsnv2_step_lr(geometric_sigmas(sigma_begin, 0.01, num_scales), n_steps_each)
    assert step_lr == pytest.approx(published, rel=0.1)


def test_ncsnv2_step_lr_is_in_the_samplers_convention():
    # Technique 4's expression is the variance, in units of sigma_i^2, that T steps at level i
    # leave from N(0, sigma_(i-1)^2) when the data is one point (score -x / sigma_i^2):
    # f(a) = (1 - a)^(2T) (gamma^2 - 2/(2 - a)) + 2/(2 - a), a = step_lr / sigma_L^2.
    from ncsn.noise import geometric_sigmas
    from ncsn.sampling import ncsnv2_step_lr
    sigmas, n_steps_each, n = geometric_sigmas(1.0, 0.01, 10).double(), 5, 200_000
    step_lr = ncsnv2_step_lr(sigmas, n_steps_each)
    a, gamma = step_lr / sigmas[-1].item() ** 2, (sigmas[0] / sigmas[1]).item()
    f = (1 - a) ** (2 * n_steps_each) * (gamma ** 2 - 2 / (2 - a)) + 2 / (2 - a)
    torch.manual_seed(0)
    x = torch.randn(n, 1, dtype=torch.float64) * sigmas[0]
    alpha_1 = step_lr * (sigmas[1] / sigmas[-1]).item() ** 2
    out = langevin(lambda y: -y / sigmas[1] ** 2, x, alpha_1, n_steps_each)
    ratio = (out.var() / sigmas[1] ** 2).item()
    assert ratio == pytest.approx(f, abs=5 * f * math.sqrt(2 / (n - 1)))
    assert abs(f - 1) < abs(gamma ** 2 - 1)                      # the rule brings it nearer 1


def test_the_nfe_summary_counts_in_words():
    from ncsn.generate import CheckpointSampler

    def summary(nfe):
        return CheckpointSampler(None, None, None, None, (2,), None, nfe=nfe).nfe_summary()
    assert summary([1]) == "1 network evaluation"
    assert summary([35, 35]) == "35 network evaluations"
    assert summary([98, 111]) == "104.5 network evaluations (98 to 111 over 2 batches)"

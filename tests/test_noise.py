"""Sigma schedules: the geometric table and NCSNv2's rules."""
import math

import pytest
import torch

from ncsn.noise import (gamma_criterion, geometric_sigmas, largest_pairwise_distance,
                        num_scales_for, sigma_index)


def test_geometric_sigmas_endpoints_order_and_constant_ratio():
    sigmas = geometric_sigmas(50.0, 0.01, 232)
    assert sigmas.shape == (232,)
    assert sigmas[0].item() == pytest.approx(50.0)
    assert sigmas[-1].item() == pytest.approx(0.01)
    assert (sigmas[1:] < sigmas[:-1]).all()                       # largest first
    ratios = sigmas[:-1].double() / sigmas[1:].double()
    assert ratios.std().item() < 1e-5
    assert ratios.mean().item() == pytest.approx((50 / 0.01) ** (1 / 231), rel=1e-6)


def test_geometric_sigmas_formula():
    sigmas = geometric_sigmas(1.0, 0.01, 3, dtype=torch.float64)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64))


@pytest.mark.parametrize("args", [(0.01, 1.0, 10), (1.0, 0.01, 1), (1.0, -0.1, 10)])
def test_geometric_sigmas_rejects_bad_tables(args):
    with pytest.raises(ValueError):
        geometric_sigmas(*args)


def phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def test_gamma_criterion_is_the_ncsnv2_formula():
    gamma, dim = 1.05, 784
    c = math.sqrt(2 * dim) * (gamma - 1)
    assert gamma_criterion(gamma, dim) == pytest.approx(phi(c + 3 * gamma) - phi(c - 3 * gamma))


@pytest.mark.parametrize("sigma_begin,dim", [(50.0, 3 * 32 * 32), (90.0, 3 * 64 * 64), (1.0, 2)])
def test_num_scales_is_the_smallest_meeting_the_gamma_rule(sigma_begin, dim):
    sigma_end = 0.01
    L = num_scales_for(sigma_begin, sigma_end, dim)
    gamma = lambda n: (sigma_begin / sigma_end) ** (1 / (n - 1))
    assert gamma_criterion(gamma(L), dim) >= 0.5
    if L > 2:
        assert gamma_criterion(gamma(L - 1), dim) < 0.5


def test_num_scales_grows_with_dimension():
    assert num_scales_for(50, 0.01, 3 * 64 * 64) > num_scales_for(50, 0.01, 3 * 32 * 32)


def test_num_scales_for_cifar10_is_near_ncsnv2s_choice():
    # NCSNv2 used 232 levels for CIFAR-10 (sigma 50 -> 0.01); the rule lands near it.
    assert 200 <= num_scales_for(50.0, 0.01, 3 * 32 * 32) <= 240


def test_largest_pairwise_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    brute = max((x[i] - x[j]).norm().item() for i in range(300) for j in range(i + 1, 300))
    assert largest_pairwise_distance(x) == pytest.approx(brute, rel=1e-9)


def test_sigma_index_finds_the_nearest_level():
    sigmas = geometric_sigmas(1.0, 0.01, 5)
    query = torch.cat([sigmas, sigmas * 1.1])
    torch.testing.assert_close(sigma_index(query, sigmas), torch.arange(5).repeat(2))

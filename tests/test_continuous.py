"""Continuous noise levels for training (noise.continuous=true): sigma drawn per sample
log-uniformly (score SDE) or log-normally (EDM) between the table's ends, weighted by
sigma^anneal_power, for networks that take sigma as a value; table networks refused."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from ncsn import GaussianMixture, losses, registry
from ncsn import training
from ncsn.checkpoint import load_checkpoint
from ncsn.generate import model_from_checkpoint
from ncsn.noise import geometric_sigmas, sigma_index
from ncsn.registry import ConfigError
from conftest import TINY, compose_train

LOW, HIGH = 0.01, 1.0


def test_log_uniform_draws_pass_a_goodness_of_fit_test():
    torch.manual_seed(0)
    sigma = losses.draw_sigmas(20_000, HIGH, LOW, "log_uniform").double()
    assert LOW <= sigma.min() and sigma.max() <= HIGH
    log_sigma = sigma.log().numpy()
    low, high = math.log(LOW), math.log(HIGH)
    assert stats.kstest(log_sigma, "uniform", args=(low, high - low)).pvalue > 1e-3
    # the test can fail: sigma itself is not uniform on [LOW, HIGH]
    assert stats.kstest(sigma.numpy(), "uniform", args=(LOW, HIGH - LOW)).pvalue < 1e-6


def test_log_normal_draws_are_edms_truncated_to_the_range():
    p_mean, p_std = -1.2, 1.2
    torch.manual_seed(1)
    log_sigma = losses.draw_sigmas(20_000, HIGH, LOW, "log_normal", p_mean, p_std).double().log()
    a, b = (math.log(LOW) - p_mean) / p_std, (math.log(HIGH) - p_mean) / p_std
    truncated = stats.truncnorm(a, b, loc=p_mean, scale=p_std)
    assert stats.kstest(log_sigma.numpy(), truncated.cdf).pvalue > 1e-3
    assert log_sigma.min() >= math.log(LOW) - 1e-6 and log_sigma.max() <= math.log(HIGH) + 1e-6


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="log_uniform, log_normal"):
        losses.draw_sigmas(4, HIGH, LOW, "uniform")


def cfg_with(*overrides):
    return compose_train([*TINY, "noise.continuous=true", *overrides])


def test_objective_weights_by_sigma_power_and_labels_the_nearest_level():
    cfg = cfg_with("loss.anneal_power=2")
    sigmas = geometric_sigmas(HIGH, LOW, 10)
    objective = registry.build_objective(cfg.loss, cfg.model, sigmas, cfg.noise)
    net = lambda x, sigma: -x / (1 + sigma[:, None] ** 2)
    x = torch.randn(256, 2)
    torch.manual_seed(3)
    per_sample, labels = objective(net, x)
    torch.manual_seed(3)
    sigma = losses.draw_sigmas(256, HIGH, LOW, "log_uniform", like=x)
    z = torch.randn_like(x)
    x_tilde = x + sigma[:, None] * z
    # 1/2 ||s(x~, sigma) + (x~ - x) / sigma^2||^2 sigma^2 (NCSN, eq. 5-6, any sigma)
    expected = 0.5 * (net(x_tilde, sigma) + z / sigma[:, None]).pow(2).sum(1) * sigma ** 2
    torch.testing.assert_close(per_sample, expected)
    assert torch.equal(labels, sigma_index(sigma, sigmas))
    assert labels.min() >= 0 and labels.max() < 10 and len(labels.unique()) == 10


@pytest.mark.parametrize("overrides, choose", [
    (["model=cond_mlp", "model.embedding=multiplicative"], "model.embedding=log_sigma"),
])
def test_table_networks_are_refused(overrides, choose):
    cfg = cfg_with(*overrides)
    with pytest.raises(ConfigError, match=f"looks? sigma up in its table; choose {choose}"):
        registry.build_objective(cfg.loss, cfg.model, geometric_sigmas(1, 0.01, 10), cfg.noise)


def test_ncsn_is_refused_and_value_networks_accepted():
    noise = OmegaConf.create({"continuous": True, "distribution": "log_uniform",
                              "P_mean": -1.2, "P_std": 1.2})
    loss = OmegaConf.create({"name": "anneal_dsm", "anneal_power": 2.0})
    sigmas = geometric_sigmas(1, 0.01, 10)
    with pytest.raises(ConfigError, match="model=ncsn can only look sigma up in its table; "
                                          "choose model=ncsnv2 or model=unet"):
        registry.build_objective(loss, OmegaConf.create({"name": "ncsn"}), sigmas, noise)
    for name in ("ncsnv2", "unet"):
        registry.build_objective(loss, OmegaConf.create({"name": name}), sigmas, noise)


def test_unannealed_objectives_are_refused():
    cfg = cfg_with("loss=ssm", "model=mlp")
    with pytest.raises(ConfigError, match="is not annealed; use loss=anneal_dsm"):
        registry.build_objective(cfg.loss, cfg.model, geometric_sigmas(1, 0.01, 10), cfg.noise)


def held_out_loss(net, objective, x):
    torch.manual_seed(0)
    with torch.no_grad():
        return float(torch.cat([objective(net, x)[0] for _ in range(20)]).mean())


@pytest.mark.parametrize("distribution", ["log_uniform", "log_normal"])
def test_a_tiny_continuous_run_trains(tmp_path, distribution):
    """On the Gaussian mixture the exact score of every sigma is known, and it minimises the
    objective: training closes more than half the gap between an untrained network and it."""
    cfg = cfg_with("dataset=gaussian_mixture", "trainer.n_steps=300", "trainer.ema=false",
                   f"noise.distribution={distribution}", "noise.sigma_begin=10")
    ckpt = load_checkpoint(training.train(cfg, tmp_path))
    assert ckpt["config"]["noise"]["continuous"] is True
    sigmas = ckpt["sigmas"]
    objective = registry.build_objective(cfg.loss, cfg.model, sigmas, cfg.noise)
    d = cfg.dataset
    mixture = GaussianMixture.create(d.means, d.weights, d.std)
    x = mixture.sample(2000, seed=5)
    torch.manual_seed(cfg.seed)
    untrained = registry.build_model(cfg.model, (2,), sigmas)
    trained = model_from_checkpoint(ckpt, use_ema=False)
    exact = held_out_loss(mixture.score, objective, x)
    gap = lambda net: held_out_loss(net, objective, x) - exact
    assert 0 < gap(trained) < 0.5 * gap(untrained)

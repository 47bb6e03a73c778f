"""EDM's preconditioning and losses (Karras et al. 2022; NVlabs/edm): the coefficients against
Table 1 and the derivation behind them, the wrapper's score and denoiser, the losses' draws
and weights, their value at the optimal denoiser of Gaussian data, the refusals, EDM's EMA
half-life and learning-rate ramp-up, and a tiny training run. scripts/check_edm.py compares
against EDM's own code."""
import math

import pytest
import torch
from scipy import stats
from torch import nn

from ncsn import losses, registry, training
from ncsn.checkpoint import load_checkpoint
from ncsn.cli.precheck import check_train, compose_checked
from ncsn.data import infinite_batches
from ncsn.generate import model_from_checkpoint
from ncsn.nets.mlp import ConditionalMLP
from ncsn.nets.precond import EDMPrecond, Preconditioned, VEPrecond
from ncsn.noise import geometric_sigmas, sigma_index
from ncsn.registry import ConfigError
from ncsn.training.ema import ema_beta
from conftest import TINY, compose_train
from conftest import check_documented_setup

SIGMA_DATA = 0.5
SIGMAS = [0.002, 0.02, 0.3, 0.5, 1.0, 7.0, 80.0]
TABLE = geometric_sigmas(80.0, 0.002, 18)


def as_tensor(sigma):
    return torch.tensor([sigma], dtype=torch.float64)


# ----------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("sigma", SIGMAS)
def test_edm_coefficients_are_table_1s(sigma):
    p, s, sd = EDMPrecond(nn.Identity(), SIGMA_DATA), as_tensor(sigma), SIGMA_DATA
    closed = {"c_skip": sd ** 2 / (sigma ** 2 + sd ** 2),
              "c_out": sigma * sd / math.sqrt(sigma ** 2 + sd ** 2),
              "c_in": 1 / math.sqrt(sigma ** 2 + sd ** 2),
              "c_noise": math.log(sigma) / 4}
    for name, value in closed.items():
        assert getattr(p, name)(s).item() == pytest.approx(value, rel=1e-12), name


@pytest.mark.parametrize("sigma", SIGMAS)
def test_edm_coefficients_follow_from_unit_variances(sigma):
    """EDM's derivation (Sec. 5), for data of standard deviation sigma_data: the input
    c_in (y + n) has unit variance; c_skip minimises the variance of the effective target
    (y - c_skip (y + n)) / c_out, which c_out scales to one; the weight is 1 / c_out^2."""
    p, s, sd = EDMPrecond(nn.Identity(), SIGMA_DATA), as_tensor(sigma), SIGMA_DATA
    c_skip, c_out, c_in = (getattr(p, name)(s).item() for name in ("c_skip", "c_out", "c_in"))
    target_variance = lambda c: (1 - c) ** 2 * sd ** 2 + c ** 2 * sigma ** 2
    assert c_in ** 2 * (sd ** 2 + sigma ** 2) == pytest.approx(1, rel=1e-12)
    assert -2 * (1 - c_skip) * sd ** 2 + 2 * c_skip * sigma ** 2 == pytest.approx(0, abs=1e-12)
    assert target_variance(c_skip) / c_out ** 2 == pytest.approx(1, rel=1e-12)
    weight = losses.edm_weight(s, SIGMA_DATA).item()
    assert weight == pytest.approx((sigma ** 2 + sd ** 2) / (sigma * sd) ** 2, rel=1e-12)
    assert weight * c_out ** 2 == pytest.approx(1, rel=1e-12)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_ve_coefficients_are_table_1s(sigma):
    p, s = VEPrecond(nn.Identity()), as_tensor(sigma)
    closed = {"c_skip": 1.0, "c_out": sigma, "c_in": 1.0, "c_noise": math.log(sigma / 2)}
    for name, value in closed.items():
        assert getattr(p, name)(s).item() == pytest.approx(value, rel=1e-12), name
    assert losses.ve_weight(s).item() == pytest.approx(1 / sigma ** 2, rel=1e-12)


class Probe(nn.Module):
    """F(x, sigma_in) = a x + sigma_in, recording what it is given."""

    def forward(self, x, sigma):
        self.seen = (x, sigma)
        return 0.3 * x + sigma[:, None]


@pytest.mark.parametrize("wrapper", [lambda net: EDMPrecond(net, SIGMA_DATA), VEPrecond])
def test_the_wrapper_is_eq_7_and_returns_the_score_of_its_denoiser(wrapper):
    torch.manual_seed(0)
    net = wrapper(Probe()).double()
    x, sigma = torch.randn(7, 3, dtype=torch.float64), torch.tensor(SIGMAS, dtype=torch.float64)
    D = net.denoise(x, sigma)
    c = {name: getattr(net, name)(sigma)[:, None] for name in ("c_skip", "c_out", "c_in")}
    # the inner network sees c_in x and exp(c_noise): log of what it is given is c_noise
    torch.testing.assert_close(net.net.seen[0], c["c_in"] * x)
    torch.testing.assert_close(net.net.seen[1].log(), net.c_noise(sigma))
    F = 0.3 * c["c_in"] * x + net.c_noise(sigma).exp()[:, None]
    expected = c["c_skip"] * x + c["c_out"] * F
    torch.testing.assert_close(D, expected)
    torch.testing.assert_close(net(x, sigma), (D - x) / sigma[:, None] ** 2)
    # the samplers' denoiser x + sigma^2 s(x, sigma) gives D back
    torch.testing.assert_close(losses.tweedie_denoiser(net)(x, sigma), D)


def test_checkpoint_keys_keep_the_inner_network_under_net():
    cfg = compose_train(TINY)
    plain = registry.build_model(cfg.model, (2,), TABLE)
    assert isinstance(plain, ConditionalMLP)                       # precond none: no wrapper
    wrapped = registry.build_model(compose_train([*TINY, "model.precond=edm"]).model, (2,), TABLE)
    assert isinstance(wrapped, EDMPrecond) and isinstance(wrapped.net, ConditionalMLP)
    assert list(wrapped.state_dict()) == [f"net.{k}" for k in plain.state_dict()]
    wrapped.net.load_state_dict(plain.state_dict())                # the inner keys load as they are


# ----------------------------------------------------------------------------- the losses
def edm_objective(loss="edm", precond="edm"):
    cfg = compose_train([*TINY, f"loss={loss}", f"model.precond={precond}"])
    return registry.build_objective(cfg.loss, cfg.model, TABLE, cfg.noise)


def test_edm_loss_draws_as_edms_code_and_weights_by_lambda():
    """With D(x) = x (a zero score) the loss is lambda(sigma) sigma^2 ||eps||^2, sigma and eps
    drawn in EDM's order: ln sigma = P_mean + P_std randn(B), then eps = randn of the batch."""
    x = torch.randn(512, 2, dtype=torch.float64)
    torch.manual_seed(4)
    per_sample, labels = edm_objective()(lambda y, sigma: torch.zeros_like(y), x)
    torch.manual_seed(4)
    sigma = (torch.randn(512, dtype=torch.float64) * 1.2 - 1.2).exp()
    eps = torch.randn(512, 2, dtype=torch.float64)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(per_sample, weight * sigma ** 2 * eps.pow(2).sum(1))
    assert torch.equal(labels, sigma_index(sigma, TABLE))


def test_ve_loss_draws_log_uniform_sigma_and_weights_by_one_over_sigma_squared():
    x = torch.randn(512, 2, dtype=torch.float64)
    torch.manual_seed(5)
    per_sample, _ = edm_objective("ve_edm", "ve")(lambda y, sigma: torch.zeros_like(y), x)
    torch.manual_seed(5)
    sigma = 0.02 * (100 / 0.02) ** torch.rand(512, dtype=torch.float64)
    eps = torch.randn(512, 2, dtype=torch.float64)
    torch.testing.assert_close(per_sample, eps.pow(2).sum(1))     # (1 / sigma^2) sigma^2 ||eps||^2
    assert 0.02 <= sigma.min() and sigma.max() <= 100


def gaussian_score(s):
    """The score of N(0, s^2 I) perturbed by sigma: -x / (s^2 + sigma^2); its denoiser is
    D*(x; sigma) = x s^2 / (s^2 + sigma^2), the optimal one (the posterior mean)."""
    return lambda x, sigma: -x / (s ** 2 + sigma[:, None] ** 2)


def test_edm_loss_of_the_optimal_denoiser_of_sigma_data_gaussians_is_chi_squared_d():
    """For y ~ N(0, s^2 I_d), D* - y = (s^2 n - sigma^2 y) / (s^2 + sigma^2) has per-dimension
    variance s^2 sigma^2 / (s^2 + sigma^2) = 1 / lambda(sigma) when s = sigma_data: the
    weighted loss is chi^2 with d degrees of freedom at every sigma (mean d)."""
    d, n = 3, 20_000
    torch.manual_seed(6)
    y = SIGMA_DATA * torch.randn(n, d, dtype=torch.float64)
    per_sample, _ = edm_objective()(gaussian_score(SIGMA_DATA), y)
    assert abs(per_sample.mean().item() - d) < 5 * math.sqrt(2 * d / n)
    assert stats.kstest(per_sample.numpy(), stats.chi2(d).cdf).pvalue > 1e-3


def test_ve_loss_of_the_optimal_denoiser_has_its_closed_form_mean():
    """With lambda = 1 / sigma^2 the optimum's loss is d s^2 / (s^2 + sigma^2); over
    t = ln sigma ~ U(a, b) its mean is d (b - a - ln((s^2 + e^2b) / (s^2 + e^2a)) / 2) / (b - a)."""
    d, n, s = 3, 20_000, 0.5
    a, b = math.log(0.02), math.log(100.0)
    torch.manual_seed(7)
    y = s * torch.randn(n, d, dtype=torch.float64)
    per_sample, _ = edm_objective("ve_edm", "ve")(gaussian_score(s), y)
    mean = d * (b - a - 0.5 * math.log((s ** 2 + math.exp(2 * b)) / (s ** 2 + math.exp(2 * a))))
    mean /= b - a
    assert abs(per_sample.mean().item() - mean) < 5 * per_sample.std().item() / math.sqrt(n)


def test_ranks_draw_the_rows_of_one_process():
    x, objective = torch.randn(12, 2), edm_objective()
    score = gaussian_score(1.0)
    torch.manual_seed(8)
    whole, _ = objective(score, x)
    parts = []
    for rows in (slice(0, 4), slice(4, 12)):
        torch.manual_seed(8)
        with losses.batch_shard(rows, 12):
            parts.append(objective(score, x[rows])[0])
    torch.testing.assert_close(torch.cat(parts), whole)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, message", [
    (["model.embedding=multiplicative", "model.precond=edm"],
     "model.precond=edm feeds the network exp(c_noise), not the table's sigmas, but "
     "model=cond_mlp (embedding=multiplicative) can only look sigma up in its table"),
    (["model.scale_by_sigma=true", "model.precond=ve"],
     "model.scale_by_sigma=true would divide it by exp(c_noise) besides"),
    (["model.precond=karras"], "model.precond must be one of none, edm, ve, got 'karras'"),
    (["loss=edm", "model=mlp"],
     "loss=edm trains a denoiser D(x; sigma) at every sigma and needs a network that takes"),
    (["loss=edm", "model.embedding=multiplicative"],
     "loss=edm draws sigma off the noise table, but model=cond_mlp (embedding=multiplicative) "
     "can only look sigma up in its table; choose model.embedding=log_sigma"),
    (["loss=ve_edm", "noise.continuous=true"],
     "loss=ve_edm draws each sample's sigma itself (log-uniform on [loss.sigma_min, "
     "loss.sigma_max]); noise.continuous is for loss=anneal_dsm"),
])
def test_what_cannot_work_is_refused_in_one_line(overrides, message):
    cfg = compose_train([*TINY, *overrides])
    with pytest.raises(ConfigError) as refused:
        check_train(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    if "model.precond" in message:
        with pytest.raises(ConfigError, match="model.precond"):
            registry.build_model(cfg.model, (2,), TABLE)


def test_a_table_network_has_no_precond_key():
    with pytest.raises(ConfigError, match="model.precond") as refused:
        compose_checked("train", ["dataset=cifar10", "model=ncsn", "model.precond=edm"])
    assert "\n" not in str(refused.value)


def test_loss_edm_without_preconditioning_uses_the_score_as_it_is():
    """model.precond=none: D = x + sigma^2 s(x, sigma) from the network's score."""
    x, score = torch.randn(64, 2), gaussian_score(SIGMA_DATA)
    torch.manual_seed(9)
    per_sample, _ = edm_objective(precond="none")(score, x)
    torch.manual_seed(9)
    sigma = losses.edm_sigmas(64, like=x)
    x_noisy = x + sigma[:, None] * torch.randn(64, 2)
    D = x_noisy + sigma[:, None] ** 2 * score(x_noisy, sigma)
    torch.testing.assert_close(per_sample, losses.edm_weight(sigma) * (D - x).pow(2).sum(1))


# ----------------------------------------------------------------------------- schedule
def test_ema_half_life_is_counted_in_images():
    """After halflife images, at a constant beta, a weight's share in the average halves."""
    batch, halflife_kimg = 512, 500
    beta = ema_beta(10 ** 6, batch, halflife_kimg, rampup_ratio=0.05)
    assert beta ** (halflife_kimg * 1000 / batch) == pytest.approx(0.5, rel=1e-9)
    assert ema_beta(3, batch, halflife_kimg, None) == beta          # no ramp-up
    # ramp-up: the half-life is at most ratio x images seen, 0 at the first step
    assert ema_beta(0, batch, halflife_kimg, 0.05) == 0.0
    assert ema_beta(100, batch, halflife_kimg, 0.05) == pytest.approx(0.5 ** (1 / (100 * 0.05)))


def test_lr_ramp_up_is_edms():
    cfg = compose_train(["optim.lr=1.0", "optim.lr_rampup_kimg=2"]).optim
    for step, expected in [(0, 0.0), (1, 64 / 2000), (10, 640 / 2000), (31, 1984 / 2000),
                           (32, 1.0), (500, 1.0)]:
        assert training.learning_rate(step, cfg, 1000, batch_size=64) == pytest.approx(expected)
    plain = compose_train(["optim.lr=1.0"]).optim
    assert training.learning_rate(0, plain, 1000, batch_size=64) == 1.0


def test_a_run_with_edms_schedule_averages_and_ramps_as_the_formulas(tmp_path):
    batch, halflife_kimg, ratio, k = 64, 0.2, 0.5, 5
    run = training.build_run(compose_train(TINY + [
        f"trainer.ema_halflife_kimg={halflife_kimg}", f"trainer.ema_rampup_ratio={ratio}",
        "optim.lr_rampup_kimg=1", "model.precond=edm", "loss=edm"]), tmp_path)
    name = next(n for n, _ in run.net.named_parameters())
    scalar = lambda module: dict(module.named_parameters())[name].detach().flatten()[0].item()
    batches = infinite_batches(run.data.train, batch, run.data_generator)
    shadow = scalar(run.ema.module)
    for step in range(k):
        step_stats = training.train_step(run, next(batches))
        assert step_stats.lr == pytest.approx(1e-3 * min(step * batch / 1000, 1))
        beta = ema_beta(step, batch, halflife_kimg, ratio)
        shadow = beta * shadow + (1 - beta) * scalar(run.net)
    assert scalar(run.ema.module) == pytest.approx(shadow, rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- training
class ZeroNet(nn.Module):
    def forward(self, x, sigma):
        return torch.zeros_like(x)


def held_out(net, objective, x):
    torch.manual_seed(0)
    with torch.no_grad():
        return float(torch.cat([objective(net, x)[0] for _ in range(10)]).mean())


def test_a_tiny_edm_run_trains_saves_and_samples(tmp_path):
    tiny = [o for o in TINY if not o.startswith("sampler.")]      # heun has no n_steps_each
    cfg = compose_train([*tiny, "trainer.n_steps=60", "model.embedding=log_sigma",
                         "model.precond=edm", "loss=edm", "noise.sigma_begin=10",
                         "noise.sigma_end=0.002", "sampler=heun", "sampler.num_steps=8",
                         "trainer.n_plot_samples=64", "trainer.ema=false", "optim.lr=3e-3"])
    ckpt = load_checkpoint(training.train(cfg, tmp_path))
    assert ckpt["step"] == cfg.trainer.n_steps and all(k.startswith("net.") for k in ckpt["model"])
    trained = model_from_checkpoint(ckpt)
    assert isinstance(trained, Preconditioned)
    assert (tmp_path / "pictures" / "samples.png").is_file()
    # EDM's preconditioning alone (F = 0) is the optimal linear denoiser D = c_skip x of
    # N(0, sigma_data^2 I) data; the trained network does better on the Swiss roll.
    skip_only = EDMPrecond(ZeroNet(), cfg.model.sigma_data)
    objective = registry.build_objective(cfg.loss, cfg.model, ckpt["sigmas"], cfg.noise)
    x = registry.build_data(cfg.dataset).test.tensors[0][:512]
    assert held_out(trained, objective, x) < held_out(skip_only, objective, x)


EDM_TABLE = ["key", "value", "NVlabs/edm", "EDM's value"]


def test_the_edm_experiment_composes_to_its_documented_setup():
    cfg = compose_train(["experiment=edm_cifar10_ve"])
    check_train(cfg)
    check_documented_setup(cfg, EDM_TABLE, 30)
    c = cfg.trainer                                     # 200 Mimg at EDM's batch of 512
    assert c.n_steps * c.batch_size == 200_000_000

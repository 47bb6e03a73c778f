"""Normalizing flows: every layer and model inverts itself, every log-det is the full
Jacobian's, densities integrate to one, the score is the log-density's gradient, maximum
likelihood recovers a Gaussian, bits/dim match hand-computed cases, bad shapes are refused."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.autograd.functional import jacobian

from ncsn import registry
from ncsn.data.images import ModelSpace
from ncsn.flows import (ExactSample, Flow, LogDensity, glow, negative_log_likelihood, nice,
                        realnvp)
from ncsn.flows.layers import (ActNorm, AdditiveCoupling, AffineCoupling, BatchNorm,
                               DiagonalScaling, InvertibleConv1x1, Sequence, Squeeze,
                               alternating_mask, channel_mask, checkerboard_mask)
from ncsn.flows.glow import (Coupling, SplitPrior, TopPrior, coupling_net, edge_padded,
                             flow_step)
from ncsn.flows.models import conv_net, mlp, prior_from_normal
from ncsn.flows.objective import exact_samples, nll_objective
from ncsn.flows.realnvp import ChannelCoupling, CheckerboardCoupling, CheckerboardSplitOrder
from conftest import perturbed


pytestmark = pytest.mark.usefixtures("float64")


def jacobian_log_det(f, x):
    """log |det J| of f at one sample x (1, *shape) from the full Jacobian of the flat map."""
    shape = x.shape
    flat = lambda v: f(v.view(shape))[0].flatten()
    J = jacobian(flat, x.flatten())
    return torch.linalg.slogdet(J)[1]


def batch_norm_with_running_statistics(channels):
    """A BatchNorm whose running averages are random, not their (0, 1) start."""
    norm = BatchNorm(channels)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(channels))
        norm.running_var.copy_(torch.rand(channels) + 0.5)
    return norm


def random_running_statistics(module):
    """``module`` with every batch norm's running averages random, not their (0, 1) start."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return module


def layers():
    return {
        "additive": (AdditiveCoupling(alternating_mask(4, 0), mlp(4, 8, 2, 4, False)), (4,)),
        "affine_tanh": (AffineCoupling(alternating_mask(4, 1), mlp(4, 8, 2, 8, True)), (4,)),
        "affine_sigmoid": (AffineCoupling(channel_mask((4,), 1), mlp(4, 8, 2, 8, True),
                                          "sigmoid"), (4,)),
        "affine_checkerboard": (AffineCoupling(checkerboard_mask((2, 4, 4), 0),
                                               conv_net(2, 4, 4)), (2, 4, 4)),
        "affine_channel": (AffineCoupling(channel_mask((4, 2, 2), 0), conv_net(4, 4, 8),
                                          "sigmoid"), (4, 2, 2)),
        "squeeze": (Squeeze(), (2, 4, 4)),
        "diagonal_scaling": (DiagonalScaling((4,)), (4,)),
        "actnorm_points": (ActNorm(4), (4,)),
        "actnorm_images": (ActNorm(3), (3, 2, 2)),
        "conv1x1_plain": (InvertibleConv1x1(3, lu=False), (3, 2, 2)),
        "conv1x1_lu": (InvertibleConv1x1(3, lu=True), (3, 2, 2)),
        # evaluation mode: the running averages
        "batch_norm_points": (batch_norm_with_running_statistics(4), (4,)),
        "batch_norm_images": (batch_norm_with_running_statistics(3), (3, 2, 2)),
        # Glow (issue 17)
        "glow_coupling_affine": (Coupling(4, coupling_net(2, 4, 4)), (4, 2, 2)),
        "glow_coupling_additive": (Coupling(4, coupling_net(2, 4, 2), affine=False), (4, 2, 2)),
        "glow_coupling_points": (Coupling(3, coupling_net(1, 4, 4, image=False)), (3,)),
        "glow_split_prior": (SplitPrior(4), (4, 2, 2)),
        "glow_top_prior": (TopPrior((2, 3, 3)), (2, 3, 3)),
        "glow_top_prior_points": (TopPrior((3,)), (3,)),
        "glow_step": (Sequence(flow_step(4, 4, lu=True, coupling="affine")), (4, 2, 2)),
        # RealNVP (issue 17): the authors' code's couplings, with and without batch norm
        "realnvp_checkerboard_batch": (random_running_statistics(
            CheckerboardCoupling((2, 4, 4), 1, 4, 1, batch_norm=True)), (2, 4, 4)),
        "realnvp_checkerboard_none": (CheckerboardCoupling((2, 4, 4), 0, 4, 1, batch_norm=False),
                                      (2, 4, 4)),
        "realnvp_channel_batch": (random_running_statistics(
            ChannelCoupling(4, 0, 4, 1, batch_norm=True)), (4, 2, 2)),
        "realnvp_channel_none": (ChannelCoupling(4, 1, 4, 1, batch_norm=False), (4, 2, 2)),
        "realnvp_split_order": (CheckerboardSplitOrder(8), (8, 2, 2)),
    }


def with_running_statistics(module, shape):
    """``module`` after a few training-mode passes on data away from N(0, I), so that its
    batch norms' running averages have left their (0, 1) start."""
    module.train()
    with torch.no_grad():
        for _ in range(3):
            module(3 * torch.rand(64, *shape) - 1, LogDensity())
    return module


def models():
    return {
        "realnvp_points_batch": with_running_statistics(
            realnvp((4,), hidden=8, norm="batch"), (4,)),
        "realnvp_images_batch": with_running_statistics(
            realnvp((1, 4, 4), n_scales=2, hidden=4, norm="batch"), (1, 4, 4)),
        "nice_points": nice((4,), hidden=8, n_hidden=2),
        "nice_images": nice((1, 4, 4), hidden=8, n_hidden=2, n_couplings=3),
        "nice_softplus_gaussian": nice((4,), hidden=8, n_hidden=2, prior="gaussian",
                                       activation="softplus"),
        "realnvp_points": realnvp((4,), hidden=8),
        "realnvp_images": realnvp((1, 4, 4), n_scales=2, hidden=4),
        "glow_points": glow((4,), depth=2, hidden=8),
        "glow_images": glow((1, 4, 4), n_levels=2, depth=2, hidden=4),
        "glow_images_plain": glow((1, 4, 4), n_levels=2, depth=1, hidden=4, lu=False),
        # Glow (issue 17)
        "glow_images_additive_no_top": glow((1, 4, 4), n_levels=2, depth=1, hidden=4,
                                            coupling="additive", learn_top=False),
        "glow_images_three_levels": glow((1, 8, 8), n_levels=3, depth=1, hidden=4),
        # RealNVP (issue 17): each model.norm, and three scales
        "realnvp_images_none": realnvp((1, 4, 4), hidden=4, n_hidden=1, norm="none"),
        "realnvp_images_actnorm": realnvp((1, 4, 4), hidden=4, n_hidden=1, norm="actnorm"),
        "realnvp_images_three_scales": with_running_statistics(
            realnvp((1, 8, 8), n_scales=3, n_couplings=1, hidden=2, n_hidden=1), (1, 8, 8)),
    }


@pytest.mark.parametrize("name", list(layers()))
def test_every_layer_inverts_and_its_log_det_is_the_jacobians(name):
    layer, shape = layers()[name]
    layer = perturbed(layer).eval()
    x = torch.randn(3, *shape)
    y, log_det = layer(x)
    x_back, inverse_log_det = layer.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(inverse_log_det, -log_det, atol=1e-8)
    for i in range(len(x)):
        assert log_det[i].item() == pytest.approx(jacobian_log_det(layer, x[i:i + 1]).item(),
                                                  abs=1e-8)


@pytest.mark.parametrize("name", list(models()))
def test_every_model_inverts_and_its_log_det_is_the_jacobians(name):
    flow = perturbed(models()[name], 0.1).eval()
    x = torch.randn(2, *flow.shape)
    z, log_det = flow.forward_map(x)
    assert z.shape == (2, flow.dim)
    x_back, inverse_log_det = flow.inverse_map(z)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(inverse_log_det, -log_det, atol=1e-8)
    for i in range(len(x)):
        expected = jacobian_log_det(flow.forward_map, x[i:i + 1])
        assert log_det[i].item() == pytest.approx(expected.item(), abs=1e-7)


@pytest.mark.parametrize("make", [lambda: realnvp((2,), hidden=8),
                                  lambda: with_running_statistics(
                                      realnvp((2,), hidden=8, norm="batch"), (2,)),
                                  lambda: glow((2,), depth=2, hidden=8)])
def test_a_2d_flows_density_integrates_to_one(make):
    flow = perturbed(make(), 0.1).eval()
    side = torch.linspace(-10, 10, 401)
    grid = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).view(-1, 2)
    with torch.no_grad():
        density = flow.log_prob(grid).exp()
    cell = (side[1] - side[0]) ** 2
    assert (density.sum() * cell).item() == pytest.approx(1.0, abs=2e-3)


def test_nice_logistic_prior_density_integrates_to_one():
    flow = perturbed(nice((2,), hidden=8, n_hidden=1), 0.05).eval()
    side = torch.linspace(-40, 40, 801)
    grid = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).view(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=5e-3)


@pytest.mark.parametrize("name", ["nice_points", "realnvp_images", "glow_images"])
def test_the_score_is_the_gradient_of_log_prob_by_finite_differences(name):
    flow = perturbed(models()[name], 0.1).eval()
    x = torch.randn(2, *flow.shape)
    score = flow(x, torch.ones(2))                 # sigma is ignored
    h, flat = 1e-6, x.flatten(1)
    for j in range(0, flat.shape[1], 5):
        step = torch.zeros_like(flat)
        step[:, j] = h
        up = flow.log_prob((flat + step).view_as(x))
        down = flow.log_prob((flat - step).view_as(x))
        assert torch.allclose((up - down) / (2 * h), score.flatten(1)[:, j], atol=1e-6)


def test_maximum_likelihood_recovers_a_gaussians_mean_and_covariance():
    mean = torch.tensor([1.0, -2.0])
    scale = torch.tensor([[1.0, 0.0], [0.8, 0.5]])
    data = mean + torch.randn(4000, 2) @ scale.T
    flow = Flow((2,), Sequence([ActNorm(2), InvertibleConv1x1(2, lu=True)])).double()
    objective = nll_objective(ModelSpace(), None)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(400):
        loss = objective(flow, data)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # A linear flow: x = A z + m with z ~ N(0, I), so the mean is f^-1(0), the covariance A A^T.
    with torch.no_grad():
        model_mean = flow.inverse_map(torch.zeros(1, 2))[0][0]
    A = jacobian(lambda z: flow.inverse_map(z.view(1, 2))[0].flatten(), torch.zeros(2))
    assert torch.allclose(model_mean, data.mean(0), atol=1e-2)
    assert torch.allclose(A @ A.T, torch.cov(data.T, correction=0), atol=1e-2)


def test_lu_conv1x1_log_det_is_log_abs_det_w_and_stays_invertible_after_training():
    conv = perturbed(InvertibleConv1x1(4, lu=True), 0.5)
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.05)
    for step in range(20):
        w = conv.weight_matrix()
        assert conv.log_abs_det().item() == pytest.approx(torch.linalg.slogdet(w)[1].item(),
                                                          abs=1e-9)
        x = torch.randn(8, 4, 3, 3)
        y, log_det = conv(x)
        assert torch.allclose(conv.inverse(y)[0], x, atol=1e-6)
        assert torch.allclose(log_det, torch.full((8,), 9 * torch.linalg.slogdet(w)[1].item()))
        optimizer.zero_grad()
        (y.pow(2).mean() - log_det.mean()).backward()   # any objective: just move the weights
        optimizer.step()


def test_actnorm_initialises_to_zero_mean_unit_variance_per_channel_on_the_first_batch():
    norm = ActNorm(3)
    x = torch.randn(16, 3, 4, 4) * torch.tensor([0.1, 2.0, 5.0]).view(1, 3, 1, 1) \
        + torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1)
    y, _ = norm(x)
    per_channel = y.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(per_channel.var(1, unbiased=False), torch.ones(3), atol=1e-4)
    again, _ = norm(x + 10.0)                    # initialised once: later batches do not reset it
    assert torch.allclose(again, y + 10.0 * norm.log_scale.exp().view(1, 3, 1, 1))


def test_actnorm_leaves_a_batch_without_spread_uninitialised():
    norm = ActNorm(2)
    norm(torch.zeros(1, 2, 4, 4))
    assert not norm.initialized
    norm(torch.randn(4, 2, 4, 4))
    assert norm.initialized


@pytest.mark.parametrize("space", [ModelSpace(), ModelSpace(rescaled=True),
                                   ModelSpace(logit=True, lam=0.05)])
def test_bits_per_dim_of_a_dequantized_constant_image_under_the_uniform_density(space):
    # x: a constant 2x2 image at level 100 of K = 256, dequantized into its cell of [0, 1]^4.
    # The uniform density on [0, 1]^4 gives the cell probability K^-4 exactly, so bits/dim
    # = log2 256 = 8 in any model space, once the map's log-det is counted: the model-space
    # density is p_Z(z) = 1 / |det dz/dy|, written out here for each map.
    y = (100 + torch.rand(5, 1, 2, 2)) / 256
    z = space(y)
    if space.logit:
        p = space.lam + (1 - 2 * space.lam) * y
        log_p = -(math.log(1 - 2 * space.lam) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
    else:
        log_p = torch.full((5,), -4 * math.log(2) if space.rescaled else 0.0)
    bpd = negative_log_likelihood(log_p, z, space, levels=256)
    assert torch.allclose(bpd, torch.full((5,), 8.0), atol=1e-9)
    # The density uniform on the cell itself (K^4 on it) gives P(x) = 1: 0 bits/dim.
    if not space.logit and not space.rescaled:
        assert torch.allclose(negative_log_likelihood(log_p + 4 * math.log(256), z, space, 256),
                              torch.zeros(5), atol=1e-9)


def test_exact_samples_of_a_linear_flow_have_its_mean_and_covariance():
    flow = perturbed(Flow((2,), Sequence([ActNorm(2), InvertibleConv1x1(2, lu=True)])), 0.5)
    flow.eval()
    eps = torch.randn(200_000, 2)
    samples = exact_samples(flow, eps, temperature=0.5)
    A = jacobian(lambda z: flow.inverse_map(z.view(1, 2))[0].flatten(), torch.zeros(2))
    mean = flow.inverse_map(torch.zeros(1, 2))[0][0].detach()
    assert torch.allclose(samples.mean(0), mean, atol=2e-2)
    assert torch.allclose(torch.cov(samples.T), 0.25 * A @ A.T, atol=2e-2)


def test_logistic_prior_draws_are_logistic():
    z = prior_from_normal(torch.randn(100_000), "logistic")
    u = torch.sigmoid(z).sort().values                 # the logistic CDF: uniform if logistic
    ks = (u - torch.linspace(0, 1, len(u))).abs().max()
    assert ks.item() < 0.01


def test_exact_sample_sigma_gives_samples_not_scores():
    flow = perturbed(realnvp((1, 4, 4), hidden=4), 0.1).eval()
    eps = torch.randn(3, 1, 4, 4)
    z = eps.flatten(1)
    assert torch.allclose(flow(eps, ExactSample(1.0)), flow.inverse_map(z)[0])


def test_odd_sizes_are_refused_in_one_line():
    with pytest.raises(ValueError, match="image size must divide by 2") as err:
        realnvp((1, 5, 5), n_scales=2)
    assert "\n" not in str(err.value)
    cfg = OmegaConf.create({"name": "glow", "n_levels": 2, "depth": 1, "hidden": 4, "lu": True,
                            "coupling": "affine", "learn_top": True})
    with pytest.raises(registry.ConfigError, match="model=glow: .*must divide by 4"):
        registry.build_model(cfg, (1, 6, 6), torch.ones(1))
    with pytest.raises(ValueError, match="squeeze halves height and width, but the images are 3x3"):
        Squeeze()(torch.zeros(1, 1, 3, 3))


def test_nll_and_flow_sampler_are_refused_for_score_networks_and_raw_pixels():
    mlp_cfg = OmegaConf.create({"name": "mlp"})
    nice_cfg = OmegaConf.create({"name": "nice"})
    nll = OmegaConf.create({"name": "nll"})
    with pytest.raises(registry.ConfigError, match="loss=nll needs an exact log-likelihood"):
        registry.build_objective(nll, mlp_cfg, torch.ones(1))
    with pytest.raises(registry.ConfigError, match="sampler=flow draws exactly"):
        registry.check_sampler(OmegaConf.create({"name": "flow"}), mlp_cfg)
    raw = OmegaConf.create({"name": "digits", "uniform_dequantization": False})
    with pytest.raises(registry.ConfigError, match="dataset.uniform_dequantization=true"):
        registry.build_objective(nll, nice_cfg, torch.ones(1), dataset_cfg=raw)


@pytest.mark.parametrize("loss", [{"name": "ssm", "n_projections": 1, "projection": "gaussian",
                                   "variance_reduction": False},
                                  {"name": "exact_sm", "max_dim": 64},
                                  {"name": "dsm", "sigma": 0.1}])
def test_score_matching_objectives_train_a_flow_and_its_test_loss_is_its_nll(loss):
    flow = nice((2,), hidden=8, n_hidden=1)
    objective = registry.build_objective(OmegaConf.create(loss), OmegaConf.create({"name": "nice"}),
                                         torch.ones(1))
    x = torch.randn(16, 2)
    per_sample, labels = objective(flow, x)
    per_sample.mean().backward()
    assert labels is None and per_sample.shape == (16,)
    assert all(p.grad is not None for p in flow.parameters())
    held_out, _ = objective.held_out(flow, x)
    assert torch.allclose(held_out, -flow.log_prob(x))


def test_nll_metric_scores_a_flow_by_its_exact_log_density_as_training_does(tmp_path):
    from conftest import compose_train

    from ncsn import evaluate as ev
    from ncsn.checkpoint import load_checkpoint
    from ncsn.training import build_run, test_loss, train

    torch.set_default_dtype(torch.float32)
    overrides = ["experiment=nice_digits", "dataset.logit_transform=false",
                 "model.hidden=16", "model.n_hidden=1", "trainer.n_steps=5",
                 "trainer.n_plot_samples=0", "trainer.device=cpu", "trainer.progress=false"]
    train(compose_train(overrides), tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    tools = ev.Instruments(ev.EvalOptions(), torch.device("cpu"))
    scores = ev.score_checkpoint(ckpt, ["nll"], ev.Draw(n_samples=1000, batch_size=100,
                                                        device="cpu"), tools)
    values = scores.values
    assert values["nll_nfe"] == 1 and "exact log-density" in ev.format_table(scores)
    assert values["bpd"] == pytest.approx(values["nll"] / (64 * math.log(2)) + math.log2(17))
    # The trainer's test loss (its own dequantization draw) is the same bits/dim.
    run = build_run(compose_train(overrides + ["trainer.resume=false"]), tmp_path / "again")
    run.net.load_state_dict(ckpt["model"])
    assert test_loss(run) == pytest.approx(values["bpd"], abs=0.02)


def test_actnorm_initialisation_travels_with_the_state_dict_and_is_not_redone():
    trained = glow((1, 4, 4), n_levels=1, depth=1, hidden=4).double()
    trained(torch.rand(8, 1, 4, 4), LogDensity())               # first batch: initialises
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    assert state["transform.layer.layers.1.initialized"] == 1
    restored = glow((1, 4, 4), n_levels=1, depth=1, hidden=4).double()
    restored.load_state_dict(state)
    restored(torch.rand(8, 1, 4, 4) * 5 + 3, LogDensity())      # a resumed run's next batch
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_langevin_on_a_flows_score_agrees_with_its_exact_samples():
    flow = perturbed(Flow((2,), Sequence([ActNorm(2), InvertibleConv1x1(2, lu=True)])), 0.3)
    flow.eval()
    cfg = OmegaConf.create({"name": "langevin", "step_size": 5e-3, "n_steps": 1500,
                            "sigma": None})
    langevin = registry.build_sampler(cfg, torch.ones(1), OmegaConf.create({"name": "glow"}))
    exact = exact_samples(flow, torch.randn(20_000, 2))
    chains = langevin(flow, torch.randn(4000, 2))
    # Langevin's stationary law differs from p by O(step size): a few hundredths here.
    assert torch.allclose(chains.mean(0), exact.mean(0), atol=0.05)
    assert torch.allclose(torch.cov(chains.T), torch.cov(exact.T), atol=0.05 * exact.var(0).max())


# ----------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize("shape", [(4,), (3, 2, 2)])
def test_batch_norm_in_training_is_the_per_sample_map_of_the_batch_statistics(shape):
    norm = perturbed(BatchNorm(shape[0])).train()
    x = 2 * torch.randn(16, *shape) + 1
    y, log_det = norm(x)
    # RealNVP Sec. 3.7 with the batch's mean and biased variance per channel written out:
    # x -> (x - mu) / sqrt(var + eps) exp(log_gamma) + beta, the statistics held constant.
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    gamma, beta = norm.log_gamma.exp().view(view), norm.beta.view(view)
    per_sample = lambda v: ((v - mu) / torch.sqrt(var + norm.eps) * gamma + beta, None)
    assert torch.allclose(y, per_sample(x)[0], atol=1e-12)
    for i in range(len(x)):
        assert log_det[i].item() == pytest.approx(
            jacobian_log_det(per_sample, x[i:i + 1]).item(), abs=1e-8)
    # Before the learned scale and shift, the batch is standardised per channel.
    standard = (y - beta) / gamma
    assert torch.allclose(standard.mean(dims), torch.zeros(shape[0]), atol=1e-10)
    assert torch.allclose(((standard - standard.mean(dims, keepdim=True)) ** 2).mean(dims),
                          (var / (var + norm.eps)).flatten(), atol=1e-10)


def test_batch_norm_gradients_flow_through_the_batch_statistics():
    norm = BatchNorm(2).train()
    x = torch.randn(8, 2, requires_grad=True)
    y, _ = norm(x)
    (grad,) = torch.autograd.grad(y[0, 0], x)
    # y_00 depends on every sample's x_0 through mu and var, and on no other channel.
    assert (grad[1:, 0] != 0).all() and (grad[:, 1] == 0).all()


def test_batch_norm_running_averages_move_toward_the_batch_statistics():
    norm = BatchNorm(3)
    x = torch.randn(32, 3, 2, 2) * torch.tensor([0.5, 2.0, 3.0]).view(1, 3, 1, 1) \
        + torch.tensor([4.0, -1.0, 0.0]).view(1, 3, 1, 1)
    per_channel = x.transpose(0, 1).flatten(1)
    mean, var = per_channel.mean(1), per_channel.var(1, unbiased=False)
    norm(x)
    m = norm.momentum
    assert torch.allclose(norm.running_mean, m * mean, atol=1e-12)
    assert torch.allclose(norm.running_var, (1 - m) + m * var, atol=1e-12)
    for _ in range(199):
        norm(x)
    # n updates on the same batch: running = batch + (1 - m)^n (start - batch).
    assert torch.allclose(norm.running_mean, mean * (1 - (1 - m) ** 200), atol=1e-8)
    assert torch.allclose(norm.running_var, var + (1 - m) ** 200 * (1 - var), atol=1e-8)
    before = (norm.running_mean.clone(), norm.running_var.clone())
    norm.eval()(x + 10)
    norm.train().inverse(x)                      # the inverse never updates them either
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])


def test_a_batch_normed_realnvp_keeps_its_running_statistics_through_a_checkpoint(tmp_path):
    trained = with_running_statistics(realnvp((1, 4, 4), hidden=4, norm="batch"), (1, 4, 4))
    state = trained.state_dict()
    running = [k for k in state if k.endswith("running_mean") or k.endswith("running_var")]
    # 3 + 3 couplings, then 4 at the last scale, each with its output's batch norm and its
    # ResNet's: the input's, two per residual block (2 by default), the output's.
    assert len(running) == 2 * 10 * (1 + 1 + 2 * 2 + 1)
    torch.save(state, tmp_path / "flow.pt")
    restored = realnvp((1, 4, 4), hidden=4, norm="batch")
    restored.load_state_dict(torch.load(tmp_path / "flow.pt", weights_only=True))
    for key in running:
        assert torch.equal(restored.state_dict()[key], state[key]), key
    x = torch.rand(5, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(restored.eval().log_prob(x), trained.eval().log_prob(x))


@pytest.mark.parametrize("loss", [{"name": "ssm", "n_projections": 1, "projection": "gaussian",
                                   "variance_reduction": False},
                                  {"name": "exact_sm", "max_dim": 64},
                                  {"name": "dsm", "sigma": 0.1}])
def test_score_matching_is_refused_for_a_batch_normed_realnvp_in_one_line(loss):
    model = OmegaConf.create({"name": "realnvp", "norm": "batch"})
    with pytest.raises(registry.ConfigError, match=f"loss={loss['name']} needs each sample's "
                       "score, but model.norm=batch .* use loss=nll, or model.norm=actnorm"
                       ) as err:
        registry.build_objective(OmegaConf.create(loss), model, torch.ones(1))
    assert "\n" not in str(err.value)
    registry.build_objective(OmegaConf.create(loss), OmegaConf.create(
        {"name": "realnvp", "norm": "actnorm"}), torch.ones(1))
    assert registry.build_objective(OmegaConf.create({"name": "nll"}), model, torch.ones(1))


def test_the_test_loss_scores_a_batch_normed_flow_with_its_running_averages(tmp_path):
    from conftest import compose_train

    from ncsn.training import build_run, test_loss

    torch.set_default_dtype(torch.float32)
    run = build_run(compose_train(["experiment=realnvp_digits", "model.norm=batch",
                                   "model.hidden=8", "model.n_scales=1", "trainer.device=cpu",
                                   "trainer.resume=false", "trainer.progress=false"]), tmp_path)
    net = with_running_statistics(run.sampling_net, run.data.shape)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    losses = []
    for _ in range(2):
        torch.manual_seed(1)                     # the same dequantization noise both times
        losses.append(test_loss(run))
    assert losses[0] == losses[1] and net.training      # back in training mode afterwards
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.stack([run.data.test[i][0] for i in range(8)])
    with torch.no_grad():
        in_eval = run.objective.held_out(net.eval(), x)[0]
        in_train = run.objective.held_out(net.train(), x)[0]
    assert not torch.allclose(in_eval, in_train)  # the batch's statistics would score otherwise


def test_pictures_and_flop_counts_leave_a_batch_normalised_flows_running_averages_alone(
        tmp_path):
    from conftest import compose_train
    from ncsn.checkpoint import load_checkpoint
    from ncsn.training import train

    torch.set_default_dtype(torch.float32)
    base = ["dataset=moons", "model=realnvp", "model.norm=batch", "model.hidden=16",
            "loss=nll", "sampler=flow", "trainer.ema=false", "trainer.n_steps=6",
            "trainer.batch_size=32", "trainer.device=cpu", "trainer.progress=false"]
    train(compose_train(base + ["trainer.n_plot_samples=0"]), tmp_path / "plain")
    train(compose_train(base + ["trainer.n_plot_samples=50", "trainer.sample_every=3"]),
          tmp_path / "pictures")
    plain, pictures = (load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]
                       for name in ("plain", "pictures"))
    assert (tmp_path / "pictures" / "pictures" / "density.png").is_file()
    running = [key for key in plain if "running" in key]
    assert running
    for key in running:
        assert torch.equal(plain[key], pictures[key]), key


def test_realnvp_scales_are_refused_for_points_not_ignored():
    from conftest import compose_train

    # Every other key shapes RealNVP on points and on images (tests/test_realnvp.py).
    with pytest.raises(ValueError, match=r"model.n_scales=2 do not apply to points: .*"
                       r"model.n_couplings and model.n_hidden") as err:
        realnvp((2,), n_scales=2)
    assert "\n" not in str(err.value)
    cfg = compose_train(["dataset=moons", "model=realnvp", "loss=nll", "sampler=flow",
                         "model.n_scales=2"])
    with pytest.raises(registry.ConfigError, match="model=realnvp: model.n_scales=2"):
        registry.build_model(cfg.model, (2,), torch.ones(1))


# ----------------------------------------------------------------------------- Glow (issue 17)
GLOW_KEYS = {"n_levels": 3, "depth": 2, "hidden": 6, "lu": False, "coupling": "additive",
             "learn_top": False}


def glow_structure(**keys):
    """{parameter name: shape} of Glow on 1x8x8 images built through the registry."""
    cfg = OmegaConf.create({"name": "glow", "n_levels": 2, "depth": 1, "hidden": 4, "lu": True,
                            "coupling": "affine", "learn_top": True, **keys})
    net = registry.build_model(cfg, (1, 8, 8), torch.ones(1))
    return {name: tuple(p.shape) for name, p in net.named_parameters()}


@pytest.mark.parametrize("key", list(GLOW_KEYS))
def test_every_glow_key_changes_the_network_on_images(key):
    assert glow_structure(**{key: GLOW_KEYS[key]}) != glow_structure()


def test_glow_keys_are_the_whole_model_config():
    from ncsn.config import GlowConfig

    assert set(GlowConfig.__dataclass_fields__) == {"name", *GLOW_KEYS}


@pytest.mark.parametrize("lu", [False, True])
def test_glow_has_openai_glows_variables(lu):
    """The parameter count is the number of trainable values in openai/glow's model.py for
    the same flags, counted from its variable shapes: per step at C channels actnorm (2C),
    the 1x1 convolution (W: C^2; LU: L, U and log_S, 2C^2 + C), and f (l_1: 3x3 x (C/2 + 1)
    x width and an actnorm, l_2: width^2 and an actnorm, l_last: 3x3 x (width + 1) x C, b
    and logs); per split a conv2d_zeros (C/2 + 1 -> C); at the top one (2n + 1 -> 2n)."""
    width, depth = 5, 2

    def step(c):
        conv = 2 * c * c + c if lu else c * c
        f = (9 * (c // 2 + 1) * width + 2 * width + width * width + 2 * width
             + 9 * (width + 1) * c + 2 * c)
        return 2 * c + conv + f

    def zeros(c_in, c_out):
        return 9 * (c_in + 1) * c_out + 2 * c_out
    # 1x8x8 -> 4x4x4, split to 2 -> 8x2x2, split to 4 -> 16x1x1
    expected = (depth * (step(4) + step(8) + step(16)) + zeros(2, 4) + zeros(4, 8)
                + zeros(32, 32))
    net = glow((1, 8, 8), n_levels=3, depth=depth, hidden=width, lu=lu)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_the_additive_couplings_log_det_is_exactly_zero():
    coupling = perturbed(Coupling(4, coupling_net(2, 4, 2), affine=False))
    x = torch.randn(3, 4, 2, 2)
    y, log_det = coupling(x)
    assert not torch.equal(y, x)
    assert torch.equal(log_det, torch.zeros(3))
    assert torch.equal(coupling.inverse(y)[1], torch.zeros(3))


def test_glows_coupling_passes_the_first_half_and_conditions_the_second_on_it():
    coupling = perturbed(Coupling(4, coupling_net(2, 4, 4)))
    x = torch.randn(3, 4, 2, 2)
    y, _ = coupling(x)
    assert torch.equal(y[:, :2], x[:, :2])
    moved = x.clone()
    moved[:, :2] += 1.0
    assert not torch.allclose(coupling(moved)[0][:, 2:], y[:, 2:])


def test_zero_initialised_glow_starts_at_the_identity_but_for_the_codes_sigmoid_scale():
    """NN() ends in a zero convolution: at the start the additive coupling, the split prior
    and the top prior are the identity (log-det 0); the affine coupling scales z2 by
    sigmoid(0 + 2), the code's form (the paper's exp(log s) would start at 1). A fresh step
    (uninitialised actnorm, additive) is then its 1x1 convolution alone."""
    x = torch.randn(3, 4, 2, 2)
    for layer in (Coupling(4, coupling_net(2, 4, 2).double(), affine=False),
                  SplitPrior(4).double(), TopPrior((4, 2, 2)).double()):
        y, log_det = layer(x)
        assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(3))
    y, log_det = Coupling(4, coupling_net(2, 4, 4).double())(x)
    scale = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(y, torch.cat([x[:, :2], scale * x[:, 2:]], 1))
    assert torch.allclose(log_det, torch.full((3,), 8 * torch.log(scale).item()))
    step = Sequence(flow_step(4, 4, lu=False, coupling="additive")).double().eval()
    w = step.layers[1].weight
    assert torch.allclose(step(x)[0], torch.einsum("ij,bjhw->bihw", w, x))


def test_edge_padding_marks_the_border_for_the_3x3_convolutions():
    padded = edge_padded(torch.randn(2, 3, 4, 5))
    assert padded.shape == (2, 4, 6, 7)
    border = torch.ones(6, 7)
    border[1:-1, 1:-1] = 0
    assert torch.equal(padded[:, 3], border.expand(2, 6, 7))
    assert torch.equal(padded[:, :3, 0], torch.zeros(2, 3, 7))


def test_an_unknown_glow_coupling_is_refused_in_one_line():
    with pytest.raises(ValueError, match="model.coupling must be one of affine, additive") as err:
        glow((1, 4, 4), coupling="volume")
    assert "\n" not in str(err.value)

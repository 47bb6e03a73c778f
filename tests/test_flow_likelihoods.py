"""Likelihoods that are what they say: bits/dim only where -log p of the dequantized pixels
bounds the discrete likelihood (uniform dequantization, pixels on their grid); loss=nll
refused elsewhere in one line; a flow's held-out loss then in nats, and said so."""
import pytest
import torch
from omegaconf import OmegaConf

from ncsn import registry
from ncsn.cli.precheck import check_train
from ncsn.data.images import image_config, likelihood_levels, off_grid
from ncsn.evaluate.nll import held_out_split
from ncsn.flows import nice
from ncsn.training.logger import nll_unit
from conftest import compose_train


def digits(**keys):
    return OmegaConf.create({"name": "digits", "uniform_dequantization": True, **keys})


@pytest.mark.parametrize("keys,levels", [
    ({}, 17),
    ({"gaussian_dequantization": True}, None),                    # clamped: atoms at 0, 1
    ({"gaussian_dequantization": True, "uniform_dequantization": False}, None),
    ({"uniform_dequantization": False}, None),                    # a density on the grid
    ({"image_size": 16}, None),                                   # bilinear: off k/16
])
def test_bits_per_dim_only_for_uniformly_dequantized_pixels_on_their_grid(keys, levels):
    cfg = image_config(digits(**keys))
    assert likelihood_levels(cfg) == levels
    assert nll_unit(digits(**keys)) == (" bits/dim" if levels else " nats")


def test_resized_8_bit_images_stay_on_their_256_levels():
    cfg = image_config(OmegaConf.create({"name": "cifar10", "image_size": 16,
                                         "uniform_dequantization": True}))
    assert off_grid(cfg) is None and likelihood_levels(cfg) == 256


def test_resized_digits_leave_the_17_levels_and_gaussian_dequantization_clamps_many_pixels():
    # The facts the refusals state, on the real data pipeline.
    def train_pixels(**keys):
        data = registry.build_data(digits(uniform_dequantization=False, **keys))
        return torch.stack([data.train[i][0] for i in range(len(data.train))])

    resized = train_pixels(image_size=16)
    assert ((resized * 16 - (resized * 16).round()).abs() > 1e-3).float().mean() > 0.1
    torch.manual_seed(0)
    clamped = train_pixels(gaussian_dequantization=True)
    assert ((clamped == 0) | (clamped == 1)).float().mean() > 0.25       # the message: 29%


@pytest.mark.parametrize("overrides,words", [
    (["dataset.gaussian_dequantization=true"], ["gaussian_dequantization=true", "29%"]),
    (["dataset.uniform_dequantization=false"], ["uniformly dequantized"]),
    (["dataset.image_size=16"], ["image_size=16", "17 values", "image_size=8"]),
])
def test_loss_nll_is_refused_where_it_would_bound_nothing_in_one_line(overrides, words):
    cfg = compose_train(["experiment=nice_digits", *overrides])
    with pytest.raises(registry.ConfigError) as refused:
        check_train(cfg)
    message = str(refused.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_score_trained_flows_held_out_loss_on_clamped_pixels_is_nats_of_its_density():
    flow = nice((1, 8, 8), hidden=8, n_hidden=1, prior="gaussian")
    data_cfg = digits(gaussian_dequantization=True)
    loss = OmegaConf.create({"name": "ssm", "n_projections": 1, "projection": "gaussian",
                             "variance_reduction": False})
    objective = registry.build_objective(loss, OmegaConf.create({"name": "nice"}),
                                         torch.ones(1), dataset_cfg=data_cfg)
    x = torch.rand(4, 1, 8, 8)
    held_out, _ = objective.held_out(flow, x)
    assert torch.allclose(held_out, -flow.log_prob(x))            # not shifted to bits/dim
    bits = registry.build_objective(loss, OmegaConf.create({"name": "nice"}), torch.ones(1),
                                    dataset_cfg=digits()).held_out(flow, x)[0]
    assert not torch.allclose(bits, held_out)


def test_metric_nll_refuses_digits_resized_off_their_levels():
    with pytest.raises(registry.ConfigError, match="image_size=16.*native size"):
        held_out_split(digits(image_size=16))

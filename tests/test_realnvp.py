"""RealNVP as its authors' code built it (issue 17): the couplings' affine map, starting
scales and output batch norm, the code's masks, widths and factoring-out order, every key of
model=realnvp changing the network, the refusals, and experiment=realnvp_cifar10 as
docs/REPRODUCING.md documents it. (Inverses, log-dets and scores: the tables of
tests/test_flows.py.)"""
import math
import re
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ncsn import registry
from ncsn.config import RealNVPConfig
from ncsn.data.images import image_config, model_space
from ncsn.flows import realnvp
from ncsn.flows.layers import Sequence, Squeeze
from ncsn.flows.realnvp import (EPS, ChannelCoupling, CheckerboardCoupling,
                                CheckerboardSplitOrder)
from ncsn.likelihood import model_space_log_det
from conftest import REPO, compose_train, perturbed
from conftest import check_documented_setup


pytestmark = pytest.mark.usefixtures("float64")


# ----------------------------------------------------------------------------- couplings
def test_a_coupling_is_the_codes_affine_map_from_the_codes_starting_scales():
    checker = CheckerboardCoupling((2, 4, 4), 1, 8, 1, batch_norm=False)
    channel = ChannelCoupling(4, 0, 8, 1, batch_norm=False)
    # The code's rescaling_scale starts at 0, the channel-wise coupling's scale at 1.
    assert checker.scale.item() == 0.0 and channel.scale.item() == 1.0
    x = torch.randn(5, 2, 4, 4)
    y, log_det = checker(x)
    t = checker.net(checker.mask * x, checker.mask).chunk(2, dim=1)[0]
    held = checker.mask.bool().expand_as(x)
    assert torch.equal(log_det, torch.zeros(5))                  # s = 0 tanh(h) + 0
    assert torch.equal(y[held], x[held]) and torch.allclose(y[~held], (x + t)[~held])
    # Trained: y2 = (x2 + t) exp(s), s = scale tanh(h) + scale_shift, from the held half x1.
    channel = perturbed(channel)
    x = torch.randn(5, 4, 2, 2)
    y, log_det = channel(x)
    t, h = channel.net(x[:, :2]).chunk(2, dim=1)
    s = channel.scale * torch.tanh(h) + channel.scale_shift
    assert torch.equal(y[:, :2], x[:, :2])
    assert torch.allclose(y[:, 2:], (x[:, 2:] + t) * s.exp())
    assert torch.allclose(log_det, s.flatten(1).sum(1))


def test_the_coupling_output_batch_norm_is_the_codes_on_the_masked_batch():
    checker = perturbed(CheckerboardCoupling((2, 4, 4), 0, 8, 1, batch_norm=True)).train()
    x = 2 * torch.randn(16, 2, 4, 4) + 1
    y, log_det = checker(x)
    # The code's bn_out: mean and biased variance per channel of (1 - m) y over batch and
    # positions, the held positions counting as zeros; no learned gain or shift.
    free = 1 - checker.mask
    t, h = checker.net(checker.mask * x, checker.mask).chunk(2, dim=1)
    s = free * checker.scale * torch.tanh(h)
    pre = (x + free * t) * s.exp()
    masked = free * pre
    mu = masked.mean((0, 2, 3), keepdim=True)
    var = masked.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = torch.where(free.bool(), (pre - mu) / torch.sqrt(var + EPS), x)
    assert torch.allclose(y, expected, atol=1e-12)
    free_sites = free.sum().item()                               # H W / 2 per channel
    norm_log_det = free_sites * (-0.5 * torch.log(var + EPS)).sum()
    assert torch.allclose(log_det, s.flatten(1).sum(1) + norm_log_det, atol=1e-10)
    out_norm = checker.out_norm
    assert torch.allclose(out_norm.running_mean, 0.1 * mu.flatten())   # momentum 0.1, once


# ----------------------------------------------------------------------------- architecture
def coupling_plan(flow):
    """(kind, parity, feature maps, residual blocks, channels) of every coupling, in order."""
    plan = []
    for m in flow.modules():
        if isinstance(m, CheckerboardCoupling):
            parity = 1 - int(m.mask[0, 0, 0].item())               # 1: the odd sites hold
            plan.append(("checkerboard", parity, m.net.resnet.conv_in.direction.shape[0],
                         len(m.net.resnet.blocks), m.out_norm.running_mean.numel()))
        elif isinstance(m, ChannelCoupling):
            plan.append(("channel", m.parity, m.net.resnet.conv_in.direction.shape[0],
                         len(m.net.resnet.blocks), 2 * m.out_norm.running_mean.numel()))
    return plan


def test_the_scales_masks_and_widths_are_the_codes():
    # rec_masked_conv_coupling: coupling_0-2 checkerboard (mask_in 1, 0, 1: the first holds
    # the odd sites) at base_dim, coupling_4-6 channel-wise (change_bottom true, false,
    # true) at 2 base_dim on 4C channels; the last scale coupling_0-3 at base_dim 2^scale.
    flow = realnvp((3, 8, 8), n_scales=2, hidden=4, n_hidden=2)
    assert coupling_plan(flow) == (
        [("checkerboard", p, 4, 2, 3) for p in (1, 0, 1)]
        + [("channel", p, 8, 2, 12) for p in (0, 1, 0)]
        + [("checkerboard", p, 8, 2, 6) for p in (1, 0, 1, 0)])


def test_the_factored_out_half_is_the_codes_other_checkerboard_colour():
    x = torch.randn(2, 3, 4, 4)
    y, log_det = Sequence([Squeeze(), CheckerboardSplitOrder(12)])(x)
    # The code's squeeze_2x2_ordered: channel q C + c at (I, J) is x[c, 2I + di, 2J + dj]
    # for the q-th site of (0, 0), (1, 1), (0, 1), (1, 0); the first half goes on.
    sites = [(0, 0), (1, 1), (0, 1), (1, 0)]
    expected = torch.stack([x[:, c, di::2, dj::2] for di, dj in sites for c in range(3)], 1)
    assert torch.equal(y, expected) and torch.equal(log_det, torch.zeros(2))


# ----------------------------------------------------------------------------- keys
CHANGED = {"n_scales": [3], "n_couplings": [2], "hidden": [8], "n_hidden": [3],
           "norm": ["actnorm", "none"], "prior": ["logistic"]}


def signature(flow):
    return sum(p.numel() for p in flow.parameters()), str(flow), flow.prior


@pytest.mark.parametrize("shape", [(1, 8, 8), (2,)])
def test_every_key_of_model_realnvp_changes_the_network(shape):
    assert {f.name for f in fields(RealNVPConfig)} - {"name"} == set(CHANGED)
    base = OmegaConf.structured(RealNVPConfig(hidden=4, n_hidden=1))
    build = lambda cfg: registry.build_model(cfg, shape, torch.ones(1))
    reference = signature(build(base))
    for key, values in CHANGED.items():
        for value in values:
            cfg = OmegaConf.merge(base, {key: value})
            if key == "n_scales" and len(shape) == 1:
                with pytest.raises(registry.ConfigError, match="do not apply to points"):
                    build(cfg)
                continue
            assert signature(build(cfg)) != reference, f"model.{key}={value}"


@pytest.mark.parametrize("keys, message", [
    ({"norm": "layer"}, "model.norm must be one of batch, actnorm, none, got 'layer'"),
    ({"n_hidden": 0}, "model.n_hidden is the residual blocks of each coupling network on "
                      "images and must be at least 1, got 0"),
    ({"n_couplings": 0}, "model.n_couplings must be at least 1, got 0"),
    ({"n_scales": 4}, "image size must divide by 8")])
def test_bad_keys_are_refused_in_one_line(keys, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        realnvp((1, 4, 4), **keys)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- CIFAR-10
REALNVP_TABLE = ["key", "value", "tensorflow/models research/real_nvp", "its value"]


def test_realnvp_cifar10_composes_to_its_documented_setup_and_size():
    cfg = compose_train(["experiment=realnvp_cifar10"])
    check_documented_setup(cfg, REALNVP_TABLE, 20)
    torch.set_default_dtype(torch.float32)
    flow = registry.build_model(cfg.model, (3, 32, 32), torch.ones(1))
    count = sum(p.numel() for p in flow.parameters())
    assert f"{count:,} parameters" in (REPO / "docs" / "REPRODUCING.md").read_text()
    # The code's L2 (5e-5 on nats per image) and clip (100) moved to bits/dim.
    nats_per_bit_dim = 3 * 32 * 32 * math.log(2)
    assert cfg.optim.weight_decay == pytest.approx(2 * 5e-5 / nats_per_bit_dim, rel=0.01)
    assert cfg.optim.grad_clip == pytest.approx(100 / nats_per_bit_dim, rel=0.01)


def test_the_logit_preprocessing_and_its_log_det_are_the_codes():
    cfg = compose_train(["experiment=realnvp_cifar10"])
    space = model_space(image_config(cfg.dataset))
    x = torch.rand(4, 3, 2, 2)
    z = space(x)
    # The code: logit of 0.05 + 0.9 x (data_constraint .9), and its transform_cost
    # sum softplus(z) + softplus(-z) - softplus(-logit(.9)).
    p = (2 * x - 1) * 0.9
    p = (p + 1) / 2
    assert torch.allclose(z, torch.log(p) - torch.log(1 - p))
    pre_logit_scale = math.log(0.9) - math.log(0.1)
    cost = (F.softplus(z) + F.softplus(-z) - math.log1p(math.exp(-pre_logit_scale)))
    assert torch.allclose(model_space_log_det(z, space), cost.flatten(1).sum(1))

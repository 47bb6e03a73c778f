"""Image score networks: NCSN, NCSNv2, U-Net, and the layers they share.

Small widths and images keep every test on a 2-core CPU well under a minute in all.
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ncsn.nets.layers import (AttentionBlock, CondInstanceNorm2dPlus, InstanceNorm2dPlus,
                              ResidualBlock)
from ncsn.nets.ncsn import NCSN, NCSNConfig
from ncsn.nets.ncsnv2 import NCSNv2, NCSNv2Config
from ncsn.nets.precond import PRECOND_KEYS
from ncsn.nets.unet import UNet, UNetConfig
from ncsn.noise import geometric_sigmas

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
SIGMAS = geometric_sigmas(1.0, 0.01, 5)        # consecutive ratio 10 ** 0.5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@torch.no_grad()
def perturb_(net: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter, so that zero-initialised branches and nearly equal
    per-level embeddings cannot hide how the output depends on its inputs."""
    for p in net.parameters():
        p.add_(std * torch.randn_like(p))
    return net.eval()


SMALL_NETS = {   # id -> (builder, one sample's shape), tiny widths
    "ncsn-16px": (lambda: NCSN((3, 16, 16), SIGMAS, ngf=8), (3, 16, 16)),
    "ncsn-digits": (lambda: NCSN((1, 8, 8), SIGMAS, ngf=8), (1, 8, 8)),
    "ncsnv2-16px": (lambda: NCSNv2((3, 16, 16), SIGMAS, ngf=8), (3, 16, 16)),
    "ncsnv2-digits": (lambda: NCSNv2((1, 8, 8), SIGMAS, ngf=8), (1, 8, 8)),
    "unet-digits-fourier": (lambda: UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2],
                                         attn_resolutions=[4]), (1, 8, 8)),
    "unet-16px-sinusoidal": (lambda: UNet((3, 16, 16), SIGMAS, ch=16, ch_mult=[1, 2, 2],
                                          num_res_blocks=1, attn_resolutions=[8],
                                          embedding="sinusoidal"), (3, 16, 16)),
}
each_net = pytest.mark.parametrize("name", sorted(SMALL_NETS))


# ----------------------------------------------------------------------------- layers
def test_instance_norm_plus_without_alpha_is_affine_instance_norm():
    x = torch.randn(2, 4, 5, 5) + torch.arange(4.0)[None, :, None, None]
    norm = InstanceNorm2dPlus(4)
    reference = torch.nn.InstanceNorm2d(4, affine=True)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(4))
        norm.beta.copy_(torch.randn(4))
        norm.alpha.zero_()
        reference.weight.copy_(norm.gamma)
        reference.bias.copy_(norm.beta)
    torch.testing.assert_close(norm(x), reference(x))


def instance_norm_plus_written_out(x, gamma, alpha, beta, eps=1e-5):
    """gamma_k ((x_k - mu_k) / s_k + alpha_k (mu_k - m) / v) + beta_k, element by element:
    s_k^2 = population variance of channel k + eps, v^2 = UNBIASED variance of the channel
    means (divisor C - 1) + eps, as the authors' code computes them. gamma, alpha, beta (B, C)."""
    B, C, H, W = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        mu = [x[b, k].sum() / (H * W) for k in range(C)]
        m = sum(mu) / C
        v = (sum((mu_k - m) ** 2 for mu_k in mu) / (C - 1) + eps).sqrt()
        for k in range(C):
            s_k = (((x[b, k] - mu[k]) ** 2).sum() / (H * W) + eps).sqrt()
            out[b, k] = (gamma[b, k] * ((x[b, k] - mu[k]) / s_k + alpha[b, k] * (mu[k] - m) / v)
                         + beta[b, k])
    return out


def test_instance_norm_plus_is_the_reference_codes_formula():
    x = (torch.randn(3, 6, 4, 5) * 2 + 5 * torch.randn(3, 6, 1, 1)).double()
    norm = InstanceNorm2dPlus(6).double()
    with torch.no_grad():
        for p in (norm.gamma, norm.beta, norm.alpha):
            p.normal_()
    rows = [p[None].expand(3, 6) for p in (norm.gamma, norm.alpha, norm.beta)]
    torch.testing.assert_close(norm(x), instance_norm_plus_written_out(x, *rows))


def test_conditional_instance_norm_plus_is_the_reference_codes_formula():
    cond = CondInstanceNorm2dPlus(5, num_classes=4).double()
    with torch.no_grad():
        for table in (cond.gamma, cond.beta, cond.alpha):
            table.weight.normal_()
    x, idx = torch.randn(3, 5, 6, 6, dtype=torch.float64) + 3, torch.tensor([3, 0, 3])
    expected = instance_norm_plus_written_out(
        x, cond.gamma.weight[idx], cond.alpha.weight[idx], cond.beta.weight[idx])
    torch.testing.assert_close(cond(x, idx), expected)


def test_instance_norm_plus_keeps_standardised_channel_means():
    # gamma = 1, beta = 0, alpha = 1: each channel's spatial mean is (mu_k - m) / v, so
    # across channels the spatial means have mean 0 and (unbiased, as torch.var) std 1.
    x = torch.randn(3, 6, 4, 4) * 2 + 5 * torch.randn(3, 6, 1, 1)
    norm = InstanceNorm2dPlus(6)
    with torch.no_grad():
        norm.gamma.fill_(1.0), norm.beta.zero_(), norm.alpha.fill_(1.0)
    means = norm(x).mean(dim=(2, 3))                               # (B, C)
    torch.testing.assert_close(means.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(means.std(dim=1, unbiased=True), torch.ones(3), atol=1e-4, rtol=0)


def test_conditional_instance_norm_plus_uses_the_row_of_each_sample():
    cond = CondInstanceNorm2dPlus(4, num_classes=3)
    with torch.no_grad():
        for table in (cond.gamma, cond.beta, cond.alpha):
            table.weight.normal_()
    x, idx = torch.randn(2, 4, 5, 5), torch.tensor([2, 0])
    out = cond(x, idx)
    for b in range(2):
        single = InstanceNorm2dPlus(4)
        with torch.no_grad():
            single.gamma.copy_(cond.gamma.weight[idx[b]])
            single.beta.copy_(cond.beta.weight[idx[b]])
            single.alpha.copy_(cond.alpha.weight[idx[b]])
        torch.testing.assert_close(out[b:b + 1], single(x[b:b + 1]))


@pytest.mark.parametrize("dilation, size", [(1, 4), (2, 8)])
def test_subsampling_block_pools_or_dilates(dilation, size):
    block = ResidualBlock(4, 8, InstanceNorm2dPlus, torch.nn.ELU(), resample=True,
                          dilation=dilation)
    assert block(torch.randn(2, 4, 8, 8)).shape == (2, 8, size, size)


# ----------------------------------------------------------------------------- all networks
@each_net
def test_forward_and_backward_are_finite(name):
    build, shape = SMALL_NETS[name]
    net = perturb_(build()).train()   # else the U-Net's zero output layer gives x no gradient
    x = torch.randn(3, *shape, requires_grad=True)
    sigma = SIGMAS[[0, 2, 4]]
    out = net(x, sigma)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["ncsn-digits", "ncsnv2-digits", "unet-digits-fourier"])
def test_twice_differentiable(name):
    build, shape = SMALL_NETS[name]
    net = perturb_(build())
    # Sliced score matching differentiates v^T (d s / d x) v with respect to the weights.
    x = torch.randn(1, *shape, requires_grad=True)
    v = torch.randn_like(x)
    (jvp,) = torch.autograd.grad((net(x, SIGMAS[[1]]) * v).sum(), x, create_graph=True)
    (jvp * v).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@each_net
def test_sigma_conditions_the_output(name):
    build, shape = SMALL_NETS[name]
    net = perturb_(build())
    x = torch.randn(1, *shape)
    with torch.no_grad():
        a, b = net(x, SIGMAS[[1]]), net(x, SIGMAS[[3]])
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@each_net
def test_samples_in_a_batch_are_independent(name):
    build, shape = SMALL_NETS[name]
    net = perturb_(build())
    x, sigma = torch.randn(3, *shape), SIGMAS[[0, 2, 4]]
    with torch.no_grad():
        batch = net(x, sigma)
        one_by_one = torch.cat([net(x[i:i + 1], sigma[i:i + 1]) for i in range(3)])
    # Instance and group norms are per sample; only float rounding may differ.
    assert (batch - one_by_one).abs().max() <= 1e-4 * batch.abs().max()


# ----------------------------------------------------------------------------- NCSN
def test_ncsn_looks_up_the_nearest_noise_level():
    net = perturb_(NCSN((3, 16, 16), SIGMAS, ngf=8), std=0.3)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        exact = net(x, SIGMAS[[2]])
        nearby = net(x, SIGMAS[[2]] * 1.3)       # still nearest to sigmas[2] in log sigma
        other = net(x, SIGMAS[[3]])
    assert torch.equal(exact, nearby)
    assert (exact - other).abs().max() > 1e-3 * exact.abs().max()


def test_ncsn_trains_only_the_embeddings_of_the_levels_it_saw():
    net = NCSN((3, 16, 16), SIGMAS, ngf=8)
    net(torch.randn(2, 3, 16, 16), SIGMAS[[1, 3]]).square().sum().backward()
    used = torch.zeros(len(SIGMAS), dtype=torch.bool)
    used[[1, 3]] = True
    tables = [m for m in net.modules() if isinstance(m, CondInstanceNorm2dPlus)]
    assert len(tables) > 0
    for table in tables:
        row_grads = table.gamma.weight.grad.abs().sum(dim=1)
        assert (row_grads[~used] == 0).all() and (row_grads[used] > 0).all()


def test_ncsn_keeps_its_sigma_table_in_the_state_dict():
    net = NCSN((1, 8, 8), SIGMAS, ngf=8)
    torch.testing.assert_close(net.state_dict()["sigmas"], SIGMAS)


# ----------------------------------------------------------------------------- NCSNv2
def test_ncsnv2_is_an_unconditional_network_divided_by_sigma():
    net = perturb_(NCSNv2((3, 16, 16), SIGMAS, ngf=8))
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    sigma = torch.tensor([0.7, 0.02])
    with torch.no_grad():
        out = net(x, sigma)
        body = net.refinenet(x)
    torch.testing.assert_close(out * sigma[:, None, None, None], body)
    torch.testing.assert_close(out[0] * 0.7, out[1] * 0.02)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("net_class, kwargs", [
    (NCSN, {}), (NCSNv2, {"depth": "standard"}), (NCSNv2, {"depth": "deeper"})])
def test_rescale_input_feeds_two_x_minus_one_to_the_same_weights(net_class, kwargs):
    shape = (3, 8, 8)
    plain = perturb_(net_class(shape, SIGMAS, ngf=8, **kwargs))
    mapped = net_class(shape, SIGMAS, ngf=8, rescale_input=True, **kwargs).eval()
    mapped.load_state_dict(plain.state_dict())
    x, sigma = torch.rand(4, *shape), SIGMAS[torch.tensor([0, 1, 3, 4])]
    with torch.no_grad():
        torch.testing.assert_close(mapped(x, sigma), plain(2 * x - 1, sigma))
        assert not torch.allclose(mapped(x, sigma), plain(x, sigma), atol=1e-3)


@pytest.mark.parametrize("depth, size, coarsest", [("standard", 32, 16), ("deeper", 128, 32),
                                                   ("deepest", 256, 32)])
def test_ncsnv2_depths_run_at_their_image_sizes(depth, size, coarsest):
    net = NCSNv2((3, size, size), SIGMAS, ngf=4, depth=depth)
    seen = []
    net.refinenet.stages[-1][-1].register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        out = net(torch.rand(1, 3, size, size), SIGMAS[[0]])
    assert out.shape == (1, 3, size, size) and torch.isfinite(out).all()
    assert len(net.refinenet.stages) == {"standard": 4, "deeper": 5, "deepest": 6}[depth]
    assert seen[0].shape[2:] == (coarsest, coarsest)


def test_ncsnv2_rejects_unknown_depth_and_too_small_images():
    with pytest.raises(ValueError, match="depth"):
        NCSNv2((3, 32, 32), SIGMAS, ngf=4, depth="deep")
    with pytest.raises(ValueError, match="at least 8x8"):
        NCSNv2((3, 4, 4), SIGMAS, ngf=4, depth="deepest")


# ----------------------------------------------------------------------------- U-Net
def test_unet_scale_by_sigma_divides_the_same_body_by_sigma():
    kwargs = dict(ch=16, ch_mult=[1, 2], attn_resolutions=[4], dropout=0.0)
    scaled = perturb_(UNet((1, 8, 8), SIGMAS, scale_by_sigma=True, **kwargs))
    plain = UNet((1, 8, 8), SIGMAS, scale_by_sigma=False, **kwargs).eval()
    plain.load_state_dict(scaled.state_dict())
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.9, 0.03])
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, sigma) * sigma[:, None, None, None], plain(x, sigma))


@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_unet_body_depends_on_sigma(embedding):
    # Without the 1/sigma output scaling, sigma reaches the output only through the embedding.
    net = perturb_(UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2], attn_resolutions=[4],
                        embedding=embedding, scale_by_sigma=False))
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        a, b = net(x, SIGMAS[[1]]), net(x, SIGMAS[[1]] * 1.1)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_unet_puts_attention_at_the_chosen_resolutions():
    net = UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[4])
    n_attention = sum(isinstance(m, AttentionBlock) for m in net.modules())
    assert n_attention == 2 + 3 + 1          # 4x4 level: down blocks + up blocks + middle
    net = UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[8, 4])
    assert sum(isinstance(m, AttentionBlock) for m in net.modules()) == 2 * (2 + 3) + 1


def test_unet_output_starts_at_zero():
    # DDPM initialises the last convolution to zero: the initial score is 0 everywhere.
    net = UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2], attn_resolutions=[4])
    assert net(torch.randn(2, 1, 8, 8), SIGMAS[[0, 1]]).abs().max() == 0


def test_unet_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet((1, 10, 10), SIGMAS, ch=16, ch_mult=[1, 2, 2], attn_resolutions=[])
    with pytest.raises(ValueError, match=r"attn_resolutions \[16\]"):
        UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2])
    with pytest.raises(ValueError, match="embedding"):
        UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2], attn_resolutions=[4], embedding="t")


def test_fourier_frequencies_are_saved_with_the_model():
    net = UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2], attn_resolutions=[4])
    other = UNet((1, 8, 8), SIGMAS, ch=16, ch_mult=[1, 2], attn_resolutions=[4])
    assert not torch.equal(net.embed[0].W, other.embed[0].W)      # drawn afresh per network
    x, sigma = torch.randn(2, 1, 8, 8), SIGMAS[[0, 4]]
    perturb_(net)
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), other.eval()(x, sigma))


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config_class, net_class, shape", [
    (NCSNConfig, NCSN, (3, 32, 32)), (NCSNv2Config, NCSNv2, (3, 32, 32)),
    (UNetConfig, UNet, (3, 32, 32))])
def test_yaml_schema_and_constructor_agree(config_class, net_class, shape):
    defaults = dataclasses.asdict(config_class())
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{defaults['name']}.yaml"))
    assert yaml.pop("defaults") == [f"/schema/model/{defaults['name']}@_here_", "_self_"]
    assert yaml == defaults                                    # every field, at its paper value
    merged = OmegaConf.merge(OmegaConf.structured(config_class), yaml)
    # The network's own keys: the name and EDM's wrapper keys (ncsn.nets.precond) aside.
    fields = {k: v for k, v in OmegaConf.to_container(merged).items()
              if k != "name" and k not in PRECOND_KEYS}
    signature = inspect.signature(net_class).parameters
    assert {k: signature[k].default for k in fields} == {
        k: tuple(v) if isinstance(signature[k].default, tuple) else v for k, v in fields.items()}
    with torch.device("meta"):                                 # full size, no memory
        net = net_class(shape, SIGMAS, **fields)
    assert sum(p.numel() for p in net.parameters()) > 1_000_000

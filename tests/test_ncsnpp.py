"""NCSN++ (ncsn.nets.ncsnpp): its layouts, the division by sigma, the 1e-10 initialisation,
group norm, FIR resampling, and the map from score_sde's state dict. The comparison with
score_sde's own network is scripts/check_reference.py (its results: docs/REPRODUCING.md).

Tiny widths and images: the whole file runs in seconds on one core.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ncsn import registry, training
from ncsn.checkpoint import load_checkpoint
from ncsn.nets.ncsnpp import (FIRConv2d, NCSNpp, NCSNppConfig, downsample2, fir_filter,
                              from_score_sde, score_sde_keys, upsample2)
from ncsn.noise import geometric_sigmas
from conftest import compose_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
SIGMAS = geometric_sigmas(50.0, 0.01, 10)
LAYOUTS = {   # tiny versions of score_sde's layouts, and its other options
    "cifar10": dict(nf=8, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[8]),
    "256px": dict(nf=8, ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
                  progressive="output_skip", progressive_input="input_skip", dropout=0.0),
    "ddpm-positional": dict(nf=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                            resblock_type="ddpm", progressive="residual",
                            progressive_input="input_skip", progressive_combine="cat",
                            embedding_type="positional"),
    "no-fir": dict(nf=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                   fir=False, skip_rescale=False, resblock_type="ddpm",
                   resamp_with_conv=False, progressive_input="none"),
}
each_layout = pytest.mark.parametrize("layout", sorted(LAYOUTS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(layout: str, size: int = 16, **changes) -> NCSNpp:
    return NCSNpp((3, size, size), SIGMAS, **{**LAYOUTS[layout], **changes})


@torch.no_grad()
def perturb_(net: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter: the branches that start at 1e-10 would hide the body."""
    for p in net.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return net.eval()


# ----------------------------------------------------------------------------- the network
@each_layout
def test_output_has_the_input_shape_and_is_finite(layout):
    net = perturb_(tiny(layout))
    x = torch.rand(2, 3, 16, 16)
    out = net(x, SIGMAS[[0, 9]])
    assert out.shape == x.shape and out.isfinite().all()


def test_output_is_the_body_divided_by_sigma():
    scaled = perturb_(tiny("cifar10"))
    body = tiny("cifar10", scale_by_sigma=False).eval()
    body.load_state_dict(scaled.state_dict())
    x, sigma = torch.rand(3, 3, 16, 16), torch.tensor([0.02, 1.0, 40.0])
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, sigma) * sigma[:, None, None, None], body(x, sigma))


def test_the_body_depends_on_sigma():
    net = perturb_(tiny("cifar10", scale_by_sigma=False))
    x = torch.rand(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([0.1, 10.0]))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("layout", ["cifar10", "256px"])
def test_every_branch_and_the_output_start_at_scale_1e_10(layout):
    # DDPM's init U(+-sqrt(3 s / fan_avg)) with s = 1e-10 (init_scale 0): the last conv of
    # each residual branch, of attention, and of the output (or the output pyramid).
    net = tiny(layout)
    last = [m.conv2 for m in net.modules() if hasattr(m, "conv2")]
    last += [m.proj for m in net.modules() if hasattr(m, "proj")]
    last += [net.conv_out] if hasattr(net, "conv_out") else [
        level.pyramid_conv for level in net.up]
    for conv in last:
        fan_avg = (conv.in_channels + conv.out_channels) / 2 * conv.weight[0, 0].numel()
        assert conv.weight.abs().max() <= math.sqrt(3e-10 / fan_avg)
        assert not conv.bias.any()
    body = tiny(layout, scale_by_sigma=False).eval()
    with torch.no_grad():
        assert body(torch.rand(2, 3, 16, 16), SIGMAS[[0, 9]]).abs().max() < 1e-3


def test_group_norm_has_min_of_a_quarter_of_the_channels_and_32_groups():
    with torch.device("meta"):                        # widths 32 to 512, no memory
        net = NCSNpp((3, 8, 8), SIGMAS, nf=32, ch_mult=[1, 8], num_res_blocks=1,
                     attn_resolutions=[4])
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {m.num_channels for m in norms} >= {32, 64, 256, 512}
    for m in norms:
        assert m.num_groups == min(m.num_channels // 4, 32) and m.eps == 1e-6


def test_positional_embedding_looks_sigma_up_in_the_table():
    net = perturb_(tiny("ddpm-positional"))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, SIGMAS[[2, 7]] * 1.01), net(x, SIGMAS[[2, 7]]))
    assert "sigmas" in net.state_dict() and "sigmas" not in tiny("cifar10").state_dict()


def test_twice_differentiable():
    net = perturb_(tiny("256px"))
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    (g,) = torch.autograd.grad(net(x, SIGMAS[[3]]).pow(2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    assert gg.abs().sum() > 0


def test_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="divisible by 8"):
        NCSNpp((3, 12, 12), SIGMAS, nf=8, attn_resolutions=[])
    with pytest.raises(ValueError, match=r"attn_resolutions \[5\]"):
        NCSNpp((3, 16, 16), SIGMAS, nf=8, attn_resolutions=[5])
    with pytest.raises(ValueError, match="progressive must be one of"):
        NCSNpp((3, 16, 16), SIGMAS, nf=8, progressive="skip")


# ----------------------------------------------------------------------------- FIR
def test_fir_filter_is_the_normalised_outer_product():
    k = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    torch.testing.assert_close(fir_filter([1, 3, 3, 1]), torch.outer(k, k))


def test_fir_resampling_keeps_a_constant_image_away_from_the_border():
    # [1, 3, 3, 1] / 8 with zero padding: downsampling (pad 1, 1) misses one tap of 1/8 at
    # each border; upsampling (zeros inserted, gain 2 per axis, pad 2, 1) keeps 2 * 3/8 there.
    c, kernel = 0.7, fir_filter([1, 3, 3, 1])
    down = downsample2(torch.full((1, 2, 8, 8), c), kernel)[0, 0]
    up = upsample2(torch.full((1, 2, 8, 8), c), kernel)[0, 0]
    assert down.shape == (4, 4) and up.shape == (16, 16)
    for out, edge in ((down, 7 / 8), (up, 3 / 4)):
        torch.testing.assert_close(out[1:-1, 1:-1], torch.full_like(out[1:-1, 1:-1], c))
        torch.testing.assert_close(out[0, 1:-1], torch.full_like(out[0, 1:-1], c * edge))
        torch.testing.assert_close(out[-1, -1], torch.tensor(c * edge * edge))


@pytest.mark.parametrize("up", [True, False])
def test_fused_fir_convolution_with_an_identity_kernel_is_fir_resampling(up):
    conv = FIRConv2d(2, 2, up, [1, 3, 3, 1])
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[[0, 1], [0, 1], 1, 1] = 1.0        # the 3x3 delta: a copy of each channel
    x, kernel = torch.randn(1, 2, 6, 6), fir_filter([1, 3, 3, 1])
    expected = upsample2(x, kernel) if up else downsample2(x, kernel)
    torch.testing.assert_close(conv(x), expected)


# ----------------------------------------------------------------------------- score_sde
@each_layout
def test_score_sde_keys_are_a_bijection_onto_the_state_dict(layout):
    net = tiny(layout)
    keys = score_sde_keys(net)
    assert sorted(keys.values()) == sorted(net.state_dict())
    assert len(set(keys.values())) == len(keys)
    assert all(k.startswith("all_modules.") or k == "sigmas" for k in keys)


def test_score_sde_keys_follow_its_all_modules_list():
    # score_sde's NCSNpp appends: Fourier features, two Linear, the first conv; per level
    # down its blocks (each followed by attention at 8 px) and, but at the last level, a
    # down block and the input pyramid's conv; 3 in the middle; per level up its blocks,
    # attention at 8 px and, but at the finest level, an up block; a GroupNorm and a conv.
    net = tiny("cifar10")                          # 4 levels (16 to 2 px), 2 blocks each
    keys = score_sde_keys(net)
    n = 4 + (4 * 2 + 2 + 3 * 2) + 3 + (4 * 3 + 1 + 3) + 2
    assert keys["all_modules.0.W"] == "fourier.W"
    assert keys["all_modules.2.weight"] == "embed.2.weight"
    assert keys["all_modules.3.weight"] == "conv_in.weight"
    assert keys["all_modules.4.GroupNorm_0.weight"] == "down.0.blocks.0.norm1.weight"
    assert keys["all_modules.9.NIN_0.W"] == "down.1.attns.0.q.weight"     # level 1: 8 px
    assert keys[f"all_modules.{n - 1}.weight"] == "conv_out.weight"
    assert {int(k.split(".")[1]) for k in keys} == set(range(n))


def score_sde_state(net: NCSNpp) -> dict:
    """Our state dict written as score_sde's: its names, its NIN weights as (in, out)."""
    state = net.state_dict()
    return {theirs: (state[ours][:, :, 0, 0].t() if theirs.endswith(".W") and
                     ".NIN_" in theirs else state[ours])
            for theirs, ours in score_sde_keys(net).items()}


@each_layout
def test_from_score_sde_inverts_the_naming(layout):
    net, other = perturb_(tiny(layout)), tiny(layout)
    theirs = {"module." + k: v for k, v in score_sde_state(net).items()}    # DataParallel's
    other.load_state_dict(from_score_sde({**theirs, "module.sigmas": SIGMAS}, other))
    loaded = other.state_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_from_score_sde_names_what_does_not_fit():
    net = tiny("cifar10")
    theirs = score_sde_state(net)
    with pytest.raises(ValueError, match="unexpected keys .*all_modules.999"):
        from_score_sde({**theirs, "all_modules.999.weight": torch.zeros(1)}, net)
    with pytest.raises(ValueError, match="all_modules.3.weight: shape"):
        from_score_sde({**theirs, "all_modules.3.weight": torch.zeros(8, 1, 3, 3)}, net)


# ----------------------------------------------------------------------------- configs
def test_yaml_schema_and_constructor_agree():
    defaults = dataclasses.asdict(NCSNppConfig())
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / "ncsnpp.yaml"))
    assert yaml.pop("defaults") == ["/schema/model/ncsnpp@_here_", "_self_"]
    assert yaml == defaults
    signature = inspect.signature(NCSNpp).parameters
    for key, value in defaults.items():
        if key not in ("name", "precond", "sigma_data"):     # the wrapper's (ncsn.nets.precond)
            default = signature[key].default
            assert (list(default) if isinstance(default, tuple) else default) == value, key
    deep = OmegaConf.to_container(OmegaConf.load(CONFIGS / "ncsnpp_deep.yaml"))
    deep.pop("defaults")
    assert {k: v for k, v in deep.items() if yaml[k] != v} == {"num_res_blocks": 8}


def test_takes_any_sigma_with_fourier_features_only():
    cfg = compose_train(["dataset=digits", "model=ncsnpp", "noise.continuous=true"])
    assert registry.network(cfg.model).takes_sigma_values and not registry.part_problems(cfg)
    positional = compose_train(["dataset=digits", "model=ncsnpp", "noise.continuous=true",
                                "model.embedding_type=positional"])
    assert not registry.network(positional.model).takes_sigma_values
    assert "can only look sigma up" in registry.part_problems(positional)[0]


def test_a_tiny_ncsnpp_trains_on_the_digits(tmp_path):
    cfg = compose_train(["dataset=digits", "model=ncsnpp", "model.nf=8", "model.ch_mult=[1,2]",
                         "model.num_res_blocks=1", "model.attn_resolutions=[4]",
                         "noise.continuous=true", "noise.num_scales=4",
                         "noise.sigma_begin=1.0", "trainer.n_steps=2", "trainer.batch_size=8",
                         "trainer.n_plot_samples=2", "trainer.device=cpu",
                         "trainer.progress=false", "sampler.n_steps_each=1"])
    ckpt = load_checkpoint(training.train(cfg, tmp_path))
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["name"] == "ncsnpp"
    assert set(ckpt["model"]) == set(NCSNpp((1, 8, 8), nf=8, ch_mult=[1, 2], num_res_blocks=1,
                                            attn_resolutions=[4]).state_dict())


def test_edm_preconditioning_wraps_ncsnpp():
    cfg = compose_train(["dataset=digits", "model=ncsnpp", "model.nf=8", "model.ch_mult=[1,2]",
                         "model.num_res_blocks=1", "model.attn_resolutions=[]",
                         "model.precond=edm", "model.scale_by_sigma=false"])
    net = registry.build_model(cfg.model, (1, 8, 8), SIGMAS)
    assert isinstance(net.net, NCSNpp)
    assert net(torch.rand(2, 1, 8, 8), SIGMAS[[0, 9]]).shape == (2, 1, 8, 8)

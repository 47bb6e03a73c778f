"""EDM's non-leaky augmentation (ncsn/augment.py; Karras et al. 2022, Sec. 5): the pipe's
geometry (the identity, a quarter turn and a whole-pixel shift through G^-1), its labels, its
draws under data parallelism, the networks' augmentation embedding (nothing at zero labels:
the non-leaky condition), the loss's draw order, and the refusals. scripts/check_edm.py
compares the pipe with EDM's own AugmentPipe."""
import pytest
import torch
from torch import nn

from ncsn import losses, registry
from ncsn.augment import AUGMENT_DIM, AugmentPipe, geometric_transform, rotation, translation
from ncsn.cli.precheck import check_train
from ncsn.nets.ncsnpp import NCSNpp
from ncsn.nets.precond import EDMPrecond
from ncsn.nets.unet import UNet
from ncsn.noise import geometric_sigmas
from ncsn.registry import ConfigError
from conftest import compose_train

OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def images(n=8, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- the pipe
def test_at_p_0_the_pipe_returns_the_images_and_zero_labels():
    # the geometric path still runs (as EDM's), and the sym6 filter is orthonormal: 2x up
    # with it reversed, then down with it, is the identity (to float round-off)
    x = images()
    y, labels = AugmentPipe(p=0.0)(x)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert labels.shape == (len(x), AUGMENT_DIM) and not labels.any()


def test_x_flips_alone_flip_the_images_their_label_says():
    torch.manual_seed(1)
    x = images(32)
    y, labels = AugmentPipe(p=1.0, **{**OFF, "xflip": 1})(x)
    assert labels.shape == (32, 1) and set(labels.flatten().tolist()) == {0.0, 1.0}
    flipped = labels[:, 0] == 1
    assert torch.equal(y[flipped], x[flipped].flip(3)) and torch.equal(y[~flipped], x[~flipped])


def test_g_inverse_the_identity_a_shift_and_a_quarter_turn():
    x, eye = images(), torch.eye(3).expand(8, 3, 3)
    torch.testing.assert_close(geometric_transform(x, eye), x, atol=1e-5, rtol=0)
    # output (x, y) is the input at G^-1 (x, y, 1). A whole-pixel translation commutes with
    # the filters: out[..., j] = in[..., j + 1] and out[..., i, :] = in[..., i - 2, :], exactly
    # away from the edge (where the reflection padding enters)
    shifted = geometric_transform(x, translation(torch.ones(8), torch.zeros(8)))
    torch.testing.assert_close(shifted[..., 4:-4], x[..., 5:-3], atol=1e-5, rtol=0)
    shifted = geometric_transform(x, translation(torch.zeros(8), torch.full([8], -2.0)))
    torch.testing.assert_close(shifted[..., 4:-4, :], x[..., 2:-6, :], atol=1e-5, rtol=0)
    # a rotation does not commute with the asymmetric sym6 filter: a quarter turn about the
    # centre turns a smooth image to within the filter's small error, not exactly
    u = torch.linspace(-1, 1, 16)
    smooth = torch.stack([(2 * u[:, None] + u[None, :]).sin(), (2 * u[:, None] * u[None, :]).cos(),
                          u[:, None] * u[None, :] ** 2])[None].repeat(8, 1, 1, 1)
    turned = geometric_transform(smooth, rotation(torch.full([8], torch.pi / 2)))
    assert (turned - smooth.rot90(1, dims=(2, 3))).abs().max() < 0.05
    assert (turned - smooth).abs().max() > 1


def test_the_labels_are_edms_nine_and_the_rotation_is_on_the_circle():
    torch.manual_seed(2)
    _, labels = AugmentPipe(p=1.0)(images(64))
    assert labels.shape == (64, AUGMENT_DIM) and labels.dtype == torch.float32
    assert set(labels[:, :2].flatten().tolist()) <= {0.0, 1.0}      # x-flip, y-flip
    cos_minus_1, sin = labels[:, 3], labels[:, 4]                    # the rotation's angle
    torch.testing.assert_close((cos_minus_1 + 1) ** 2 + sin ** 2, torch.ones(64))
    # p = 1: every transformation applied (the anisotropy's direction r is 0 half the time)
    assert (labels[:, [2, 3, 4, 5, 7, 8]] != 0).all()


def test_ranks_augment_the_rows_of_one_process():
    x = images(12)
    torch.manual_seed(3)
    whole, whole_labels = AugmentPipe(p=0.5)(x)
    for rows in (slice(0, 5), slice(5, 12)):
        torch.manual_seed(3)
        with losses.batch_shard(rows, 12):
            part, part_labels = AugmentPipe(p=0.5)(x[rows])
        torch.testing.assert_close(part, whole[rows])
        torch.testing.assert_close(part_labels, whole_labels[rows])


# ----------------------------------------------------------------------------- networks
NETS = {"ncsnpp": lambda dim: NCSNpp((3, 8, 8), nf=8, ch_mult=[1, 2], num_res_blocks=1,
                                     attn_resolutions=[], dropout=0.0, init_scale=1.0,
                                     scale_by_sigma=False, centered=True, augment_dim=dim),
        "unet": lambda dim: UNet((3, 8, 8), ch=8, ch_mult=[1, 2], num_res_blocks=1,
                                 attn_resolutions=[], dropout=0.0, augment_dim=dim)}


@pytest.mark.parametrize("name", sorted(NETS))
def test_zero_labels_add_nothing_to_the_network(name):
    torch.manual_seed(4)
    plain = NETS[name](0)
    torch.manual_seed(4)
    net = NETS[name](AUGMENT_DIM)              # map_augment is built last: the rest is equal
    extra = set(net.state_dict()) - set(plain.state_dict())
    assert extra == {"map_augment.weight"} and net.map_augment.bias is None
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in plain.state_dict().items())
    with torch.no_grad():                      # off the zero-initialised layers, alike
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k not in extra})
    x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.01, 0.3, 2.0, 50.0])
    labels = torch.randn(4, AUGMENT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), plain(x, sigma))
        torch.testing.assert_close(net(x, sigma, augment_labels=torch.zeros(4, AUGMENT_DIM)),
                                   plain(x, sigma))
        assert not torch.allclose(net(x, sigma, augment_labels=labels), plain(x, sigma))
        # the labels reach the network through EDM's preconditioning
        wrapped = EDMPrecond(net)
        D = wrapped.denoise(x, sigma, labels)
        s = sigma[:, None, None, None]
        F_x = net(x / (s ** 2 + 0.25).sqrt(), sigma.log().div(4).exp(), augment_labels=labels)
        torch.testing.assert_close(D, 0.25 / (s ** 2 + 0.25) * x
                                   + s * 0.5 / (s ** 2 + 0.25).sqrt() * F_x)


# ----------------------------------------------------------------------------- the loss
class Recorder(nn.Module):
    """A score network that records the augmentation labels it is given."""

    def forward(self, x, sigma, augment_labels=None):
        self.labels = augment_labels
        return torch.zeros_like(x)


def augmenting_edm_loss(p: float):
    """loss=edm with loss.augment_p=p for NCSN++ with the 9 labels, over EDM's sigma range."""
    loss_cfg = compose_train(["loss=edm", f"loss.augment_p={p}"]).loss
    model_cfg = compose_train(["dataset=cifar10", "model=ncsnpp", "model.augment_dim=9"]).model
    return registry.build_objective(loss_cfg, model_cfg, geometric_sigmas(80.0, 0.002, 18))


def zero_score_loss(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D = y + n for a zero score: the loss is lambda(sigma) ||n||^2, n drawn next."""
    n = torch.randn_like(y) * sigma[:, None, None, None]
    return losses.edm_weight(sigma) * n.flatten(1).pow(2).sum(1)


def test_the_loss_draws_sigma_then_the_augmentation_then_the_noise():
    x, net = images(16), Recorder()
    torch.manual_seed(5)
    per_sample, _ = augmenting_edm_loss(0.12)(net, x)
    torch.manual_seed(5)
    sigma = losses.edm_sigmas(16, like=x)
    y, labels = AugmentPipe(p=0.12)(x)
    torch.testing.assert_close(per_sample, zero_score_loss(y, sigma))   # about the augmented y
    torch.testing.assert_close(net.labels, labels)


def test_the_held_out_loss_sees_the_images_unaugmented_and_no_labels():
    x, net = images(16), Recorder()
    torch.manual_seed(5)
    per_sample, _ = augmenting_edm_loss(1.0).held_out(net, x)
    torch.manual_seed(5)
    sigma = losses.edm_sigmas(16, like=x)
    torch.testing.assert_close(per_sample, zero_score_loss(x, sigma))   # no augmentation drawn
    assert net.labels is None


# ----------------------------------------------------------------------------- refusals
CIFAR = ["dataset=cifar10", "model=ncsnpp", "model.precond=edm", "model.scale_by_sigma=false"]


@pytest.mark.parametrize("overrides, message", [
    ([*CIFAR, "loss=edm", "loss.augment_p=0.12"],
     "loss.augment_p=0.12 conditions the network on EDM's 9 augmentation labels (non-leaky "
     "augmentation), but model.augment_dim=0; set model.augment_dim=9, or loss.augment_p=0"),
    ([*CIFAR, "loss=ve_edm", "model.augment_dim=9"],
     "model.augment_dim=9 embeds EDM's augmentation labels, but loss.augment_p=0 gives none"),
    ([*CIFAR, "loss=anneal_dsm", "model.augment_dim=9"],
     "model.augment_dim=9 embeds EDM's augmentation labels, which only loss=edm or "
     "loss=ve_edm with loss.augment_p > 0 gives; set model.augment_dim=0"),
    (["dataset=cifar10", "model=ncsnv2", "loss=edm", "loss.augment_p=0.12"],
     "loss.augment_p=0.12 conditions the network on EDM's 9 augmentation labels, but "
     "model=ncsnv2 takes none"),
    ([*CIFAR, "loss=edm", "loss.augment_p=2", "model.augment_dim=9"],
     "loss.augment_p is a probability (EDM's --augment: 0.12), got 2.0"),
])
def test_augmentation_without_its_labels_is_refused_in_one_line(overrides, message):
    cfg = compose_train(["trainer.device=cpu", *overrides])
    with pytest.raises(ConfigError) as refused:
        check_train(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_edm_experiment_augments_as_edms_train_py():
    cfg = compose_train(["experiment=edm_cifar10_ve"])
    assert cfg.loss.augment_p == 0.12 and cfg.model.augment_dim == AUGMENT_DIM
    assert compose_train(["experiment=edm_cifar10_ve", "loss=ve_edm"]).loss.augment_p == 0.12

"""Glow (Kingma & Dhariwal 2018) as openai/glow's code (model.py, tfops.py) builds it.

Images (model.py ``codec``): ``n_levels`` levels L; each squeezes (C, H, W) to
(4C, H/2, W/2) and runs ``depth`` steps of flow K; every level but the last then lets half
its channels leave under a prior learned from the other half (``split2d``), and the last
level's output has a learned prior of its own (``prior`` with ``--learntop``). A step of
flow (``revnet2d_step``, paper Fig. 2a): actnorm, invertible 1x1 convolution, coupling.

Both learned priors are written as bijections followed by the standard normal:
z ~ N(mean, exp(logs)^2) is eps = (z - mean) exp(-logs) with log-det -sum logs and
eps ~ N(0, I), the same density; sampling at temperature T draws eps with standard
deviation T, as the code's ``eps_std`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncsn.flows.layers import (ActNorm, Flatten, InvertibleConv1x1, MultiScale, Sequence,
                               Squeeze, _per_channel, _zeros)
from ncsn.flows.models import Flow, _check_squeezable

COUPLINGS = ("affine", "additive")
LOGSCALE_FACTOR = 3.0      # tfops: actnorm and the zero-initialised layers scale by exp(3 logs)


# ----------------------------------------------------------------------------- NN()
def edge_padded(x: Tensor) -> Tensor:
    """tfops.add_edge_padding for a 3x3 filter: x (B, C, H, W) zero-padded by one pixel,
    with one more channel that is 1 on the padding and 0 inside (B, C + 1, H + 2, W + 2), so
    that a convolution tells the image's edge from a dark pixel."""
    b, _, h, w = x.shape
    border = F.pad(x.new_zeros(1, 1, h, w), (1, 1, 1, 1), value=1.0)
    return torch.cat([F.pad(x, (1, 1, 1, 1)), border.expand(b, -1, -1, -1)], 1)


class EdgePad(nn.Module):
    """:func:`edge_padded` as a layer, before a 3x3 convolution without padding."""

    def forward(self, x: Tensor) -> Tensor:
        return edge_padded(x)


class NetActNorm(ActNorm):
    """Actnorm inside a coupling network (tfops.conv2d's ``do_actnorm``): a normalisation,
    not a bijection of the flow, so its log-det is dropped. It is an :class:`ActNorm`, so
    the flow's data-dependent initialisation reaches it."""

    def __init__(self, channels: int):
        super().__init__(channels, LOGSCALE_FACTOR)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class ZeroScaled(nn.Module):
    """tfops.conv2d_zeros / linear_zeros: ``layer`` (a convolution or a linear map) with
    zero weights and bias at the start, its output times exp(3 logs) per channel, logs
    learned from 0."""

    def __init__(self, layer: nn.Conv2d | nn.Linear):
        super().__init__()
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        self.layer = layer
        self.logs = nn.Parameter(torch.zeros(layer.weight.shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x)
        return y * _per_channel((LOGSCALE_FACTOR * self.logs).exp(), y)


def zero_conv(channels_in: int, channels_out: int) -> nn.Sequential:
    """tfops.conv2d_zeros: a 3x3 convolution of the edge-padded input, zero at the start."""
    return nn.Sequential(EdgePad(), ZeroScaled(nn.Conv2d(channels_in + 1, channels_out, 3)))


def _normal(layer: nn.Module) -> nn.Module:
    nn.init.normal_(layer.weight, 0.0, 0.05)           # tfops.default_initializer
    return layer


def coupling_net(channels_in: int, width: int, channels_out: int,
                 image: bool = True) -> nn.Sequential:
    """The coupling network NN() (model.py ``f``): a 3x3 convolution (edge-padded, no bias)
    and actnorm, ReLU, a 1x1 convolution and actnorm, ReLU, then the zero-initialised 3x3
    convolution with its learned output scale exp(3 logs), so a coupling starts with NN() = 0.
    Points (``image=False``): the same with linear maps."""
    if not image:
        return nn.Sequential(_normal(nn.Linear(channels_in, width, bias=False)),
                             NetActNorm(width), nn.ReLU(),
                             _normal(nn.Linear(width, width, bias=False)), NetActNorm(width),
                             nn.ReLU(), ZeroScaled(nn.Linear(width, channels_out)))
    return nn.Sequential(EdgePad(), _normal(nn.Conv2d(channels_in + 1, width, 3, bias=False)),
                         NetActNorm(width), nn.ReLU(),
                         _normal(nn.Conv2d(width, width, 1, bias=False)), NetActNorm(width),
                         nn.ReLU(), zero_conv(width, channels_out))


# ----------------------------------------------------------------------------- the step
class Coupling(nn.Module):
    """Glow's coupling (model.py ``revnet2d_step``, paper Table 1): z1, z2 = the first and
    second half of the channels; z1 passes and conditions z2 through h = NN(z1).

    ``affine``: shift = h[:, 0::2], scale = sigmoid(h[:, 1::2] + 2) (channels interleaved, as
    the code takes them), z2 <- (z2 + shift) scale, log-det sum log scale. The paper prints
    z2 <- s z2 + t with s = exp(log s); the code adds the shift first and bounds the scale in
    (0, 1), which starts near sigmoid(2) = 0.88, not at 1.
    ``additive`` (NICE): z2 <- z2 + h, log-det 0.
    """

    def __init__(self, channels: int, net: nn.Module, affine: bool = True):
        super().__init__()
        self.half, self.net, self.affine = channels // 2, net, affine

    def _shift_log_scale(self, z1: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.net(z1)
        if not self.affine:
            return h, None
        return h[:, 0::2], F.logsigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = x[:, :self.half], x[:, self.half:]
        shift, log_scale = self._shift_log_scale(z1)
        if log_scale is None:
            return torch.cat([z1, z2 + shift], 1), _zeros(x)
        z2 = (z2 + shift) * log_scale.exp()
        return torch.cat([z1, z2], 1), log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = y[:, :self.half], y[:, self.half:]
        shift, log_scale = self._shift_log_scale(z1)
        if log_scale is None:
            return torch.cat([z1, z2 - shift], 1), _zeros(y)
        z2 = z2 * (-log_scale).exp() - shift
        return torch.cat([z1, z2], 1), -log_scale.flatten(1).sum(1)


def flow_step(channels: int, hidden: int, lu: bool, coupling: str,
              image: bool = True) -> list[nn.Module]:
    """One step of flow (paper Fig. 2a): actnorm, invertible 1x1 convolution, coupling."""
    half = channels // 2
    n_out = 2 * (channels - half) if coupling == "affine" else channels - half
    return [ActNorm(channels, LOGSCALE_FACTOR), InvertibleConv1x1(channels, lu),
            Coupling(channels, coupling_net(half, hidden, n_out, image), coupling == "affine")]


# ----------------------------------------------------------------------------- the priors
class SplitPrior(nn.Module):
    """The prior of the half that leaves at a split (model.py ``split2d_prior``):
    z2 ~ N(mean, exp(logs)^2) with (mean, logs) = (h[:, 0::2], h[:, 1::2]) and h a
    zero-initialised convolution of z1 (the first half, which goes on). As a bijection,
    (z1, z2) -> (z1, eps2), eps2 = (z2 - mean) exp(-logs) (the code's ``get_eps``); the
    multi-scale split then puts the standard normal on eps2."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        self.net = zero_conv(self.half, 2 * (channels - self.half))

    def _mean_logs(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(z1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = x[:, :self.half], x[:, self.half:]
        mean, logs = self._mean_logs(z1)
        return torch.cat([z1, (z2 - mean) * (-logs).exp()], 1), -logs.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        z1, eps2 = y[:, :self.half], y[:, self.half:]
        mean, logs = self._mean_logs(z1)
        return torch.cat([z1, eps2 * logs.exp() + mean], 1), logs.flatten(1).sum(1)


class TopPrior(nn.Module):
    """The learned prior of the last level's output (model.py ``prior`` with ``learntop``):
    z ~ N(mean, exp(logs)^2), (mean, logs) the first and second C channels of a
    zero-initialised convolution applied to zeros (2C channels). Only its bias, output scale
    and edge-channel weights matter, so mean and logs are learned per channel, and per
    position near the border. Points: a zero-initialised linear map of zeros, i.e. a mean
    and logs per coordinate. As a bijection: z -> (z - mean) exp(-logs)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)
        c = shape[0]
        image = len(shape) == 3
        self.net = zero_conv(2 * c, 2 * c) if image else ZeroScaled(nn.Linear(2 * c, 2 * c))

    def _mean_logs(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = self.shape[0]
        h = self.net(like.new_zeros(1, 2 * c, *self.shape[1:]))
        return h[:, :c], h[:, c:]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, logs = self._mean_logs(z)
        return (z - mean) * (-logs).exp(), (-logs.sum()).expand(z.shape[0])

    def inverse(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        mean, logs = self._mean_logs(eps)
        return eps * logs.exp() + mean, logs.sum().expand(eps.shape[0])


# ----------------------------------------------------------------------------- the model
def glow(shape: tuple[int, ...], n_levels: int = 2, depth: int = 8, hidden: int = 128,
         lu: bool = True, coupling: str = "affine", learn_top: bool = True) -> Flow:
    """Glow (Kingma & Dhariwal 2018) on samples of ``shape``, with a Gaussian prior.

    Images (C, H, W): ``n_levels`` levels of a squeeze and ``depth`` steps of flow, each but
    the last ending in a split with :class:`SplitPrior`; coupling networks of ``hidden``
    channels (the code's ``--width``). ``lu``: the LU-decomposed 1x1 convolution (eq. 10)
    instead of the plain one, which the code ran. ``coupling``: ``affine`` or ``additive``
    (the code's ``--flow_coupling 1|0``). ``learn_top``: the learned :class:`TopPrior`
    (``--learntop``), else N(0, I). Points (D,): ``depth`` steps on the coordinates (the 1x1
    convolution a D x D matrix, fully connected coupling networks of ``hidden`` units);
    ``n_levels`` is for images."""
    if coupling not in COUPLINGS:
        raise ValueError(f"model.coupling must be one of {', '.join(COUPLINGS)}, "
                         f"got {coupling!r}")
    if len(shape) == 1:
        dim = shape[0]
        if dim < 2:
            raise ValueError(f"Glow's coupling splits the coordinates in two, but the data "
                             f"has {dim}")
        steps = [layer for _ in range(depth)
                 for layer in flow_step(dim, hidden, lu, coupling, image=False)]
        return Flow(shape, Sequence(steps + ([TopPrior(shape)] if learn_top else [])))
    _check_squeezable(shape, n_levels, "model=glow")
    return Flow(shape, _level(tuple(shape), n_levels, depth, hidden, lu, coupling, learn_top))


def _level(shape: tuple[int, int, int], n_levels: int, depth: int, hidden: int, lu: bool,
           coupling: str, learn_top: bool) -> nn.Module:
    """Squeeze, K steps, then a split and the next levels (model.py ``encoder``; the code
    squeezes z1 at the end of a split, here at the start of the next level: the same map)."""
    c, h, w = shape
    squeezed = (4 * c, h // 2, w // 2)
    layers = [Squeeze()]
    for _ in range(depth):
        layers += flow_step(4 * c, hidden, lu, coupling)
    if n_levels == 1:
        return Flatten(Sequence(layers + ([TopPrior(squeezed)] if learn_top else [])), squeezed)
    rest = _level((2 * c, h // 2, w // 2), n_levels - 1, depth, hidden, lu, coupling, learn_top)
    return MultiScale(Sequence(layers + [SplitPrior(4 * c)]), squeezed, rest)

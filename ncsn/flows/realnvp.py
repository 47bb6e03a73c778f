"""RealNVP (Dinh, Sohl-Dickstein & Bengio 2017) as its authors' code built it
(tensorflow/models research/real_nvp, ``real_nvp_multiscale_dataset.py`` and
``real_nvp_utils.py``; "the code" below).

Images, per scale (Sec. 3.6): ``n_couplings`` affine couplings with checkerboard masks,
squeeze, ``n_couplings`` with channel-wise masks, then half the variables factored out; the
last scale has ``n_couplings + 1`` checkerboard couplings. s and t come from a residual
network with weight normalisation and batch normalisation (Sec. 3.7, 4.1), whose width
doubles at every scale and again for the channel-wise couplings (the code's
``base_dim * 2 ** scale_idx`` and ``2 * dim``). ``norm``:

- ``batch`` (the paper's): batch normalisation inside the residual networks and on the
  transformed half of every coupling's output, as the code's ``use_batch_norm=1``;
- ``none``: neither (the code's ``use_batch_norm=0``: biases in the convolutions and a
  learned shift of the log-scale in their place);
- ``actnorm``: as ``none``, with Glow's actnorm after every coupling, so that no sample's
  density depends on its batch (score matching can train it).

Points: ``n_couplings`` affine couplings with alternating masks and MLPs, each followed by
the ``norm`` layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncsn import distributed
from ncsn.flows.layers import (ActNorm, AffineCoupling, BatchNorm, Flatten, MultiScale,
                               Sequence, Squeeze, alternating_mask, checkerboard_mask)
from ncsn.flows.models import Flow, _check_squeezable, mlp

NORMS = ("batch", "actnorm", "none")
POINT_NORMS = {"actnorm": ActNorm, "batch": BatchNorm, "none": None}
EPS = 1e-4           # the code's batch-norm epsilon (every batch_norm call passes 1e-4)
MOMENTUM = 0.1       # the code's decay: running -= 0.1 (running - batch)


def _per_channel(v: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast against images (B, C, H, W)."""
    return v.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- building blocks
class WeightNormConv2d(nn.Module):
    """The code's ``conv_layer(weight_norm=True)`` (Salimans & Kingma 2016): a 'same'
    convolution with w = g v / ||v|| per output channel. ``magnitude=False`` is the code's
    ``scale=False``: g = 1, only the direction v is learned. v starts uniform in +-std with
    std = sqrt(2 / c_in); g starts at the code's std sqrt(k^2 c_in / 12) = k / sqrt(6)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool, magnitude: bool):
        super().__init__()
        std = math.sqrt(2.0 / c_in)
        self.direction = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel).uniform_(-std, std))
        g0 = std * math.sqrt(kernel ** 2 * c_in / 12)
        self.magnitude = nn.Parameter(torch.full((c_out,), g0)) if magnitude else None
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.padding = kernel // 2

    def weight(self) -> Tensor:
        """w (C_out, C_in, k, k)."""
        w = self.direction / self.direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return w if self.magnitude is None else w * self.magnitude.view(-1, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight(), self.bias, padding=self.padding)


class _RunningMoments(nn.Module):
    """Per-channel statistics as the code's batch norms take them: the batch's mean and
    biased variance in training (in a distributed run the global batch's, through
    :func:`ncsn.distributed.global_moments`, with gradients through them), moving the running
    averages by MOMENTUM; the running averages in evaluation."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, var) (C,) for ``x`` (B, C, H, W)."""
        if not self.training:
            return self.running_mean, self.running_var
        x = x.to(self.running_mean.dtype)         # bf16 activations: float32 statistics
        mean, var = distributed.global_moments(x.transpose(0, 1).flatten(1))
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), MOMENTUM)
            self.running_var.lerp_(var.detach().to(self.running_var.dtype), MOMENTUM)
        return mean, var


class ShiftBatchNorm(_RunningMoments):
    """The code's ``batch_norm(scale=False)`` inside the coupling networks:
    y = (x - mu) / sqrt(var + eps) + beta per channel (no learned gain)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean, var = self.statistics(x)
        return ((x - _per_channel(mean)) * _per_channel(torch.rsqrt(var + EPS))
                + _per_channel(self.beta))


class ResidualBlock(nn.Module):
    """The code's ``residual_block`` (pre-activation, He et al. 2016):
    x + conv3x3(relu(bn(conv3x3(relu(bn(x)))))), the batch norms only with ``batch_norm``."""

    def __init__(self, dim: int, batch_norm: bool):
        super().__init__()
        self.norm_in = ShiftBatchNorm(dim) if batch_norm else nn.Identity()
        self.conv_0 = WeightNormConv2d(dim, dim, 3, bias=not batch_norm, magnitude=False)
        self.norm_0 = ShiftBatchNorm(dim) if batch_norm else nn.Identity()
        self.conv_out = WeightNormConv2d(dim, dim, 3, bias=True, magnitude=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_0(F.relu(self.norm_in(x)))
        return x + self.conv_out(F.relu(self.norm_0(h)))


class ResNet(nn.Module):
    """The code's ``resnet(skip=True)``: a 3x3 convolution to ``dim`` feature maps,
    ``n_blocks`` residual blocks, the sum of 1x1 'skip' convolutions of the input and of every
    block's output, (batch norm,) ReLU, and a 1x1 convolution to ``c_out``."""

    def __init__(self, c_in: int, dim: int, c_out: int, n_blocks: int, batch_norm: bool):
        super().__init__()
        self.conv_in = WeightNormConv2d(c_in, dim, 3, bias=True, magnitude=False)
        self.skip_in = WeightNormConv2d(dim, dim, 1, bias=True, magnitude=True)
        self.blocks = nn.ModuleList(ResidualBlock(dim, batch_norm) for _ in range(n_blocks))
        self.skips = nn.ModuleList(WeightNormConv2d(dim, dim, 1, bias=True, magnitude=True)
                                   for _ in range(n_blocks))
        self.norm_out = ShiftBatchNorm(dim) if batch_norm else nn.Identity()
        self.conv_out = WeightNormConv2d(dim, c_out, 1, bias=True, magnitude=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        skip = self.skip_in(h)
        for block, conv in zip(self.blocks, self.skips):
            h = block(h)
            skip = skip + conv(h)
        return self.conv_out(F.relu(self.norm_out(skip)))


class CouplingNet(nn.Module):
    """(t, pre-tanh log-scale) (B, 2C, H, W) of a coupling from its conditioning input x
    (B, C, H, W), as the code's couplings prepare it: (batch norm,) the concatenated ReLU
    [relu(x), relu(-x)] and, for a checkerboard coupling, the mask as one more channel. The
    code doubles the batch-normalised input of its checkerboard couplings; so does this."""

    def __init__(self, channels: int, hidden: int, n_blocks: int, batch_norm: bool,
                 mask_channel: bool):
        super().__init__()
        self.norm_in = ShiftBatchNorm(channels) if batch_norm else None
        self.mask_channel = mask_channel
        self.resnet = ResNet(2 * channels + int(mask_channel), hidden, 2 * channels, n_blocks,
                             batch_norm)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.norm_in is not None:
            x = self.norm_in(x) * (2.0 if self.mask_channel else 1.0)
        parts = [x, -x]
        if self.mask_channel:
            parts.append(mask.expand(x.shape[0], 1, *x.shape[2:]).to(x.dtype))
        return self.resnet(F.relu(torch.cat(parts, 1)))


class CouplingOutputNorm(_RunningMoments):
    """The code's ``bn_out`` (``batch_norm_log_diff``; RealNVP Sec. 3.7, eq. 17-18): the
    transformed part y (where ``free`` is 1) becomes (y - mu) / sqrt(var + eps), with
    (mu, var) per channel of ``free * y`` over batch and positions (for a checkerboard the
    held positions count as zeros, as in the code); no learned gain or shift. The log-det
    -1/2 log(var + eps) per transformed element treats the statistics as constants."""

    def forward(self, y: Tensor, free) -> tuple[Tensor, Tensor]:
        """(normalised y, log-det per element (B, C, H, W))."""
        mean, var = self.statistics(free * y)
        log_det = free * _per_channel(-0.5 * torch.log(var + EPS))
        return (y - free * _per_channel(mean)) * log_det.exp(), log_det.expand_as(y)

    def inverse(self, y: Tensor, free) -> tuple[Tensor, Tensor]:
        """Always with the running averages, as the code's reverse pass (``train=False``)."""
        log_det = free * _per_channel(0.5 * torch.log(self.running_var + EPS))
        x = y * log_det.exp() + free * _per_channel(self.running_mean)
        return x, log_det.expand_as(y)


# ----------------------------------------------------------------------------- couplings
class _ResidualCoupling(nn.Module):
    """The affine map of the code's couplings on the transformed part (``free`` = 1):

        y = (x + t) exp(s),  s = scale tanh(h) (+ scale_shift without batch norm)

    (the code adds the shift before scaling; the paper's eq. 9 prints y = x exp(s) + t, the
    same family with t' = t exp(s)), then :class:`CouplingOutputNorm` with ``batch_norm``.
    ``scale`` is one learned scalar per coupling; log |det| = sum of s (and the norm's)."""

    def __init__(self, channels: int, scale_init: float, batch_norm: bool):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale_init))
        self.scale_shift = None if batch_norm else nn.Parameter(torch.tensor(0.0))
        self.out_norm = CouplingOutputNorm(channels) if batch_norm else None

    def _shift_log_scale(self, h: Tensor, free) -> tuple[Tensor, Tensor]:
        # In float32 under autocast, so that exp(s) and the log-det sum the same s.
        t, pre = h.to(self.scale.dtype).chunk(2, dim=1)   # the code: shift, then log-scale
        log_s = self.scale * torch.tanh(pre)
        if self.scale_shift is not None:
            log_s = log_s + self.scale_shift
        return free * t, free * log_s

    def _couple(self, x: Tensor, h: Tensor, free) -> tuple[Tensor, Tensor]:
        t, log_s = self._shift_log_scale(h, free)
        y, log_det = (x + t) * log_s.exp(), log_s
        if self.out_norm is not None:
            y, norm_log_det = self.out_norm(y, free)
            log_det = log_det + norm_log_det
        return y, log_det.flatten(1).sum(1)

    def _uncouple(self, y: Tensor, h: Tensor, free) -> tuple[Tensor, Tensor]:
        t, log_s = self._shift_log_scale(h, free)
        log_det = -log_s
        if self.out_norm is not None:
            y, norm_log_det = self.out_norm.inverse(y, free)
            log_det = log_det + norm_log_det
        return y * (-log_s).exp() - t, log_det.flatten(1).sum(1)


class CheckerboardCoupling(_ResidualCoupling):
    """The code's ``masked_conv_aff_coupling`` on an image of ``shape`` (C, H, W): the sites
    where (i + j) % 2 == ``parity`` condition (all channels), the others are transformed.
    Its scale starts at 0 (the code's ``rescaling_scale``): s = 0 at the start."""

    def __init__(self, shape: tuple[int, int, int], parity: int, hidden: int, n_blocks: int,
                 batch_norm: bool):
        super().__init__(shape[0], 0.0, batch_norm)
        self.register_buffer("mask", checkerboard_mask(shape, parity)[:1])     # (1, H, W)
        self.net = CouplingNet(shape[0], hidden, n_blocks, batch_norm, mask_channel=True)

    def _h(self, x: Tensor) -> Tensor:
        return self.net(self.mask * x, self.mask)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, self._h(x), 1 - self.mask)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._uncouple(y, self._h(y), 1 - self.mask)     # m y = m x: the same input


class ChannelCoupling(_ResidualCoupling):
    """The code's ``conv_ch_aff_coupling`` on ``channels`` channels: ``parity`` 0 (the
    code's ``change_bottom=True``) conditions on the first half and transforms the second,
    1 the reverse. Its scale starts at 1 (the code's ``scale``)."""

    def __init__(self, channels: int, parity: int, hidden: int, n_blocks: int,
                 batch_norm: bool):
        super().__init__(channels // 2, 1.0, batch_norm)
        self.parity = parity
        self.net = CouplingNet(channels // 2, hidden, n_blocks, batch_norm, mask_channel=False)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conditioning half, transformed half)."""
        first, second = x.chunk(2, dim=1)
        return (first, second) if self.parity == 0 else (second, first)

    def _merge(self, held: Tensor, moved: Tensor) -> Tensor:
        return torch.cat([held, moved] if self.parity == 0 else [moved, held], 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        held, moved = self._split(x)
        y, log_det = self._couple(moved, self.net(held), 1.0)
        return self._merge(held, y), log_det

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        held, moved = self._split(y)
        x, log_det = self._uncouple(moved, self.net(held), 1.0)
        return self._merge(held, x), log_det


class CheckerboardSplitOrder(nn.Module):
    """The code's ``squeeze_2x2_ordered`` seen from a squeezed image (4C, H/2, W/2) in
    :class:`Squeeze`'s channel order (c, di, dj): a fixed channel permutation to the sites
    (0, 0), (1, 1), (0, 1), (1, 0) of each 2x2 block, each with its C channels. The next
    split keeps the first half, the sites (0, 0) and (1, 1), and factors out the other
    checkerboard colour, as the code does. log-det 0."""

    SITES = (0, 3, 1, 2)           # di * 2 + dj of (0, 0), (1, 1), (0, 1), (1, 0)

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 4
        order = torch.tensor([k * 4 + site for site in self.SITES for k in range(c)])
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse_order", torch.argsort(order), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.order], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[:, self.inverse_order], y.new_zeros(y.shape[0])


# ----------------------------------------------------------------------------- the model
def realnvp(shape: tuple[int, ...], n_scales: int | None = None, n_couplings: int | None = None,
            hidden: int = 64, n_hidden: int = 2, norm: str = "batch",
            prior: str = "gaussian") -> Flow:
    """RealNVP on points (D,) or images (C, H, W) (module docstring).

    Images: ``n_scales`` scales (default 2), ``n_couplings`` couplings of each mask per scale
    (default 3, the paper's), coupling ResNets of ``n_hidden`` residual blocks (the code's
    ``residual_blocks``) and ``hidden`` feature maps at the first scale (``base_dim``).
    Points: ``n_couplings`` couplings (default 4), MLPs of ``n_hidden`` hidden layers of
    ``hidden`` units. ``n_scales`` given for points is refused, not ignored."""
    if norm not in NORMS:
        raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {norm!r}")
    _check_positive(n_scales=n_scales, n_couplings=n_couplings, hidden=hidden)
    if len(shape) == 1:
        _refuse_keys({"n_scales": n_scales}, "points", "a stack of couplings: set "
                     "model.n_couplings and model.n_hidden")
        return Flow(shape, _point_couplings(shape[0], 4 if n_couplings is None else n_couplings,
                                            hidden, n_hidden, norm), prior)
    if n_hidden < 1:
        raise ValueError(f"model.n_hidden is the residual blocks of each coupling network on "
                         f"images and must be at least 1, got {n_hidden}")
    n_scales = 2 if n_scales is None else n_scales
    _check_squeezable(shape, n_scales - 1, "model=realnvp")
    options = dict(n_scales=n_scales, n_couplings=3 if n_couplings is None else n_couplings,
                   n_blocks=n_hidden, norm=norm)
    return Flow(shape, _scale(tuple(shape), 0, hidden, **options), prior)


def _check_positive(**keys) -> None:
    for key, value in keys.items():
        if value is not None and value < 1:
            raise ValueError(f"model.{key} must be at least 1, got {value}")


def _refuse_keys(keys: dict, data: str, instead: str) -> None:
    given = [f"model.{k}={v}" for k, v in keys.items() if v is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} do not apply to {data}: RealNVP on {data} is "
                         f"{instead}")


def _point_couplings(dim: int, n_couplings: int, hidden: int, n_hidden: int,
                     norm: str) -> Sequence:
    """Affine couplings with alternating masks (tanh-bounded scales), each MLP of
    ``n_hidden`` x ``hidden`` units, each followed by the ``norm`` layer."""
    make_norm, layers = POINT_NORMS[norm], []
    for i in range(n_couplings):
        net = mlp(dim, hidden, n_hidden, 2 * dim, True)
        layers.append(AffineCoupling(alternating_mask(dim, i % 2), net, "tanh"))
        if make_norm is not None:
            layers.append(make_norm(dim))
    return Sequence(layers)


def _with_norm(coupling: nn.Module, channels: int, norm: str) -> list[nn.Module]:
    return [coupling, ActNorm(channels)] if norm == "actnorm" else [coupling]


def _scale(shape: tuple[int, int, int], index: int, hidden: int, n_scales: int,
           n_couplings: int, n_blocks: int, norm: str) -> nn.Module:
    """Scale ``index`` of the code's ``rec_masked_conv_coupling`` on an image of ``shape``:
    its couplings, then (but for the last) the squeeze, the channel-wise couplings, the
    factoring out of half the variables, and the next scale on the other half."""
    c, h, w = shape
    dim, batch_norm, last = hidden * 2 ** index, norm == "batch", index == n_scales - 1
    steps = []
    for i in range(n_couplings + int(last)):        # the code's first mask holds odd sites
        steps += _with_norm(CheckerboardCoupling(shape, (i + 1) % 2, dim, n_blocks, batch_norm),
                            c, norm)
    if last:
        return Flatten(Sequence(steps), shape)
    steps.append(Squeeze())
    for i in range(n_couplings):
        steps += _with_norm(ChannelCoupling(4 * c, i % 2, 2 * dim, n_blocks, batch_norm),
                            4 * c, norm)
    steps.append(CheckerboardSplitOrder(4 * c))
    squeezed, kept = (4 * c, h // 2, w // 2), (2 * c, h // 2, w // 2)
    rest = _scale(kept, index + 1, hidden, n_scales, n_couplings, n_blocks, norm)
    return MultiScale(Sequence(steps), squeezed, rest)
